"""Pure builders and readers of the XML that block jobs need; imports nothing of libvirt."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

# XML 1.0 cannot carry other characters, escaped or not (NUL, most control characters,
# and the lone surrogates Python uses for undecodable bytes in file names).
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def snapshot_xml(overlays: Mapping[str, str], targets: Iterable[str]) -> str:
    """The ``<domainsnapshot>`` document of an external disk-only snapshot.

    Args:
        overlays: Disk target (``vda``) to the absolute path of its new qcow2 overlay.
        targets: Every disk target of the domain; those without an overlay get
            ``snapshot='no'``, so that libvirt invents no overlay for them.

    Raises:
        ValueError: There is no overlay, an overlay is for a target not in ``targets``,
            a path is relative, or a name holds a character XML cannot carry.
    """
    ordered = list(dict.fromkeys(t for t in targets if t))
    if not overlays:
        raise ValueError("no disk to snapshot")
    unknown = sorted(set(overlays) - set(ordered))
    if unknown:
        raise ValueError(f"no disk with target {', '.join(unknown)}")
    for target, path in overlays.items():
        if not path.startswith("/"):
            raise ValueError(f"the overlay of {target} is not an absolute path: {path!r}")
    for text in [*ordered, *overlays.values()]:
        _check_xml_text(text)
    root = ET.Element("domainsnapshot")
    disks = ET.SubElement(root, "disks")
    for target in ordered:
        if target in overlays:
            disk = ET.SubElement(disks, "disk", name=target, snapshot="external", type="file")
            ET.SubElement(disk, "driver", type="qcow2")
            ET.SubElement(disk, "source", file=overlays[target])
        else:
            ET.SubElement(disks, "disk", name=target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def copy_destination_xml(path: str, image_format: str) -> str:
    """The ``<disk>`` document naming a block copy's destination file.

    Raises:
        ValueError: The path is relative, the format is not a plain word, or a character
            cannot be carried in XML.
    """
    if not path.startswith("/"):
        raise ValueError(f"the copy destination is not an absolute path: {path!r}")
    if not re.fullmatch("[a-z0-9]+", image_format):
        raise ValueError(f"not an image format: {image_format!r}")
    _check_xml_text(path)
    disk = ET.Element("disk", type="file")
    ET.SubElement(disk, "driver", type=image_format)
    ET.SubElement(disk, "source", file=path)
    return ET.tostring(disk, encoding="unicode")


def mirror_ready(domain_xml: str, target: str) -> bool:
    """True when the live XML shows the disk's copy or active commit ready to pivot.

    libvirt marks it ``<mirror ready='yes'>`` once QEMU said so; while a pivot or an
    abort is under way the value is ``pivot`` or ``abort``.
    """
    root = ET.fromstring(domain_xml)  # noqa: S314 - the XML comes from libvirtd, not a guest
    for disk in root.findall("./devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            mirror = disk.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


def _check_xml_text(text: str) -> None:
    bad = _NOT_XML_CHAR.search(text)
    if bad:
        raise ValueError(f"{text!r} holds {bad.group()!r}, which XML cannot carry")
