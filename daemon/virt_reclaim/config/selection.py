"""Which policy selects which domain: names and globs, UUIDs, exclusions, <metadata>, priority."""

from __future__ import annotations

import fnmatch
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from virt_reclaim.config.policy import Match, Policy


def matches(match: Match, name: str, uuid: str, xml: str) -> bool:
    """True when ``match`` selects the domain (exclusions win)."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in match.exclude):
        return False
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in match.names):
        return True
    if uuid.lower() in match.uuids:
        return True
    return match.metadata is not None and _metadata_matches(match, xml)


def _metadata_matches(match: Match, xml: str) -> bool:
    assert match.metadata is not None  # noqa: S101 - checked by the caller
    try:
        root = ET.fromstring(xml)  # noqa: S314 - the XML comes from libvirtd
    except ET.ParseError:
        return False
    tag = f"{{{match.metadata.namespace}}}{match.metadata.element}"
    for element in root.findall(f"./metadata/{tag}"):
        if match.metadata.value is None or (element.text or "").strip() == match.metadata.value:
            return True
    return False


@dataclass(frozen=True)
class Selection:
    """The policy that governs a domain, or why none or no single one does."""

    policy: Policy | None
    conflict: tuple[str, ...] = ()


def select(policies: Sequence[Policy], name: str, uuid: str, xml: str) -> Selection:
    """The enabled policy with the highest priority that matches; a tie is a conflict."""
    found = [p for p in policies if p.enabled and matches(p.match, name, uuid, xml)]
    if not found:
        return Selection(None)
    top = max(p.priority for p in found)
    best = [p for p in found if p.priority == top]
    if len(best) > 1:
        return Selection(None, tuple(p.name for p in best))
    return Selection(best[0])
