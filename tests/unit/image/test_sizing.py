"""The estimate's arithmetic, case by case: each figure worked out by hand from the inputs.

A disk of 1 GiB with 64 KiB clusters: the fresh image's metadata bound is
1 GiB / 8 KiB + 4 clusters = 384 KiB (``OVERHEAD``). The last test reads a real image:
its map from the real qemu-img, its clusters sampled from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fakes import MIB, make_image
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.image.qemu_img_argv import Extent
from virt_reclaim.image.sizing import (
    ClusterSample,
    ImageContent,
    SizeEstimate,
    content_of,
    estimate_after,
    metadata_bytes,
    sample_image,
    sample_offsets,
    split_stored,
)

CLUSTER = 64 * 1024
GIB = 1024 * MIB
OVERHEAD = 384 * 1024
# A sample whose clusters compress to half and are all data.
HALF = ClusterSample(compressed=(0.5,) * 4, uncompressed=(1.0,) * 4)


def test_the_metadata_bound_of_a_fresh_image() -> None:
    assert metadata_bytes(GIB, CLUSTER) == OVERHEAD
    assert metadata_bytes(0, CLUSTER) == 4 * CLUSTER


@pytest.mark.parametrize(
    ("extent", "plain", "compressed"),
    [
        (Extent(0, MIB, 0, True, False, 5 * MIB), MIB, 0),  # data stored in place
        (Extent(0, MIB, 0, True, False, None), 0, MIB),  # compressed: no offset to read
        (Extent(0, MIB, 1, True, False, 5 * MIB), 0, 0),  # a backing layer's data
        (Extent(0, MIB, 0, True, True, None), 0, 0),  # zero clusters
        (Extent(0, MIB, 0, False, False, None), 0, 0),  # a hole
    ],
    ids=["plain", "compressed", "backing", "zero", "hole"],
)
def test_the_content_counts_only_the_top_layers_data(
    extent: Extent, plain: int, compressed: int
) -> None:
    assert content_of([extent, extent]) == ImageContent(2 * plain, 2 * compressed)


@pytest.mark.parametrize(
    ("extents", "samples", "offsets"),
    [
        ([], 128, []),
        ([Extent(0, MIB, 0, True, False, None)], 128, []),  # compressed only: nothing to read
        # 4 clusters, 2 samples: the middle of each half, rounded down to its cluster.
        ([Extent(0, 4 * CLUSTER, 0, True, False, MIB)], 2, [MIB + CLUSTER, MIB + 3 * CLUSTER]),
        # One cluster in each of two extents far apart in the file: one sample each.
        (
            [
                Extent(0, CLUSTER, 0, True, False, MIB),
                Extent(CLUSTER, CLUSTER, 0, True, False, 9 * MIB),
            ],
            128,
            [MIB, 9 * MIB],
        ),
        # Less than a cluster of data still gives one sample.
        ([Extent(0, 4096, 0, True, False, MIB)], 128, [MIB]),
        # A backing layer's extent is not in this file: skipped.
        (
            [
                Extent(0, CLUSTER, 1, True, False, MIB),
                Extent(CLUSTER, CLUSTER, 0, True, False, 2 * MIB),
            ],
            128,
            [2 * MIB],
        ),
    ],
    ids=["none", "compressed", "spread", "two-extents", "small", "backing"],
)
def test_samples_are_spread_over_the_plain_data(
    extents: list[Extent], samples: int, offsets: list[int]
) -> None:
    assert sample_offsets(extents, CLUSTER, samples) == offsets


def test_sampled_clusters_are_stored_as_qcow2_would(tmp_path: Path) -> None:
    """Zero: nothing; random: a whole cluster; repeated bytes: one sector; past the end: none."""
    image = tmp_path / "clusters"
    image.write_bytes(bytes(CLUSTER) + os.urandom(CLUSTER) + b"a" * CLUSTER)
    sample = sample_image(str(image), [0, CLUSTER, 2 * CLUSTER, 3 * CLUSTER], CLUSTER)
    assert sample == ClusterSample(
        compressed=(0.0, 1.0, 512 / CLUSTER), uncompressed=(0.0, 1.0, 1.0)
    )
    assert sample.ratios(compressed=True) == sample.compressed
    assert sample.ratios(compressed=False) == sample.uncompressed


@pytest.mark.parametrize(
    ("arguments", "stored"),
    [
        (((), 0, 0, 0, 0), (0.0, 0.0)),
        # The garbage takes the worst-compressing half first.
        (((0.5, 1.0), 200, 0, 0, 100), (50.0, 100.0)),
        # No sample: plain data counts whole; compressed clusters at what they occupy.
        (((), 100, 100, 25, 150), (12.5, 112.5)),
        # More garbage than data: all of it is garbage.
        (((0.5,), 100, 0, 0, 1000), (0.0, 50.0)),
        # No garbage: all live.
        (((0.25, 0.75), 100, 0, 0, 0), (50.0, 0.0)),
    ],
    ids=["empty", "worst-first", "unsampled", "all-garbage", "all-live"],
)
def test_the_stored_bytes_split_between_live_data_and_garbage(
    arguments: tuple[tuple[float, ...], int, int, int, int], stored: tuple[float, float]
) -> None:
    """Arguments: sampled ratios, plain bytes, compressed bytes, their stored bytes, garbage."""
    assert split_stored(*arguments) == stored


# Keyword arguments of estimate_after, and the SizeEstimate each case must give.
CASES: dict[str, tuple[dict[str, Any], SizeEstimate]] = {
    "shut off, uncompressed: all of it stays": (
        {"allocated": 101 * MIB, "guest_used": None, "compressed": False},
        SizeEstimate(100 * MIB + OVERHEAD, "allocation", 1.0, 0.0),
    ),
    "shut off, compressed: the sample's ratio": (
        {"allocated": 101 * MIB, "guest_used": None, "compressed": True},
        SizeEstimate(50 * MIB + OVERHEAD, "allocation", 0.5, 0.0),
    ),
    "guest uses 40 MiB, a trim frees the rest": (
        {"guest_used": 40 * MIB, "freed_share": 1.0},
        SizeEstimate(40 * MIB + OVERHEAD, "sample", 1.0, 1.0),
    ),
    "half of the garbage freed": (
        {"guest_used": 40 * MIB, "freed_share": 0.5},
        SizeEstimate(70 * MIB + OVERHEAD, "sample", 1.0, 0.5),
    ),
    "nothing can free the garbage": (
        {"guest_used": 40 * MIB, "freed_share": 0.0},
        SizeEstimate(100 * MIB + OVERHEAD, "sample", 1.0, 0.0),
    ),
    "a share above 1 is 1": (
        {"guest_used": 40 * MIB, "freed_share": 1.7},
        SizeEstimate(40 * MIB + OVERHEAD, "sample", 1.0, 1.0),
    ),
    "a share below 0 is 0": (
        {"guest_used": 40 * MIB, "freed_share": -0.2},
        SizeEstimate(100 * MIB + OVERHEAD, "sample", 1.0, 0.0),
    ),
    "the guest uses more than the image holds": (
        {"guest_used": 500 * MIB, "freed_share": 1.0},
        SizeEstimate(100 * MIB + OVERHEAD, "sample", 1.0, 1.0),
    ),
    "the fill reaches half the free space": (
        {"guest_used": 40 * MIB, "freed_share": 1.0, "fill": (30 * MIB, 30 * MIB)},
        SizeEstimate(70 * MIB + OVERHEAD, "sample", 1.0, 0.5),
    ),
    "a fill with no room reaches nothing": (
        {"guest_used": 40 * MIB, "freed_share": 1.0, "fill": (0, 0)},
        SizeEstimate(100 * MIB + OVERHEAD, "sample", 1.0, 0.0),
    ),
    "half the sampled clusters are zeros: they cost nothing": (
        {
            "guest_used": None,
            "sample": ClusterSample(
                compressed=(0.0, 0.0, 0.5, 0.5), uncompressed=(0.0, 0.0, 1.0, 1.0)
            ),
        },
        SizeEstimate(50 * MIB + OVERHEAD, "allocation", 1.0, 0.0),
    ),
    "the domain's last ratio replaces the sample's for the live data": (
        {"guest_used": 40 * MIB, "compressed": True, "history_ratio": 0.25, "freed_share": 1.0},
        SizeEstimate(10 * MIB + OVERHEAD, "history", 0.4, 1.0),
    ),
    "no history without the guest's figure": (
        {"guest_used": None, "compressed": True, "history_ratio": 0.25},
        SizeEstimate(50 * MIB + OVERHEAD, "allocation", 0.5, 0.0),
    ),
    "never larger than the image is now": (
        {"allocated": 100 * MIB + CLUSTER, "guest_used": None},
        SizeEstimate(100 * MIB + CLUSTER, "allocation", 1.0, 0.0),
    ),
    "compressed clusters, rewritten compressed: what they occupy": (
        {
            "allocated": 20 * MIB,
            "content": ImageContent(0, 80 * MIB),
            "sample": ClusterSample((), ()),
            "compressed": True,
            "guest_used": None,
        },
        SizeEstimate(20 * MIB, "allocation", 0.25, 0.0),
    ),
    "compressed clusters, rewritten uncompressed: inflated, but capped": (
        {
            "allocated": 20 * MIB,
            "content": ImageContent(0, 80 * MIB),
            "sample": ClusterSample((), ()),
            "compressed": False,
            "guest_used": None,
        },
        SizeEstimate(20 * MIB, "allocation", 1.0, 0.0),
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_size_after_the_reclaim(case: str) -> None:
    overrides, expected = CASES[case]
    arguments: dict[str, Any] = {
        "allocated": GIB,
        "virtual_size": GIB,
        "cluster": CLUSTER,
        "content": ImageContent(100 * MIB, 0),
        "sample": HALF,
        "compressed": False,
        "guest_used": None,
        "freed_share": 0.0,
    }
    arguments.update(overrides)
    estimate = estimate_after(**arguments)
    assert estimate.after == expected.after
    assert (estimate.basis, estimate.freed_share) == (expected.basis, expected.freed_share)
    assert estimate.stored_ratio == pytest.approx(expected.stored_ratio)


def test_a_real_images_map_and_clusters(tmp_path: Path) -> None:
    """8 MiB of one repeated byte, 8 MiB of zeros: zeros are no data, a cluster is one sector."""
    image = make_image(tmp_path / "disk.qcow2", "64M", ("write -P 0xab 0 8M", "write -z 16M 8M"))
    extents = QemuImg().map(str(image))
    assert content_of(extents) == ImageContent(8 * MIB, 0)
    offsets = sample_offsets(extents, CLUSTER)
    assert len(offsets) == 128  # 8 MiB holds 128 clusters of 64 KiB: every one sampled
    sample = sample_image(str(image), offsets, CLUSTER)
    assert set(sample.compressed) == {512 / CLUSTER}
    estimate = estimate_after(
        allocated=image.stat().st_blocks * 512,
        virtual_size=64 * MIB,
        cluster=CLUSTER,
        content=content_of(extents),
        sample=sample,
        compressed=True,
        guest_used=None,
        freed_share=0.0,
    )
    assert estimate.after == 128 * 512 + metadata_bytes(64 * MIB, CLUSTER)
