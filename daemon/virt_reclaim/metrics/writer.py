"""Writing the metrics file: atomically, from ``run`` once, from the daemon on its own thread.

The daemon's writer carries over the counts of the file it finds at its first write.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, write_to_textfile

from virt_reclaim.config.loading import DaemonConfig
from virt_reclaim.errors import VirtError
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics.families import DiskSizes, build_registry
from virt_reclaim.metrics.observations import Observations, read_previous
from virt_reclaim.model import DomainObservation

log = structlog.get_logger("virt_reclaim.metrics")

# node_exporter runs as its own user: the file must be readable by others, whatever the
# daemon's umask (the unit's is 0077).
FILE_MODE = 0o644
# While it samples, the daemon writes the file at least this often (the sample's time is in it).
REFRESH_S = 60.0


def write(path: str, registry: CollectorRegistry) -> None:
    """Write the registry to ``path`` atomically, readable by node_exporter.

    ``write_to_textfile`` writes a temporary file and renames it; its result is given
    its mode under a name node_exporter ignores (it reads ``*.prom`` only), then renamed
    to ``path``, so that the file is never seen unreadable or half written.
    """
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}.staging"
    try:
        write_to_textfile(staging, registry)
        os.chmod(staging, FILE_MODE)
        os.rename(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_for_run(
    path: str,
    journal: Journal,
    list_domains: Callable[[], Sequence[DomainObservation]],
    qemu_img_path: str,
) -> bool:
    """``virt-reclaim run``: write the file, the daemon's figures carried over from it.

    Returns False (after a warning) when it could not be written; the job's outcome stands.
    """
    try:
        domains = list_domains()
        registry = build_registry(journal, read_previous(path), domains, DiskSizes(qemu_img_path))
        write(path, registry)
    except (OSError, JournalError, VirtError) as exc:
        log.warning("metrics.write_failed", path=path, error=str(exc))
        return False
    return True


@dataclass(frozen=True)
class _Request:
    path: str
    state_dir: str
    qemu_img: str
    domains: tuple[DomainObservation, ...]


class DaemonMetrics:
    """The daemon's metrics file: what it observes, and the thread that writes the file."""

    def __init__(self) -> None:
        self.observations = Observations(started_at=time.time())
        self._lock = threading.Lock()
        self._pending: _Request | None = None
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_request = -math.inf
        self._sample_requested = False  # the first sample is written at once
        self._carried = False
        self._sizes: DiskSizes | None = None
        self._journal: Journal | None = None
        self._failing = False

    def request(
        self,
        daemon_config: DaemonConfig,
        domains: Iterable[DomainObservation],
        *,
        sampled_at: float | None = None,
        periodic: bool = False,
    ) -> None:
        """Have the file written soon with these domains (nothing when no file is configured).

        ``periodic``: only if the last request is REFRESH_S old (after a sample).
        """
        if sampled_at is not None:
            self.observations.sampled(sampled_at)
        if not daemon_config.metrics_file or self._closing:
            return
        now = time.monotonic()
        first_sample = sampled_at is not None and not self._sample_requested
        if periodic and now - self._last_request < REFRESH_S and not first_sample:
            return
        self._last_request = now
        self._sample_requested = self._sample_requested or sampled_at is not None
        request = _Request(
            daemon_config.metrics_file,
            daemon_config.state_dir,
            daemon_config.qemu_img,
            tuple(domains),
        )
        with self._lock:
            self._pending = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
                self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is pending, then end the thread (waiting at most ``timeout``)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                request, self._pending = self._pending, None
            if request is not None:
                self._write(request)
            if self._closing and self._pending is None:
                if self._journal is not None:
                    self._journal.close()
                return

    def _write(self, request: _Request) -> None:
        try:
            if not self._carried:
                self._carried = True
                self.observations.carry(read_previous(request.path))
            if self._sizes is None or self._sizes.qemu_img != request.qemu_img:
                self._sizes = DiskSizes(request.qemu_img)
            if self._journal is None or self._journal.path.parent != Path(request.state_dir):
                self._journal = Journal(request.state_dir)
            registry = build_registry(self._journal, self.observations.copy(), request.domains,
                             self._sizes)  # fmt: skip
            write(request.path, registry)
        except (OSError, JournalError) as exc:
            if not self._failing:  # once until it works again
                log.warning("metrics.write_failed", path=request.path, error=str(exc))
            self._failing = True
            return
        except Exception:  # a bug here must not stop the metrics for good
            log.exception("metrics.write_failed", path=request.path)
            self._failing = True
            return
        if self._failing:
            log.info("metrics.written", path=request.path)
        self._failing = False
