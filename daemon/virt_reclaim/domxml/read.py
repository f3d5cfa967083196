"""Pure functions over libvirt domain XML: disks, their sources, formats and backing stores."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from virt_reclaim.errors import VirtReclaimError

AGENT_CHANNEL = "org.qemu.guest_agent.0"
# The <source> attribute that holds the path, by disk type.
_PATH_ATTRIBUTE = {"file": "file", "block": "dev", "dir": "dir"}


class DomainXMLError(VirtReclaimError, ValueError):
    """The text is not a libvirt domain description we can read."""


@dataclass(frozen=True)
class BackingLayer:
    """One ``<backingStore>`` below a disk's top image, as libvirt describes it."""

    type: str
    format: str | None
    source: str | None


@dataclass(frozen=True)
class DiskSpec:
    """A ``<disk>`` of a domain.

    ``source`` is the path for file disks, the device for block disks, the
    folder for dir disks, ``protocol:name`` for network disks and
    ``pool/volume`` for volume disks; None when there is no medium.
    """

    target: str
    device: str
    type: str
    format: str | None
    source: str | None
    readonly: bool
    shareable: bool
    discard: str | None
    encrypted: bool
    backing: tuple[BackingLayer, ...]
    detect_zeroes: str | None = None

    @property
    def chain(self) -> tuple[str | None, ...]:
        """The disk's images, top first, then its backing stores (None for one without a path)."""
        return (self.source, *(layer.source for layer in self.backing))

    @property
    def zeros_become_holes(self) -> bool:
        """True when QEMU turns zeros the guest writes into holes (no host space used)."""
        return self.detect_zeroes in ("on", "unmap")

    @property
    def is_file_qcow2(self) -> bool:
        """True for a disk (not a cdrom or floppy) whose top image is a qcow2 file."""
        return (
            self.device == "disk"
            and self.type == "file"
            and self.format == "qcow2"
            and self.source is not None
        )


@dataclass(frozen=True)
class DomainSpec:
    """The parts of a domain's XML that virt-reclaim works with.

    ``agent_state`` is libvirt's view of the guest agent channel in the live
    XML: ``connected`` or ``disconnected``; None when the domain has no agent
    channel or is not running.
    """

    name: str
    uuid: str
    disks: tuple[DiskSpec, ...]
    has_agent_channel: bool
    agent_state: str | None


def parse_domain(xml: str) -> DomainSpec:
    """Parse a libvirt domain XML document.

    Raises:
        DomainXMLError: The document is not well formed or not a ``<domain>``.
    """
    try:
        root = ET.fromstring(xml)  # noqa: S314 - the XML comes from libvirtd, not a guest
    except ET.ParseError as exc:
        raise DomainXMLError(f"domain XML is not well formed: {exc}") from exc
    if root.tag != "domain":
        raise DomainXMLError(f"expected a <domain> document, got <{root.tag}>")
    has_channel, agent_state = _agent_channel(root)
    return DomainSpec(
        name=root.findtext("name", default=""),
        uuid=root.findtext("uuid", default=""),
        disks=tuple(_disk(el) for el in root.findall("./devices/disk")),
        has_agent_channel=has_channel,
        agent_state=agent_state,
    )


def _disk(el: ET.Element) -> DiskSpec:
    disk_type = el.get("type", "file")
    driver = el.find("driver")
    target = el.find("target")
    source = el.find("source")
    encrypted = el.find("encryption") is not None or (
        source is not None and source.find("encryption") is not None
    )
    return DiskSpec(
        target=target.get("dev", "") if target is not None else "",
        device=el.get("device", "disk"),
        type=disk_type,
        format=driver.get("type") if driver is not None else None,
        source=_source(disk_type, source),
        readonly=el.find("readonly") is not None,
        shareable=el.find("shareable") is not None,
        discard=driver.get("discard") if driver is not None else None,
        encrypted=encrypted,
        backing=_backing_chain(el),
        detect_zeroes=driver.get("detect_zeroes") if driver is not None else None,
    )


def _source(disk_type: str, source: ET.Element | None) -> str | None:
    if source is None:
        return None
    if disk_type in _PATH_ATTRIBUTE:
        return source.get(_PATH_ATTRIBUTE[disk_type])
    if disk_type == "network":
        protocol, name = source.get("protocol"), source.get("name")
        return f"{protocol}:{name}" if protocol and name else None
    if disk_type == "volume":
        pool, volume = source.get("pool"), source.get("volume")
        return f"{pool}/{volume}" if pool and volume else None
    return None


def _backing_chain(disk: ET.Element) -> tuple[BackingLayer, ...]:
    layers: list[BackingLayer] = []
    store = disk.find("backingStore")
    # An empty <backingStore/> marks the end of the chain.
    while store is not None and store.get("type") is not None:
        fmt = store.find("format")
        layer_type = store.get("type", "file")
        layers.append(
            BackingLayer(
                type=layer_type,
                format=fmt.get("type") if fmt is not None else None,
                source=_source(layer_type, store.find("source")),
            )
        )
        store = store.find("backingStore")
    return tuple(layers)


def _agent_channel(root: ET.Element) -> tuple[bool, str | None]:
    for channel in root.findall("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return True, target.get("state")
    return False, None
