"""domxml against XML as libvirt itself writes it (normalized by the test driver)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from virt_reclaim.domxml import read
from virt_reclaim.domxml.read import BackingLayer

SHAPES = """<domain type='test'><name>shapes</name><memory>1024</memory>
<os><type>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
  <source file='/img/top.qcow2'/>
  <backingStore type='file'><format type='qcow2'/><source file='/img/mid.qcow2'/>
    <backingStore type='file'><format type='raw'/><source file='/img/base.raw'/></backingStore>
  </backingStore>
  <target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='/img/plain.raw'/><target dev='vdb' bus='virtio'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/>
  <target dev='vdc' bus='virtio'/><shareable/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/></source>
  <target dev='vdd' bus='virtio'/></disk>
<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
  <source pool='default' volume='v.qcow2'/><target dev='vde' bus='virtio'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
  <target dev='sda' bus='sata'/><readonly/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
  <source file='/iso/install.iso'/><target dev='sdb' bus='sata'/><readonly/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""

NO_DISKS = """<domain type='test'><name>diskless</name><memory>1024</memory>
<os><type>hvm</type></os><devices/></domain>"""


@pytest.fixture(scope="module")
def test_driver() -> Iterator[Any]:
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def normalized(conn: Any, xml: str) -> str:
    """Define the XML on the test driver and read back what libvirt writes."""
    dom = conn.defineXML(xml)
    try:
        return str(dom.XMLDesc(0))
    finally:
        dom.undefine()


@pytest.fixture(scope="module")
def shapes(test_driver: Any) -> read.DomainSpec:
    return read.parse_domain(normalized(test_driver, SHAPES))


def disk(spec: read.DomainSpec, target: str) -> read.DiskSpec:
    return next(d for d in spec.disks if d.target == target)


def test_file_qcow2_with_backing_chain(shapes: read.DomainSpec) -> None:
    vda = disk(shapes, "vda")
    assert (vda.type, vda.device, vda.format, vda.source) == (
        "file",
        "disk",
        "qcow2",
        "/img/top.qcow2",
    )
    assert vda.discard == "unmap"
    assert vda.backing == (
        BackingLayer("file", "qcow2", "/img/mid.qcow2"),
        BackingLayer("file", "raw", "/img/base.raw"),
    )
    assert vda.is_file_qcow2


def test_raw_file_is_not_qcow2(shapes: read.DomainSpec) -> None:
    vdb = disk(shapes, "vdb")
    assert (vdb.type, vdb.format, vdb.source) == ("file", "raw", "/img/plain.raw")
    assert vdb.backing == ()
    assert not vdb.is_file_qcow2


def test_block_device(shapes: read.DomainSpec) -> None:
    vdc = disk(shapes, "vdc")
    assert (vdc.type, vdc.source, vdc.shareable) == ("block", "/dev/sdz", True)
    assert not vdc.is_file_qcow2


def test_network_disk(shapes: read.DomainSpec) -> None:
    vdd = disk(shapes, "vdd")
    assert (vdd.type, vdd.source) == ("network", "rbd:pool/img")
    assert not vdd.is_file_qcow2


def test_volume_disk(shapes: read.DomainSpec) -> None:
    vde = disk(shapes, "vde")
    assert (vde.type, vde.format, vde.source) == ("volume", "qcow2", "default/v.qcow2")
    assert not vde.is_file_qcow2


def test_cdrom_with_and_without_medium(shapes: read.DomainSpec) -> None:
    empty, iso = disk(shapes, "sda"), disk(shapes, "sdb")
    assert (empty.device, empty.source, empty.readonly) == ("cdrom", None, True)
    assert (iso.device, iso.source) == ("cdrom", "/iso/install.iso")
    assert not iso.is_file_qcow2


def test_agent_channel_without_live_state(shapes: read.DomainSpec) -> None:
    assert shapes.name == "shapes"
    assert len(shapes.uuid) == 36
    assert shapes.has_agent_channel
    assert shapes.agent_state is None


def test_domain_without_disks(test_driver: Any) -> None:
    spec = read.parse_domain(normalized(test_driver, NO_DISKS))
    assert spec.disks == ()
    assert not spec.has_agent_channel


def test_live_agent_state_and_end_of_chain_marker() -> None:
    # The shape of a running domain's live XML: an empty <backingStore/> ends the
    # chain and the agent channel carries its state.
    xml = """<domain type='kvm'><name>live</name><uuid>u</uuid><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/img/a.qcow2' index='1'/><backingStore/>
        <target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
      <channel type='unix'><source mode='bind' path='/run/x.sock'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
      </devices></domain>"""
    spec = read.parse_domain(xml)
    assert spec.disks[0].backing == ()
    assert spec.agent_state == "connected"


def test_encryption_is_seen_in_either_place() -> None:
    old = """<domain><name>e</name><devices><disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/a'/><target dev='vda'/>
      <encryption format='luks'><secret type='passphrase' uuid='x'/></encryption>
      </disk></devices></domain>"""
    new = """<domain><name>e</name><devices><disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/a'>
      <encryption format='luks'><secret type='passphrase' uuid='x'/></encryption></source>
      <target dev='vda'/></disk></devices></domain>"""
    assert read.parse_domain(old).disks[0].encrypted
    assert read.parse_domain(new).disks[0].encrypted


@pytest.mark.parametrize("text", ["", "<domain>", "<network><name>n</name></network>"])
def test_bad_documents_raise_domain_xml_error(text: str) -> None:
    with pytest.raises(read.DomainXMLError):
        read.parse_domain(text)
