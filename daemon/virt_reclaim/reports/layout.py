"""What the new image's layout costs the guest: read speed by compression and cluster size.

``plan`` shows it per disk beside the estimated size; ``check`` warns of compression
with clusters above 64 KiB. The figures were measured on the reference host
(qemu-img 7.2, 2 cores, reads of log-like text at queue depth 1; see
``docs/rewrite-facts.md``): a compressed cluster is read and inflated
whole, so with 2 MiB clusters each 4 KiB read inflates 2 MiB. Clusters the guest
writes again are stored uncompressed, so the cost fades where the guest rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

from virt_reclaim.image.qemu_img_argv import DEFAULT_CLUSTER
from virt_reclaim.units import KIB, MIB

# (compression, cluster size) -> (64K sequential MiB/s, random 4K IOPS), measured.
MEASURED: dict[tuple[str, int], tuple[int, int]] = {
    ("none", 64 * KIB): (858, 11_500),
    ("zstd", 64 * KIB): (250, 3_700),
    ("zlib", 64 * KIB): (180, 2_600),
    ("zstd", 2 * MIB): (17, 248),
    ("zlib", 2 * MIB): (6, 100),
}
UNCOMPRESSED_IOPS = MEASURED[("none", 64 * KIB)][1]


@dataclass(frozen=True)
class Layout:
    """The new image's layout and what it costs to read (``plan --json``'s ``layout``)."""

    cluster_size: int
    compression: str
    preallocation: str
    random_read_iops: int | None  # measured random 4K reads at QD1; None where not measured
    read_cost: str  # in words, for a person

    def to_json(self) -> dict[str, object]:
        """The layout as ``plan --json`` prints it."""
        return {
            "cluster_size": self.cluster_size,
            "compression": self.compression,
            "preallocation": self.preallocation,
            "random_read_iops": self.random_read_iops,
            "read_cost": self.read_cost,
        }


def size_text(size: int) -> str:
    """64K, 2M: how cluster sizes are written in qemu-img's options."""
    return f"{size // MIB}M" if size >= MIB and size % MIB == 0 else f"{size // KIB}K"


def describe(compression: str, cluster_size: int | None, preallocation: str = "off") -> Layout:
    """The layout a rewrite with these settings produces, and its read cost."""
    cluster = cluster_size or DEFAULT_CLUSTER
    measured = MEASURED.get((compression, cluster))
    iops = measured[1] if measured else None
    what = f"{compression}, {size_text(cluster)} clusters"
    if compression == "none":
        cost = (
            f"{what}: random 4K reads ~{UNCOMPRESSED_IOPS:,} IOPS, sequential ~{measured[0]} MiB/s"
            if measured
            else f"{what}: reads about as fast as 64K uncompressed (~{UNCOMPRESSED_IOPS:,} IOPS); "
            "larger clusters mean fewer allocations on first writes"
        )
    elif measured:
        cost = (
            f"{what}: random 4K reads ~{iops:,} IOPS vs {UNCOMPRESSED_IOPS:,} uncompressed, "
            f"sequential ~{measured[0]} MiB/s vs {MEASURED[('none', 64 * KIB)][0]}"
        )
        if cluster > DEFAULT_CLUSTER:
            cost += f" (each 4K read inflates a whole {size_text(cluster)} cluster)"
    elif cluster > DEFAULT_CLUSTER:
        cost = (
            f"{what}: not measured; each 4K read inflates a whole {size_text(cluster)} cluster: "
            f"between ~{MEASURED[(compression, 64 * KIB)][1]:,} IOPS (64K) and "
            f"~{MEASURED[(compression, 2 * MIB)][1]:,} (2M), vs {UNCOMPRESSED_IOPS:,} uncompressed"
        )
    else:
        cost = (
            f"{what}: not measured; near the 64K figure (~{MEASURED[(compression, 64 * KIB)][1]:,}"
            f" IOPS vs {UNCOMPRESSED_IOPS:,} uncompressed), compressing a little less"
        )
    if preallocation == "metadata":
        cost += "; metadata preallocated: faster first writes, a larger file"
    return Layout(cluster, compression, preallocation, iops, cost)


def compressed_large_clusters(compression: str, cluster_size: int | None) -> str | None:
    """Why compression with clusters above 64 KiB is a bad idea, or None when it is not that."""
    if compression == "none" or cluster_size is None or cluster_size <= DEFAULT_CLUSTER:
        return None
    return (
        f"compression {compression} with {size_text(cluster_size)} clusters: a random 4K read "
        f"inflates a whole cluster ({compression}, 2M clusters measured "
        f"~{MEASURED[(compression, 2 * MIB)][1]:,} IOPS vs "
        f"~{MEASURED[(compression, 64 * KIB)][1]:,} at 64K); 64KiB or less keeps reads fast"
    )
