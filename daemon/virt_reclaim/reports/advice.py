"""What ``check`` points out: settings that cost the guest, disks a policy setting would help.

Warnings and notes, never errors: the configuration is valid either way.
"""

from __future__ import annotations

from virt_reclaim.config.policy import Policy
from virt_reclaim.domxml import edit, read
from virt_reclaim.job.modes import conversion
from virt_reclaim.reports import layout


def costly_settings(policy: Policy) -> list[str]:
    """Settings of ``policy`` that are valid but costly."""
    warnings = []
    cluster = None if policy.rewrite.cluster_size is None else int(policy.rewrite.cluster_size)
    slow = layout.compressed_large_clusters(str(policy.rewrite.compression), cluster)
    if slow is not None:
        warnings.append(f"rewrite: {slow}")
    return warnings


def disk_notes(policy: Policy, xml: str) -> list[str]:
    """For each disk of a domain ``policy`` selects: what a setting would change for it."""
    try:
        spec = read.parse_domain(xml)
    except read.DomainXMLError:
        return []
    notes = []
    for disk in spec.disks:
        if disk.device != "disk" or disk.type != "file" or disk.readonly or disk.shareable:
            continue
        if disk.format in conversion.CONVERTIBLE_FORMATS:
            notes.append(
                f"{disk.target}: a {disk.format} image, converted to qcow2 at its next offline job"
                if policy.rewrite.convert
                else f"{disk.target}: a {disk.format} image, skipped; rewrite.convert = true "
                "converts it to qcow2"
            )
        elif disk.format == "qcow2" and edit.lacks_discard(disk.discard, disk.detect_zeroes):
            notes.append(discard_note(disk, enabled=policy.guest.enable_discard))
    return notes


def discard_note(disk: read.DiskSpec, *, enabled: bool) -> str:
    """Why discard would help ``disk``, and whether the policy turns it on."""
    lacking = " and ".join(
        f"{name}='unmap'"
        for name, value in (("discard", disk.discard), ("detect_zeroes", disk.detect_zeroes))
        if value != edit.UNMAP
    )
    if disk.discard == edit.UNMAP:
        why = "zeros the guest writes take host space"
    else:
        why = "a trim frees nothing on the host: every reclaim zero-fills (slower, grows it first)"
    then = (
        "the policy turns it on at its next offline job"
        if enabled
        else "guest.enable_discard = true turns it on at the next offline job"
    )
    return f"{disk.target}: no {lacking}: {why}; {then}"
