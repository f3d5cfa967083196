"""How large a disk's image will be after a reclaim: the figure min_gain and the queue rely on.

The estimate has three parts, each from a measurement rather than a guess:
- what the image holds now, from ``qemu-img map``: data clusters stored plain
  (readable in place) and compressed ones (already small);
- how well that data compresses: a sample of the plain clusters, read from the
  image file and compressed cluster by cluster as qcow2 does, zero clusters counted
  as nothing (a rewrite drops them);
- how much of it the guest still uses (``guest-get-fsinfo``) and how much of the
  rest the free-space step will really free (all of it with a trim on a disk that
  passes discards, what the bounded zero-fill reaches, or nothing).
Where this domain was reclaimed before with the same compression, the ratio it
really reached (bytes after per byte the guest used) replaces the sample's.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from virt_reclaim.image.qemu_img_argv import Extent

SECTOR = 512
# Enough clusters for a ratio within a few percent, few enough to stay well under a second.
DEFAULT_SAMPLES = 128


@dataclass(frozen=True)
class ImageContent:
    """What the top layer of an image stores, by kind (guest bytes, from its map)."""

    plain_bytes: int  # data clusters stored uncompressed, readable at their offset
    compressed_bytes: int  # data clusters stored compressed (guest bytes they hold)


@dataclass(frozen=True)
class ClusterSample:
    """Plain clusters read: what qcow2 would store of each, compressed and uncompressed.

    ``compressed`` and ``uncompressed`` hold, per sampled cluster, its stored bytes as a
    share of the cluster (0 for a zero cluster, which a rewrite drops).
    """

    compressed: tuple[float, ...]
    uncompressed: tuple[float, ...]

    def ratios(self, *, compressed: bool) -> tuple[float, ...]:
        """Per-cluster stored shares for the rewrite's compression."""
        return self.compressed if compressed else self.uncompressed


def content_of(extents: Sequence[Extent]) -> ImageContent:
    """Sum the top layer's data extents of a map by how they are stored."""
    plain = compressed = 0
    for extent in extents:
        if extent.depth != 0 or not extent.data or extent.zero:
            continue
        if extent.offset is None:
            compressed += extent.length
        else:
            plain += extent.length
    return ImageContent(plain, compressed)


def sample_offsets(
    extents: Sequence[Extent], cluster: int, samples: int = DEFAULT_SAMPLES
) -> list[int]:
    """File offsets of up to ``samples`` plain clusters, spread evenly over all plain data."""
    plain = [e for e in extents if e.depth == 0 and e.data and not e.zero and e.offset is not None]
    total = sum(e.length for e in plain)
    if total <= 0:
        return []
    count = min(samples, max(1, total // cluster))
    step = total / count
    offsets = []
    wanted = [int(i * step + step / 2) for i in range(count)]
    position = 0
    index = 0
    for extent in plain:
        while index < len(wanted) and wanted[index] < position + extent.length:
            inside = (wanted[index] - position) // cluster * cluster
            assert extent.offset is not None  # noqa: S101 - filtered above
            offsets.append(extent.offset + inside)
            index += 1
        position += extent.length
    return offsets


def sample_image(path: str, offsets: Sequence[int], cluster: int) -> ClusterSample:
    """Read the clusters at ``offsets`` and compress each as qcow2 would store it.

    qcow2 compresses every cluster on its own, stores it in whole 512-byte sectors,
    and keeps a cluster uncompressed when compression does not make it smaller.
    zlib at level 6 lands within a few percent of zstd's level 3 on qcow2 clusters.
    """
    packed: list[float] = []
    plain: list[float] = []
    with open(path, "rb") as image:
        for offset in offsets:
            chunk = os.pread(image.fileno(), cluster, offset)
            if not chunk:
                continue
            if chunk.count(0) == len(chunk):
                packed.append(0.0)
                plain.append(0.0)
                continue
            size = len(zlib.compress(chunk, 6))
            packed.append(min(len(chunk), -(-size // SECTOR) * SECTOR) / len(chunk))
            plain.append(1.0)
    return ClusterSample(tuple(packed), tuple(plain))


def split_stored(
    ratios: Sequence[float],
    plain_bytes: int,
    compressed_bytes: int,
    compressed_stored: int,
    garbage: int,
) -> tuple[float, float]:
    """Stored bytes of the live data and of the garbage, taking the garbage to compress worst.

    Deleted data that is worth reclaiming is mostly bulk data: rotated logs that were
    compressed before they were deleted, package archives, downloads, media. Live data
    (programs, configuration, logs being written, databases) compresses better. Where
    this is wrong, the estimate errs toward a larger gain; the job checks the gain again
    after freeing the guest's space and before any downtime, and the journal's ratio of
    this domain replaces the assumption from its second reclaim on.
    """
    pieces: list[tuple[float, float]] = []  # (stored share, guest bytes)
    if ratios and plain_bytes:
        weight = plain_bytes / len(ratios)
        pieces += [(r, weight) for r in ratios]
    elif plain_bytes:
        pieces.append((1.0, float(plain_bytes)))
    if compressed_bytes:
        pieces.append((compressed_stored / compressed_bytes, float(compressed_bytes)))
    pieces.sort(key=lambda p: p[0], reverse=True)
    left = float(garbage)
    garbage_stored = live_stored = 0.0
    for share, size in pieces:
        taken = min(size, left)
        left -= taken
        garbage_stored += share * taken
        live_stored += share * (size - taken)
    return live_stored, garbage_stored


def metadata_bytes(virtual_size: int, cluster: int) -> int:
    """A generous bound of a fresh qcow2's header, L1/L2 and refcount tables."""
    return virtual_size // (cluster // 8) + 4 * cluster


@dataclass(frozen=True)
class SizeEstimate:
    """The estimated size after the reclaim, and the figures it came from (for events)."""

    after: int
    basis: str  # "sample", "history" or "allocation"
    stored_ratio: float
    freed_share: float


def estimate_after(
    *,
    allocated: int,
    virtual_size: int,
    cluster: int,
    content: ImageContent,
    sample: ClusterSample,
    compressed: bool,
    guest_used: int | None,
    freed_share: float,
    history_ratio: float | None = None,
    fill: tuple[int, int] | None = None,
) -> SizeEstimate:
    """Bytes the image will occupy after the free-space step and the rewrite.

    Args:
        allocated: Bytes the image occupies on the host now.
        virtual_size: The disk's size as the guest sees it.
        cluster: The new image's cluster size.
        content: What the image stores now (``content_of``).
        sample: The sampled plain clusters (``sample_image``).
        compressed: Whether the rewrite compresses.
        guest_used: Bytes the guest's filesystems on this disk use; None when unknown
            (shut off, no agent): then everything the image holds counts as live.
        freed_share: Share (0-1) of the data the guest no longer uses that the
            free-space step will free: 1 for a trim through discard, the reach of
            the zero-fill, 0 when nothing can free it.
        history_ratio: Bytes after per used byte that this domain's disk reached in
            its last reclaim with the same compression, if there was one.
        fill: For a zero-fill, (bytes it may write, bytes of free space it will not
            reach: the guests' share and the root reserve). ext4 places the fill's file
            where it likes, so the part it does not reach may hold most of the newest
            deleted file or none of it: the deleted data is taken to lie anywhere in the
            free space, and the fill frees its share of it.
    """
    overhead = metadata_bytes(virtual_size, cluster)
    # Compressed clusters occupy what is left of the allocation after the plain ones.
    compressed_stored = max(0, min(content.compressed_bytes, allocated - content.plain_bytes))
    if not compressed:
        compressed_stored = content.compressed_bytes  # an uncompressed rewrite inflates them
    # Zero clusters (a past zero-fill, say) are neither live nor garbage: they cost nothing.
    ratios = sample.ratios(compressed=compressed)
    zero_share = sum(1 for r in ratios if r == 0.0) / len(ratios) if ratios else 0.0
    plain = int(content.plain_bytes * (1.0 - zero_share))
    nonzero = [r for r in ratios if r > 0.0]
    data = plain + content.compressed_bytes
    live = data if guest_used is None else min(guest_used, data)
    garbage = data - live
    live_stored, garbage_stored = split_stored(
        nonzero, plain, content.compressed_bytes, compressed_stored, garbage
    )
    share = max(0.0, min(1.0, freed_share))
    if fill is not None:
        reached, unreached = fill
        share = reached / (reached + unreached) if reached + unreached else 0.0
    basis = "sample" if guest_used is not None else "allocation"
    if history_ratio is not None and guest_used is not None:
        live_stored, basis = live * history_ratio, "history"
    after = int(live_stored + garbage_stored * (1.0 - share)) + overhead
    ratio = (live_stored + garbage_stored) / data if data else 1.0
    # A rewrite never makes an image larger than what it holds now (it only drops and packs).
    return SizeEstimate(min(after, allocated), basis, ratio, share)
