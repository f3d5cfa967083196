"""Metrics for node_exporter's textfile collector: what the daemon and ``run`` did, as numbers.

The file is built with prometheus_client (a registry of metric families, written by
``write_to_textfile``: a temporary file renamed over the old one) from three sources:

- the journal: jobs by outcome, bytes reclaimed, downtime, each domain's last job,
  step durations, each disk's newest estimate and reclaim. These counters are counted
  again from the journal at every write, so they survive restarts;
- the domains libvirt lists: each qcow2 disk's allocated bytes (``st_blocks``) and
  virtual size (``qemu-img info -U``, cached per image file), whether the domain runs;
- what only the daemon sees (``Observations``): windows opened, domains skipped by
  reason, the estimates of its dry runs, its last libvirt sample. The daemon counts
  these itself and adds the counts of the previous file at its start, so that a
  restart does not reset them; ``virt-reclaim run``, which writes the same file,
  carries them over as it finds them.

The daemon writes on its own thread (``DaemonMetrics``): a request only hands over
what to write, and requests made while a write is under way are written once after it.
"""

from virt_reclaim.metrics.families import OUTCOMES as OUTCOMES
from virt_reclaim.metrics.families import RUNNING_STATES as RUNNING_STATES
from virt_reclaim.metrics.families import STEP_MARKS as STEP_MARKS
from virt_reclaim.metrics.families import VIRTUAL_SIZE_TTL_S as VIRTUAL_SIZE_TTL_S
from virt_reclaim.metrics.families import DiskSizes as DiskSizes
from virt_reclaim.metrics.families import build as build
from virt_reclaim.metrics.observations import DAEMON_START as DAEMON_START
from virt_reclaim.metrics.observations import DOMAIN_SKIPS as DOMAIN_SKIPS
from virt_reclaim.metrics.observations import ESTIMATED_AT as ESTIMATED_AT
from virt_reclaim.metrics.observations import LAST_SAMPLE as LAST_SAMPLE
from virt_reclaim.metrics.observations import RECLAIMABLE as RECLAIMABLE
from virt_reclaim.metrics.observations import WINDOWS_OPENED as WINDOWS_OPENED
from virt_reclaim.metrics.observations import Estimate as Estimate
from virt_reclaim.metrics.observations import Observations as Observations
from virt_reclaim.metrics.observations import read_previous as read_previous
from virt_reclaim.metrics.observations import skip_kind as skip_kind
from virt_reclaim.metrics.writer import FILE_MODE as FILE_MODE
from virt_reclaim.metrics.writer import REFRESH_S as REFRESH_S
from virt_reclaim.metrics.writer import DaemonMetrics as DaemonMetrics
from virt_reclaim.metrics.writer import write as write
from virt_reclaim.metrics.writer import write_for_run as write_for_run
