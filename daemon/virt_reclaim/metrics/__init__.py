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
