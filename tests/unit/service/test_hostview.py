"""The main loop's view of libvirt, over a fake connection and a clock the test moves."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import structlog

from virt_reclaim.errors import VirtError
from virt_reclaim.model import DomainObservation, DomainState
from virt_reclaim.service import hostview
from virt_reclaim.service.hostview import RECONNECT_MAX_DELAY_S, HostView, Outage


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeHypervisor:
    """Stands in for virt.Hypervisor: up or down as the test says, with its domains."""

    up: ClassVar[bool] = True
    domains_listed: ClassVar[list[DomainObservation]] = []
    stats: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []

    def __init__(self, uri: str) -> None:
        if not FakeHypervisor.up:
            raise VirtError(f"cannot connect to {uri}")
        self.is_alive = True
        self.closed = False

    def watch(self, **_callbacks: Any) -> None:
        pass

    def domains(self) -> list[DomainObservation]:
        return list(FakeHypervisor.domains_listed)

    def alive(self) -> bool:
        return self.is_alive

    def close(self) -> None:
        self.closed = True

    def domain_stats(self) -> list[tuple[str, str, dict[str, Any]]]:
        return FakeHypervisor.stats


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeHypervisor]:
    monkeypatch.setattr(hostview, "Hypervisor", FakeHypervisor)
    monkeypatch.setattr(FakeHypervisor, "up", True)
    monkeypatch.setattr(FakeHypervisor, "domains_listed", [snap("vm-a")])
    monkeypatch.setattr(FakeHypervisor, "stats", [])
    return FakeHypervisor


def snap(name: str) -> DomainObservation:
    return DomainObservation(name, f"uuid-{name}", DomainState.RUNNING, True, "<domain/>")


def connect(host: HostView) -> bool:
    return host.connect("qemu:///system", on_lifecycle=lambda *_: None, on_close=lambda _: None)


def test_the_backoff_doubles_up_to_a_minute() -> None:
    outage = Outage(since=0.0, reason="gone")
    tries = []
    for now in range(10):
        outage.failed(float(now))
        tries.append(outage.next_try - now)
    assert tries == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert outage.attempts == 10
    assert outage.delay == RECONNECT_MAX_DELAY_S


def test_an_outage_is_logged_once_retried_with_backoff_and_its_length_told(
    fake: type[FakeHypervisor],
) -> None:
    clock = Clock()
    host = HostView(clock)
    with structlog.testing.capture_logs() as events:
        assert not connect(host)
        assert host.hypervisor is not None and set(host.domains) == {"uuid-vm-a"}
        host.domains["uuid-vm-a"].recent.duration_s = 60

        assert host.hypervisor is not None
        first = host.hypervisor
        first.is_alive = False  # type: ignore[attr-defined]
        fake.up = False
        assert not connect(host)  # the dead connection is noticed; libvirtd does not answer
        assert first.closed  # type: ignore[attr-defined]
        assert host.outage is not None and host.outage.attempts == 1
        clock.now += 0.4
        assert not connect(host)  # too early: not even tried
        assert host.outage.attempts == 1
        clock.now += 0.2
        assert not connect(host)
        assert host.outage.attempts == 2
        fake.up = True
        clock.now += 0.5
        assert not connect(host)  # still waiting for the doubled delay
        clock.now += 0.6
        assert connect(host)  # back: True once
        assert not connect(host)
    assert [e["event"] for e in events] == [
        "libvirt.connected", "libvirt.disconnected", "libvirt.reconnected",
    ]  # fmt: skip
    reconnected = events[-1]
    assert reconnected["outage_s"] == 1.7 and reconnected["attempts"] == 2
    assert host.outage is None
    # The domains keep their samples across the outage.
    assert host.domains["uuid-vm-a"].recent.duration_s == 60


def test_unreachable_at_start_is_logged_once(fake: type[FakeHypervisor]) -> None:
    clock = Clock()
    host = HostView(clock)
    fake.up = False
    with structlog.testing.capture_logs() as events:
        for _ in range(5):
            connect(host)
            clock.now += 100
    assert [e["event"] for e in events] == ["libvirt.unreachable"]
    assert host.outage is not None and host.outage.attempts == 5


def test_samples_go_to_the_known_domains_and_only_the_first_is_logged(
    fake: type[FakeHypervisor],
) -> None:
    host = HostView(Clock())
    connect(host)
    record = {"cpu.time": 5, "block.count": 0, "net.count": 0}
    fake.stats = [("vm-a", "uuid-vm-a", record), ("vm-x", "uuid-unknown", record)]
    with structlog.testing.capture_logs() as events:
        host.sample(10.0, keep_s=300)
        host.sample(20.0, keep_s=300)
    assert [(e["event"], e["domains"]) for e in events] == [("stats.sampled", 2)]
    recent = host.domains["uuid-vm-a"].recent
    assert recent.duration_s == 300
    assert [s.at for s in recent.samples] == [10.0, 20.0]
