"""What the modules of the package share: libvirt's error printing silenced, error texts, states."""

from __future__ import annotations

from typing import Any

import libvirt

from virt_reclaim.model import DomainObservation, DomainState


def _silence_default_error_handler(_ctx: object, _err: object) -> None:
    """Drop libvirt's own printing; every error reaches us as an exception anyway."""


libvirt.registerErrorHandler(_silence_default_error_handler, None)


STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


def observe_domain(dom: Any) -> DomainObservation:  # noqa: ANN401 - libvirt.virDomain has no stubs
    """The identity, state and live XML of a raw libvirt domain; libvirtError if it cannot."""
    state, _reason = dom.state()
    return DomainObservation(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=STATES.get(state, DomainState.NOSTATE),
        persistent=bool(dom.isPersistent()),
        xml=dom.XMLDesc(0),
    )


def error_message(exc: Any) -> str:  # noqa: ANN401 - libvirt.libvirtError has no stubs
    """The text of a libvirtError: its error message, else the exception as a string."""
    return str(exc.get_error_message() or exc)
