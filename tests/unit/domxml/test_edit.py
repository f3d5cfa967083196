"""Changes to a persistent definition: only the named disks change, and only as planned."""

from __future__ import annotations

import pytest

from virt_reclaim.domxml import edit, read

DOMAIN = """<domain type='kvm'>
  <name>web-1</name>
  <uuid>0b3c4a6e-1111-2222-3333-444455556666</uuid>
  <metadata>
    <ops:owner xmlns:ops="http://example.org/ops">team &amp; co</ops:owner>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web-1.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap' detect_zeroes='unmap'/>
      <source file='/var/lib/libvirt/images/web-1-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/nodriver.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def disks(xml: str) -> dict[str, read.DiskSpec]:
    return {d.target: d for d in read.parse_domain(xml).disks}


def test_discard_is_turned_on_where_it_is_missing_and_nothing_else_changes() -> None:
    new, changed = edit.with_discard(DOMAIN, ["vda", "vdb", "vdc"])

    assert changed == ["vda", "vdc"]  # vdb had both already
    after = disks(new)
    for target in ("vda", "vdb", "vdc"):
        assert (after[target].discard, after[target].detect_zeroes) == ("unmap", "unmap")
    assert after["vda"].format == "raw"
    assert 'cache="none"' in new
    assert after["vdd"] == disks(DOMAIN)["vdd"]
    # The metadata keeps its prefix and text: policies match on it.
    assert '<ops:owner xmlns:ops="http://example.org/ops">team &amp; co</ops:owner>' in new
    assert edit.with_discard(new, ["vda", "vdb", "vdc"]) == (new, [])


def test_a_disk_gone_from_the_definition_stops_the_change() -> None:
    with pytest.raises(edit.DefinitionChanged, match="vdz"):
        edit.with_discard(DOMAIN, ["vdz"])


def test_a_converted_disk_names_its_new_image_and_format() -> None:
    images = "/var/lib/libvirt/images"
    change = edit.NewSource("vda", f"{images}/web-1.raw", f"{images}/web-1.qcow2")

    new = edit.with_new_sources(DOMAIN, [change])

    after = disks(new)
    assert (after["vda"].source, after["vda"].format) == (f"{images}/web-1.qcow2", "qcow2")
    assert 'cache="none"' in new
    assert {t: after[t] for t in ("vdb", "vdc", "vdd")} == {
        t: disks(DOMAIN)[t] for t in ("vdb", "vdc", "vdd")}  # fmt: skip


def test_a_disk_that_changed_since_the_plan_is_not_pointed_elsewhere() -> None:
    moved = edit.NewSource("vda", "/elsewhere/web-1.raw", "/elsewhere/web-1.qcow2")
    with pytest.raises(edit.DefinitionChanged, match="now names /var/lib/libvirt/images/"):
        edit.with_new_sources(DOMAIN, [moved])
    block = edit.NewSource("vdd", "/dev/vg/web", "/dev/vg/web.qcow2")
    with pytest.raises(edit.DefinitionChanged, match="no longer a file disk"):
        edit.with_new_sources(DOMAIN, [block])


def test_what_is_not_a_domain_is_refused() -> None:
    with pytest.raises(read.DomainXMLError):
        edit.with_discard("<network/>", [])
    with pytest.raises(read.DomainXMLError):
        edit.with_discard("<domain", [])
