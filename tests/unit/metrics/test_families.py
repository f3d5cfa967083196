"""The metrics file against a real journal of real (fast) jobs: fake domains over real images.

Four jobs fill the journal once for the module: web-1 reclaimed (it ran and runs
again), then a dry run of it; db-1 failed (its guest ignored the shutdown);
off-1 reclaimed with ``after = off`` (it ran, and stays off). The file is
written with ``writer.write`` and read back with prometheus_client's own parser.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from fakes import MIB, FakeDisk, FakeDomain, make_image
from virt_reclaim import __version__
from virt_reclaim.config.loading import DaemonConfig
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.results import DiskResult, JobResult, Outcome
from virt_reclaim.job.settings import After, FreeSpaceMethod, JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics import families, observations, writer

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "examples" / "prometheus" / "virt-reclaim.rules.yml"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def run(domain: FakeDomain, journal: Journal, **settings: Any) -> JobResult:
    job = ReclaimJob(
        domain, QemuImg(priority=None),
        JobSettings(free_space=FreeSpaceMethod.NONE, min_gain=0, **settings),
        images_of_other_domains=dict, journal=journal,
    )  # fmt: skip
    return job.run()


def compressible(path: Path) -> Path:
    """16 MiB of one byte pattern: zstd makes it almost nothing."""
    return make_image(path, "256M", ("write -P 0xab 0 16M",))


class Built:
    """The module's journal, its domains and the jobs' results."""

    def __init__(self, folder: Path) -> None:
        self.state = folder / "state"
        self.journal = Journal(self.state)
        self.web = FakeDomain([FakeDisk("vda", compressible(folder / "web.qcow2"))], name="web-1")
        self.db = FakeDomain([FakeDisk("vdb", compressible(folder / "db.qcow2"))], name="db-1",
                             ignores_shutdown=True)  # fmt: skip
        self.off = FakeDomain([FakeDisk("vda", compressible(folder / "off.qcow2"))], name="off-1")
        self.reclaimed = run(self.web, self.journal)
        self.dry_run = run(self.web, self.journal, dry_run=True)
        self.failed = run(self.db, self.journal, shutdown_timeout_s=0.1)
        self.left_off = run(self.off, self.journal, after=After.OFF)
        self.domains = [d.observe() for d in (self.web, self.db, self.off)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("metrics"))


def observed() -> observations.Observations:
    seen = observations.Observations(started_at=1_700_000_000.0)
    seen.window_opened("nightly")
    seen.window_opened("nightly")
    seen.skipped("db-1", "busy: CPU 40.0% over 30 s")
    seen.skipped("off-1", "reclaimed recently: min_interval leaves 3.0 h to wait")
    seen.skipped("web-1", "estimated 12 min does not fit in the 3 min left of the window")
    seen.sampled(1_700_000_100.0)
    return seen


def write_and_read(
    built: Built, path: Path, seen: observations.Observations | None = None
) -> Samples:
    registry = families.build_registry(
        built.journal, seen or observed(), built.domains, families.DiskSizes("qemu-img")
    )
    writer.write(str(path), registry)
    return parse(path.read_text())


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_jobs_are_what_the_journal_says(built: Built, tmp_path: Path) -> None:
    assert built.reclaimed.outcome is Outcome.RECLAIMED, built.reclaimed.reason
    assert built.dry_run.outcome is Outcome.DRY_RUN
    assert built.failed.outcome is Outcome.FAILED
    assert built.left_off.outcome is Outcome.RECLAIMED, built.left_off.reason
    samples = write_and_read(built, tmp_path / "virt_reclaim.prom")

    history = built.journal.history()
    for domain in ("web-1", "db-1", "off-1"):
        for outcome in families.OUTCOMES:
            count = sum(1 for j in history if j.domain == domain and j.outcome == outcome)
            got = value(samples, "virt_reclaim_jobs_total", domain=domain, outcome=outcome)
            assert got == count, (domain, outcome)
        freed = sum((j.bytes_before or 0) - (j.bytes_after or 0) for j in history
                    if j.domain == domain and j.outcome == "reclaimed")  # fmt: skip
        assert value(samples, "virt_reclaim_reclaimed_bytes_total", domain=domain) == freed
    assert value(samples, "virt_reclaim_jobs_total", domain="web-1", outcome="dry-run") == 1
    assert value(samples, "virt_reclaim_reclaimed_bytes_total", domain="web-1") > 8 * MIB
    # The last job is the newest that is not a dry run.
    [web] = [j for j in history if j.domain == "web-1" and j.outcome == "reclaimed"]
    assert value(samples, "virt_reclaim_last_job_timestamp_seconds", domain="web-1") == (
        web.finished_at
    )
    assert value(samples, "virt_reclaim_last_job_duration_seconds", domain="web-1") == (
        web.duration_s
    )
    assert value(samples, "virt_reclaim_last_job_downtime_seconds", domain="web-1") == (
        web.downtime_s
    )
    assert web.downtime_s is not None and web.downtime_s > 0
    assert value(samples, "virt_reclaim_downtime_seconds_total", domain="web-1") == web.downtime_s
    assert value(samples, "virt_reclaim_last_job_outcome", domain="db-1", outcome="failed") == 1
    # web-1 and db-1 ran before their jobs and should run after; off-1's policy said off.
    should_run = "virt_reclaim_last_job_guest_should_run"
    assert value(samples, should_run, domain="web-1") == 1
    assert value(samples, should_run, domain="db-1") == 1
    assert value(samples, should_run, domain="off-1") == 0
    assert value(samples, "virt_reclaim_domain_running", domain="web-1") == 1
    assert value(samples, "virt_reclaim_domain_running", domain="off-1") == 0


def test_step_durations_add_up_to_each_job(built: Built, tmp_path: Path) -> None:
    samples = write_and_read(built, tmp_path / "virt_reclaim.prom")
    history = built.journal.history()
    finished = [j for j in history if j.finished_at is not None]
    steps = {s for j in finished for s in j.steps} - set(families.STEP_MARKS)
    for step in steps:
        taken = sum(1 for j in finished for s in j.steps if s == step)
        got = value(samples, "virt_reclaim_step_duration_seconds_count", step=step)
        assert got == taken, step
    # "shutdown-requested" is a point inside the shutdown step, not a step.
    assert ("virt_reclaim_step_duration_seconds_count", (("step", "shutdown-requested"),)) not in (
        samples
    )
    assert value(samples, "virt_reclaim_step_duration_seconds_count", step="rewrite") == 2
    # The steps of the last job cover it from its first step to its end.
    [web] = [j for j in history if j.domain == "web-1" and j.outcome == "reclaimed"]
    last = {
        labels[1][1]: seconds
        for (name, labels), seconds in samples.items()
        if name == "virt_reclaim_last_job_step_duration_seconds"
        and labels[0] == ("domain", "web-1")
    }
    assert set(last) == set(web.steps) - set(families.STEP_MARKS)
    assert all(seconds >= 0 for seconds in last.values())
    assert web.finished_at is not None and web.duration_s is not None
    assert sum(last.values()) == pytest.approx(web.duration_s, abs=0.5)
    assert last["rewrite"] > 0
    total = sum(
        seconds
        for (name, _labels), seconds in samples.items()
        if name == "virt_reclaim_step_duration_seconds_sum"
    )
    assert total == pytest.approx(sum(j.duration_s or 0 for j in finished), abs=2.0)


def test_disks_sizes_estimates_and_last_reclaim(built: Built, tmp_path: Path) -> None:
    samples = write_and_read(built, tmp_path / "virt_reclaim.prom")
    image = built.web.disks[0].path
    web_vda = {"domain": "web-1", "target": "vda"}
    allocated = value(samples, "virt_reclaim_disk_allocated_bytes", **web_vda)
    assert allocated == image.stat().st_blocks * 512
    assert value(samples, "virt_reclaim_disk_virtual_bytes", **web_vda) == 256 * MIB
    [disk] = built.reclaimed.disks
    assert disk.bytes_after is not None
    assert value(samples, "virt_reclaim_disk_last_reclaimed_bytes", **web_vda) == disk.bytes_after
    # The dry run after the reclaim is the newest estimate of web-1's disk.
    [estimated] = built.dry_run.disks
    assert estimated.estimated_after is not None
    gain = max(0, estimated.bytes_before - estimated.estimated_after)
    assert value(samples, "virt_reclaim_disk_reclaimable_bytes", **web_vda) == gain
    # db-1's job failed after its estimate: that estimate stands.
    [failed] = built.failed.disks
    assert failed.estimated_after is not None
    assert value(samples, "virt_reclaim_disk_reclaimable_bytes", domain="db-1", target="vdb") == (
        failed.bytes_before - failed.estimated_after
    )
    assert failed.bytes_before - failed.estimated_after > 8 * MIB
    # off-1 was reclaimed after its estimate: nothing left to reclaim.
    off_vda = {"domain": "off-1", "target": "vda"}
    assert value(samples, "virt_reclaim_disk_reclaimable_bytes", **off_vda) == 0
    reclaimed_at = value(samples, "virt_reclaim_disk_estimate_timestamp_seconds", **off_vda)
    [off] = [j for j in built.journal.history() if j.domain == "off-1"]
    assert reclaimed_at == off.finished_at


def test_a_newer_dry_run_of_the_daemon_wins_over_the_journal(built: Built, tmp_path: Path) -> None:
    seen = observed()
    result = JobResult("db-1", "x", Outcome.DRY_RUN, "dry run", 0, 0, [
        DiskResult("vdb", "/x", 256 * MIB, 20 * MIB, 5 * MIB, 5 * MIB, "sample", None, None),
    ], [], None)  # fmt: skip
    seen.estimated("db-1", result, at=time.time() + 5)
    seen.estimated("db-1", result, at=1.0)  # older than the journal's: loses there
    samples = write_and_read(built, tmp_path / "virt_reclaim.prom", seen)
    db_vdb = {"domain": "db-1", "target": "vdb"}
    assert value(samples, "virt_reclaim_disk_reclaimable_bytes", **db_vdb) != 15 * MIB
    seen.estimated("db-1", result, at=time.time() + 5)
    samples = write_and_read(built, tmp_path / "virt_reclaim.prom", seen)
    assert value(samples, "virt_reclaim_disk_reclaimable_bytes", **db_vdb) == 15 * MIB
    # A dry run that would not reclaim is a skip of the window, by its outcome.
    nothing = JobResult("off-1", "y", Outcome.NOTHING_TO_DO, "below", 0, 0, [], [], None)
    seen.estimated("off-1", nothing)
    samples = write_and_read(built, tmp_path / "virt_reclaim.prom", seen)
    skips = "virt_reclaim_domain_skips_total"
    assert value(samples, skips, domain="off-1", reason="nothing-to-do") == 1


def test_daemon_figures_every_name_and_the_file_itself(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "virt_reclaim.prom"
    samples = write_and_read(built, path)
    assert value(samples, "virt_reclaim_build_info", version=__version__) == 1
    assert value(samples, "virt_reclaim_windows_opened_total", policy="nightly") == 2
    skips = "virt_reclaim_domain_skips_total"
    assert value(samples, skips, domain="db-1", reason="busy") == 1
    assert value(samples, skips, domain="off-1", reason="min-interval") == 1
    assert value(samples, skips, domain="web-1", reason="does-not-fit") == 1
    assert value(samples, "virt_reclaim_last_sample_timestamp_seconds") == 1_700_000_100.0
    assert value(samples, "virt_reclaim_daemon_start_time_seconds") == 1_700_000_000.0
    assert all(name.startswith("virt_reclaim_") for name, _labels in samples)
    # Prometheus conventions: base units in the name, counters end in _total.
    text = path.read_text()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        assert not re.search(r"_(ms|milliseconds|mib|kib|minutes|hours)(_|$)", family.name)
    # Readable by node_exporter's own user; nothing left beside it.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == [path.name]


def test_the_daemon_figures_survive_in_the_file(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "virt_reclaim.prom"
    write_and_read(built, path)
    previous = observations.read_previous(str(path))
    assert previous.windows == {"nightly": 2}
    assert previous.skips[("db-1", "busy")] == 1
    assert previous.last_sample_at == 1_700_000_100.0
    assert previous.started_at == 1_700_000_000.0
    # A restarted daemon adds its own counts to those it finds.
    again = observations.Observations(started_at=1_800_000_000.0)
    again.window_opened("nightly")
    again.carry(previous)
    samples = write_and_read(built, path, again)
    assert value(samples, "virt_reclaim_windows_opened_total", policy="nightly") == 3
    assert value(samples, "virt_reclaim_daemon_start_time_seconds") == 1_800_000_000.0
    # `run` writes the same file and keeps what only the daemon knows.
    assert writer.write_for_run(str(path), built.journal, lambda: built.domains, "qemu-img")
    samples = parse(path.read_text())
    assert value(samples, "virt_reclaim_windows_opened_total", policy="nightly") == 3
    assert value(samples, "virt_reclaim_domain_skips_total", domain="db-1", reason="busy") == 1
    assert value(samples, "virt_reclaim_jobs_total", domain="web-1", outcome="reclaimed") == 1
    # Nothing there, or garbage: nothing carried, no failure.
    assert observations.read_previous(str(tmp_path / "missing.prom")).windows == {}
    (tmp_path / "bad.prom").write_text("this is { not prometheus\n")
    assert observations.read_previous(str(tmp_path / "bad.prom")).windows == {}


def test_the_daemon_writes_on_its_thread_and_reports_a_folder_it_cannot_write(
    built: Built, tmp_path: Path
) -> None:
    path = tmp_path / "out" / "virt_reclaim.prom"
    path.parent.mkdir()
    daemon_metrics = writer.DaemonMetrics()
    daemon_config = DaemonConfig(state_dir=str(built.state), metrics_file=str(path))
    daemon_metrics.request(daemon_config, built.domains, sampled_at=time.time())
    daemon_metrics.observations.window_opened("p")
    # Too soon after the last: none.
    daemon_metrics.request(daemon_config, built.domains, periodic=True)
    daemon_metrics.close()
    samples = parse(path.read_text())
    assert value(samples, "virt_reclaim_jobs_total", domain="db-1", outcome="failed") == 1
    assert value(samples, "virt_reclaim_last_sample_timestamp_seconds") > 0
    # No file configured: nothing happens.
    idle = writer.DaemonMetrics()
    idle.request(DaemonConfig(state_dir=str(built.state)), built.domains)
    idle.close()
    # A folder that is gone: a warning, and the daemon goes on.
    broken = writer.DaemonMetrics()
    gone = DaemonConfig(state_dir=str(built.state), metrics_file=str(tmp_path / "no" / "x.prom"))
    with structlog.testing.capture_logs() as events:
        broken.request(gone, built.domains)
        broken.close()
    [failed] = [e for e in events if e["event"] == "metrics.write_failed"]
    assert failed["log_level"] == "warning" and "x.prom" in failed["path"]


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("busy: CPU 40.0% over 30 s", "busy"),
        ("busy: users logged in", "busy"),
        ("reclaimed recently: min_interval leaves 3.0 h to wait", "min-interval"),
        ("a job for it is running", "job-running"),
        ("estimated 12 min does not fit in the 3 min left of the window", "does-not-fit"),
        ("the journal cannot be read: locked", "journal"),
        ("its policy or the domain is gone", "gone"),
        ("libvirt: domain not found", "error"),
    ],
)
def test_skip_reasons_become_a_few_label_values(reason: str, kind: str) -> None:
    assert observations.skip_kind(reason) == kind


def test_the_metrics_file_setting_must_be_a_prom_file() -> None:
    assert DaemonConfig().metrics_file == ""
    good = "/var/lib/prometheus/node-exporter/virt_reclaim.prom"
    assert DaemonConfig(metrics_file=good).metrics_file == good
    for bad in ("virt_reclaim.prom", "/var/lib/prometheus/node-exporter/virt_reclaim.txt"):
        with pytest.raises(ValidationError, match=r"\.prom"):
            DaemonConfig(metrics_file=bad)


def test_the_example_alert_rules_name_only_metrics_that_are_written(
    built: Built, tmp_path: Path
) -> None:
    written = {name for name, _labels in write_and_read(built, tmp_path / "virt_reclaim.prom")}
    rules = yaml.safe_load(RULES.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "VirtReclaimJobFailed",
        "VirtReclaimGuestLeftNotRunning",
        "VirtReclaimNoLibvirtSample",
        "VirtReclaimDiskGrewBack",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert
        assert alert["annotations"]["summary"], alert
        used = set(re.findall(r"\bvirt_reclaim_[a-z0-9_]+", alert["expr"]))
        assert used, alert["alert"]
        assert used <= written, (alert["alert"], used - written)


def test_the_readme_names_only_metrics_that_are_written(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "virt_reclaim.prom"
    samples = write_and_read(built, path)
    families = {f.name for f in text_string_to_metric_families(path.read_text())}
    written = {name for name, _labels in samples} | families
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Metrics\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\bvirt_reclaim_[a-z0-9_]+", section))
    assert len(named) > 20
    assert named <= written, named - written


def test_disk_sizes_name_the_format_so_qemu_img_never_probes(tmp_path: Path) -> None:
    """The image's format comes from the definition; a guest's bytes never choose it."""
    calls = tmp_path / "argv"
    wrapper = tmp_path / "qemu-img"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec qemu-img "$@"\n')
    wrapper.chmod(0o755)
    image = make_image(tmp_path / "disk.qcow2", "64M")

    used, size = families.DiskSizes(str(wrapper)).sizes_of(str(image), "qcow2")

    assert (used, size) == (image.stat().st_blocks * 512, 64 * MIB)
    [call] = calls.read_text().splitlines()
    assert call.startswith("info") and " -f qcow2 " in f" {call} ", call
