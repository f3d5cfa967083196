"""The XML documents BlockJobs sends libvirt, and its reading of a mirror's readiness."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from virt_reclaim.domxml.blockjob import copy_destination_xml, mirror_ready, snapshot_xml
from virt_reclaim.model import BlockJob


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - our own output


def disks_of(xml: str) -> list[dict[str, str | None]]:
    root = parse(xml)
    assert root.tag == "domainsnapshot"
    result = []
    for disk in root.findall("./disks/disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        result.append(
            {
                "name": disk.get("name"),
                "snapshot": disk.get("snapshot"),
                "type": disk.get("type"),
                "driver": driver.get("type") if driver is not None else None,
                "file": source.get("file") if source is not None else None,
            }
        )
    return result


def test_named_targets_get_overlays_and_every_other_disk_is_left_out() -> None:
    xml = snapshot_xml({"vdb": "/images/b.ov1"}, ["vda", "vdb", "sda"])

    assert disks_of(xml) == [
        {"name": "vda", "snapshot": "no", "type": None, "driver": None, "file": None},
        {"name": "vdb", "snapshot": "external", "type": "file", "driver": "qcow2",
         "file": "/images/b.ov1"},
        {"name": "sda", "snapshot": "no", "type": None, "driver": None, "file": None},
    ]  # fmt: skip


def test_several_overlays_and_repeated_or_empty_targets() -> None:
    xml = snapshot_xml({"vda": "/a/1", "vdc": "/c/1"}, ["vda", "", "vdc", "vda"])

    assert [(d["name"], d["snapshot"], d["file"]) for d in disks_of(xml)] == [
        ("vda", "external", "/a/1"),
        ("vdc", "external", "/c/1"),
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/var/lib/libvirt/images/with space.qcow2",
        "/images/quote'and\"double.qcow2",
        "/images/a&b<c>d.qcow2",
        "/images/&amp;already-escaped.qcow2",
        "/images/ünïcødé-😀.qcow2",
        "/images/new\nline\tand tab.qcow2",
        "/images/]]>cdata-end.qcow2",
    ],
)
def test_odd_paths_reach_libvirt_unchanged(path: str) -> None:
    [disk] = disks_of(snapshot_xml({"vda": path}, ["vda"]))
    assert disk["file"] == path

    source = parse(copy_destination_xml(path, "qcow2")).find("source")
    assert source is not None
    assert source.get("file") == path


def test_odd_target_names_are_escaped() -> None:
    [disk] = disks_of(snapshot_xml({"x'\"<&>": "/p"}, ["x'\"<&>"]))
    assert disk["name"] == "x'\"<&>"


@pytest.mark.parametrize(
    ("overlays", "targets", "message"),
    [
        ({}, ["vda"], "no disk to snapshot"),
        ({"vdz": "/p"}, ["vda"], "no disk with target vdz"),
        ({"vda": "relative.qcow2"}, ["vda"], "not an absolute path"),
        ({"vda": "/images/nul\0.qcow2"}, ["vda"], "XML cannot carry"),
        ({"vda": "/images/bell\x07.qcow2"}, ["vda"], "XML cannot carry"),
        ({"vda": "/images/undecodable-\udcff.qcow2"}, ["vda"], "XML cannot carry"),
        ({"vda": "/p"}, ["vda", "vd\x01"], "XML cannot carry"),
    ],
)
def test_what_libvirt_could_not_be_told_is_refused(
    overlays: dict[str, str], targets: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        snapshot_xml(overlays, targets)


def test_copy_destination_names_file_and_format() -> None:
    disk = parse(copy_destination_xml("/images/ov2.qcow2", "raw"))
    assert disk.tag == "disk"
    assert disk.get("type") == "file"
    driver = disk.find("driver")
    assert driver is not None
    assert driver.get("type") == "raw"


@pytest.mark.parametrize(
    ("path", "image_format"),
    [("ov2.qcow2", "qcow2"), ("/ov2", "qcow2' x='1"), ("/ov2", ""), ("/bad\0", "qcow2")],
)
def test_copy_destination_refuses_what_it_cannot_say(path: str, image_format: str) -> None:
    with pytest.raises(ValueError):
        copy_destination_xml(path, image_format)


LIVE_XML = """<domain type='qemu'><name>g</name><devices>
  <disk type='file' device='disk'>
    <source file='/img/vda.ov1'/>
    <target dev='vda' bus='virtio'/>
    <mirror type='file' file='/img/vda.ov2' format='qcow2' job='copy' ready='{ready}'>
      <format type='qcow2'/><source file='/img/vda.ov2'/>
    </mirror>
  </disk>
  <disk type='file' device='disk'>
    <source file='/img/vdb.qcow2'/>
    <target dev='vdb' bus='virtio'/>
  </disk>
</devices></domain>"""


@pytest.mark.parametrize(("ready", "expected"), [("yes", True), ("pivot", False), ("abort", False)])
def test_mirror_is_ready_only_when_libvirt_says_yes(ready: str, expected: bool) -> None:
    assert mirror_ready(LIVE_XML.format(ready=ready), "vda") is expected


def test_no_mirror_or_no_such_disk_is_not_ready() -> None:
    xml = LIVE_XML.format(ready="yes")
    assert mirror_ready(xml, "vdb") is False
    assert mirror_ready(xml, "vdz") is False
    assert mirror_ready(xml.replace(" ready='yes'", ""), "vda") is False


def test_block_job_is_complete_only_at_a_nonzero_end() -> None:
    assert BlockJob("copy", 5, 5, 0).complete
    assert not BlockJob("copy", 4, 5, 0).complete
    assert not BlockJob("copy", 0, 0, 0).complete
