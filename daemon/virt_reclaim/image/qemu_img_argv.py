"""qemu-img's command lines and what it prints: argv builders and JSON parsers, pure.

Nothing runs here; qemu_img.py runs these argvs through ``process.run`` and parses
the output with these parsers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from virt_reclaim.errors import QemuImgError
from virt_reclaim.units import KIB

DEFAULT_QEMU_IMG = "qemu-img"
# The cluster size of a qcow2 image created without one, and of an image that does not say.
DEFAULT_CLUSTER = 64 * KIB


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says of one image (one layer of a chain)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None
    backing_filename: str | None
    backing_recorded: str | None  # the string in the header, maybe relative
    backing_format: str | None
    snapshot_count: int
    encrypted: bool
    compression_type: str | None
    corrupt: bool
    create_type: str | None = None  # a VMDK's subformat: monolithicSparse, monolithicFlat...
    extents: tuple[str, ...] = ()  # the files a VMDK keeps its data in (as its header names them)


def info_argv(
    path: str,
    *,
    qemu_img: str = DEFAULT_QEMU_IMG,
    backing_chain: bool = True,
    force_share: bool = False,
    image_format: str | None = None,
) -> list[str]:
    """Return the argv of ``qemu-img info`` for ``path`` with JSON output.

    ``force_share`` (``-U``) is needed to read the header of an image that a
    running QEMU holds locked; what it reads may be stale, which is fine for
    reporting and never a basis for rewriting. ``image_format`` is the format the
    domain XML states: given, qemu-img never probes the guest-written bytes (a raw
    disk whose guest wrote a qcow2 header naming a host file would otherwise be
    read as that qcow2, with the host file as its backing).
    """
    argv = [qemu_img, "info", "--output=json"]
    if image_format is not None:
        argv += ["-f", image_format]
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("-U")
    argv.append(path)
    return argv


def parse_info(text: str) -> list[ImageInfo]:
    """Parse ``qemu-img info --output=json`` (with or without ``--backing-chain``).

    Returns:
        The image first, then each backing file in chain order.

    Raises:
        QemuImgError: The text is not the JSON qemu-img prints.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QemuImgError(f"qemu-img info printed invalid JSON: {exc}") from exc
    layers = data if isinstance(data, list) else [data]
    try:
        return [_image_info(layer) for layer in layers]
    except (KeyError, TypeError, ValueError) as exc:
        raise QemuImgError(f"unexpected qemu-img info output: {exc!r}") from exc


def _image_info(layer: dict[str, Any]) -> ImageInfo:
    specific = layer.get("format-specific", {}).get("data", {})
    return ImageInfo(
        filename=str(layer["filename"]),
        format=str(layer["format"]),
        virtual_size=int(layer["virtual-size"]),
        actual_size=int(layer.get("actual-size", 0)),
        cluster_size=_optional_int(layer.get("cluster-size")),
        backing_filename=layer.get("full-backing-filename") or layer.get("backing-filename"),
        backing_recorded=layer.get("backing-filename"),
        backing_format=layer.get("backing-filename-format"),
        snapshot_count=len(layer.get("snapshots", [])),
        encrypted=bool(layer.get("encrypted", False)) or "encrypt" in specific,
        compression_type=specific.get("compression-type"),
        corrupt=bool(specific.get("corrupt", False)),
        create_type=specific.get("create-type"),
        extents=tuple(str(e["filename"]) for e in specific.get("extents", ())),
    )


def _optional_int(value: Any) -> int | None:  # noqa: ANN401 - JSON value of any type
    return None if value is None else int(value)


def measure_argv(
    path: str,
    *,
    qemu_img: str = DEFAULT_QEMU_IMG,
    image_format: str = "qcow2",
    force_share: bool = False,
) -> list[str]:
    """Return the argv of ``qemu-img measure`` of ``path`` (in ``image_format``) as qcow2."""
    share = ["-U"] if force_share else []
    return [qemu_img, "measure", *share, "--output=json", "-f", image_format, "-O", "qcow2", path]


def parse_measure(text: str) -> int:
    """Return the ``required`` bytes from ``qemu-img measure --output=json``."""
    try:
        return int(json.loads(text)["required"])
    except (ValueError, KeyError, TypeError) as exc:
        raise QemuImgError(f"unexpected qemu-img measure output: {text[:200]!r}") from exc


@dataclass(frozen=True)
class Extent:
    """A run of guest bytes as ``qemu-img map`` reports it.

    ``offset`` is where the bytes lie in the image file; it is None for
    compressed clusters (and for holes), whose bytes cannot be read in place.
    """

    start: int
    length: int
    depth: int
    data: bool
    zero: bool
    offset: int | None


# A map of a badly fragmented image stays far below this; more is not an image we understand.
MAX_MAP_EXTENTS = 1_000_000


def map_argv(
    path: str,
    *,
    qemu_img: str = DEFAULT_QEMU_IMG,
    force_share: bool = False,
    image_format: str = "qcow2",
) -> list[str]:
    """Return the argv of ``qemu-img map`` of ``path`` with JSON output (format given)."""
    argv = [qemu_img, "map", "--output=json", "-f", image_format]
    if force_share:
        argv.append("-U")
    return [*argv, path]


def parse_map(text: str) -> list[Extent]:
    """Parse ``qemu-img map --output=json``.

    Raises:
        QemuImgError: The text is not the JSON qemu-img prints, or is implausibly long.
    """
    try:
        entries = json.loads(text)
        if not isinstance(entries, list) or len(entries) > MAX_MAP_EXTENTS:
            raise TypeError("not a list of extents, or too many")
        return [
            Extent(
                start=int(e["start"]),
                length=int(e["length"]),
                depth=int(e.get("depth", 0)),
                data=bool(e.get("data", False)),
                zero=bool(e.get("zero", False)),
                offset=_optional_int(e.get("offset")),
            )
            for e in entries
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise QemuImgError(f"unexpected qemu-img map output: {exc!r}") from exc


def target_spec(name: str, *, backing: str | None = None, backing_format: str | None = None) -> str:
    """The qcow2 image at ``name`` (a ``/dev/fd/N``) as qemu-img is to open it, format given.

    Its backing file, if any, is the absolute ``backing`` in ``backing_format``, or none
    at all: a relative name in its header would be looked up beside ``/dev/fd``, and a
    format left out would be probed.
    """
    spec: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": name}}
    if backing is not None:
        if backing_format is None:
            raise ValueError(f"{name}: a backing file without its format is never opened")
        spec["backing"] = {
            "driver": backing_format,
            "file": {"driver": "file", "filename": backing},
        }
    else:
        spec["backing"] = None
    return "json:" + json.dumps(spec, separators=(",", ":"))


def create_argv(
    name: str,
    *,
    size_bytes: int,
    qemu_img: str = DEFAULT_QEMU_IMG,
    compression: str | None,
    cluster_size: int | None,
    backing: str | None = None,
    backing_format: str | None = None,
    preallocation: str = "off",
) -> list[str]:
    """Return the argv that makes the empty qcow2 the rewrite fills, in a file that exists.

    ``name`` is the ``/dev/fd/N`` of the file the job created exclusively. With
    ``backing`` (the name as the original's header records it) the new image is an
    overlay over the same file; ``-u`` because the name is relative to the image's
    folder, not to ``/dev/fd``.
    """
    argv = [qemu_img, "create", "-q", "-f", "qcow2"]
    options = []
    if compression is not None:
        options.append(f"compression_type={compression}")
    if cluster_size is not None:
        options.append(f"cluster_size={cluster_size}")
    if preallocation != "off":
        options.append(f"preallocation={preallocation}")
    if backing is not None:
        if backing_format is None:
            # A default would be pinned into the new header, and libvirt follows it.
            raise ValueError(f"{name}: a backing file without its format is never rewritten")
        argv += ["-u", "-b", backing, "-F", backing_format]
    if options:
        argv += ["-o", ",".join(options)]
    return [*argv, name, str(size_bytes)]


def convert_argv(
    source: str,
    target: str,
    *,
    qemu_img: str = DEFAULT_QEMU_IMG,
    compression: str | None,
    backing: str | None = None,
    backing_format: str | None = None,
    coroutines: int = 8,
    rate_limit: int | None = None,
    source_format: str = "qcow2",
) -> list[str]:
    """Return the argv of the rewrite: ``source`` into the new, empty qcow2 ``target``.

    ``target`` is a ``target_spec``: the image ``create_argv`` made (``-n``: qemu-img
    never creates a file itself). ``source_format`` is the format the domain XML states
    (``raw``, ``vmdk`` for a conversion): given, qemu-img never probes what a guest
    wrote into a raw disk.

    ``-W`` (out-of-order writes) made compression 1.6-1.7x faster at the same
    size in our measurements; qcow2 runs at most 4 compression jobs at once, and
    more than 8 coroutines changed nothing. With ``backing`` the target is an
    overlay over that file and only the source's top layer is copied (``-B``);
    without one the new image reads as zeros, which saves writing them.
    """
    argv = [qemu_img, "convert", "-p", "-n", "-f", source_format, "-O", "qcow2", "-W", "-m",
            str(coroutines)]  # fmt: skip
    if compression is not None:
        argv.append("-c")
    if backing is not None:
        if backing_format is None:
            raise ValueError(f"{source}: a backing file without its format is never rewritten")
        argv += ["-B", backing, "-F", backing_format]
    else:
        argv.append("--target-is-zero")
    if rate_limit is not None:
        argv += ["-r", str(rate_limit)]
    return [*argv, source, target]


def create_overlay_argv(
    path: str, *, backing: str, backing_format: str, qemu_img: str = DEFAULT_QEMU_IMG
) -> list[str]:
    """Return the argv that makes ``path`` a qcow2 over ``backing`` in ``backing_format``.

    ``backing`` is an absolute path (a relative one would be looked up beside a
    ``/dev/fd/N`` ``path``); qemu-img opens it, as the format says, for its size.
    The format is written into the header: whoever opens the overlay never probes it.
    """
    return [qemu_img, "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, path]


def check_argv(path: str, *, qemu_img: str = DEFAULT_QEMU_IMG) -> list[str]:
    """Return the argv of ``qemu-img check`` of ``path`` with JSON output."""
    return [qemu_img, "check", "--output=json", "-f", "qcow2", path]


def compare_argv(
    first: str, second: str, *, qemu_img: str = DEFAULT_QEMU_IMG, first_format: str = "qcow2"
) -> list[str]:
    """Return the argv of ``qemu-img compare`` of two images' guest-visible content.

    ``first`` is in ``first_format`` (the format its domain XML states), ``second`` a qcow2.
    """
    return [qemu_img, "compare", "-f", first_format, "-F", "qcow2", first, second]
