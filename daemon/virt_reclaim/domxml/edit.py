"""Changes to a domain's persistent definition, as pure functions over its XML.

A job changes the definition only while the guest is off, and hands the whole
document to libvirt (``virt.Domain.define_xml``), which replaces the definition
atomically: after a crash the definition is the old one or the new one, both
valid. Only the named disks change; everything else stays as libvirt wrote it
(minidom keeps the namespace prefixes of ``<metadata>``, which ElementTree renames).
Each change is made to the definition read just before it is defined, and checked
against what the job planned on: a definition edited meanwhile is never overwritten
with a stale copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from xml.dom import minidom
from xml.parsers.expat import ExpatError

from virt_reclaim.domxml.read import DomainXMLError
from virt_reclaim.errors import VirtReclaimError

UNMAP = "unmap"


class DefinitionChanged(VirtReclaimError, ValueError):
    """The definition no longer holds what the job planned to change."""


@dataclass(frozen=True)
class NewSource:
    """A disk to point at another image: from ``old_path`` to ``new_path`` in ``new_format``."""

    target: str
    old_path: str
    new_path: str
    new_format: str = "qcow2"


def lacks_discard(discard: str | None, detect_zeroes: str | None) -> bool:
    """True for a disk whose trims do not reach the image, or whose zeros take host space."""
    return discard != UNMAP or detect_zeroes != UNMAP


def with_discard(xml: str, targets: Iterable[str]) -> tuple[str, list[str]]:
    """Set ``discard='unmap'`` and ``detect_zeroes='unmap'`` on the ``<driver>`` of ``targets``.

    With both, a trim in the guest frees the image's clusters and zeros the guest
    writes become holes: the next reclaim trims instead of zero-filling.

    Returns:
        The new document, and the targets it changed (those that lacked either).

    Raises:
        DomainXMLError: Not a domain document.
        DefinitionChanged: A target is no longer a disk of the definition.
    """
    doc = _parse(xml)
    changed = []
    for target in targets:
        disk = _disk(doc, target)
        driver = _child(disk, "driver")
        if driver is None:
            driver = doc.createElement("driver")
            driver.setAttribute("name", "qemu")
            disk.insertBefore(driver, disk.firstChild)
        if not lacks_discard(driver.getAttribute("discard"), driver.getAttribute("detect_zeroes")):
            continue
        # libvirt accepts detect_zeroes='unmap' only together with discard='unmap'.
        driver.setAttribute("discard", UNMAP)
        driver.setAttribute("detect_zeroes", UNMAP)
        changed.append(target)
    return _serialize(doc), changed


def with_new_sources(xml: str, changes: Iterable[NewSource]) -> str:
    """Point each file disk of ``changes`` at its new image and give its driver the new format.

    Raises:
        DomainXMLError: Not a domain document.
        DefinitionChanged: A disk is missing, not a file disk, or no longer on ``old_path``.
    """
    doc = _parse(xml)
    for change in changes:
        disk = _disk(doc, change.target)
        source = _child(disk, "source")
        if disk.getAttribute("type") != "file" or source is None:
            raise DefinitionChanged(f"{change.target}: no longer a file disk")
        current = source.getAttribute("file")
        if current != change.old_path:
            raise DefinitionChanged(
                f"{change.target}: the definition now names {current or 'no file'}, "
                f"not {change.old_path}"
            )
        source.setAttribute("file", change.new_path)
        driver = _child(disk, "driver")
        if driver is None:
            driver = doc.createElement("driver")
            driver.setAttribute("name", "qemu")
            disk.insertBefore(driver, disk.firstChild)
        driver.setAttribute("type", change.new_format)
    return _serialize(doc)


def _parse(xml: str) -> minidom.Document:
    try:
        # The XML comes from libvirtd (the persistent definition), not from a guest.
        doc = minidom.parseString(xml)  # noqa: S318
    except ExpatError as exc:
        raise DomainXMLError(f"domain XML is not well formed: {exc}") from exc
    root = doc.documentElement
    if root is None or root.tagName != "domain":
        raise DomainXMLError(f"expected a <domain> document, got <{_root(doc).tagName}>")
    return doc


def _root(doc: minidom.Document) -> minidom.Element:
    root = doc.documentElement
    if root is None:
        raise DomainXMLError("an empty document")
    return root


def _serialize(doc: minidom.Document) -> str:
    return str(_root(doc).toxml())


def _children(element: minidom.Element, tag: str) -> list[minidom.Element]:
    return [n for n in element.childNodes if n.nodeType == n.ELEMENT_NODE and n.tagName == tag]


def _child(element: minidom.Element, tag: str) -> minidom.Element | None:
    found = _children(element, tag)
    return found[0] if found else None


def _disk(doc: minidom.Document, target: str) -> minidom.Element:
    for devices in _children(_root(doc), "devices"):
        for disk in _children(devices, "disk"):
            dev = _child(disk, "target")
            if dev is not None and dev.getAttribute("dev") == target:
                return disk
    raise DefinitionChanged(f"{target}: no such disk in the definition any more")
