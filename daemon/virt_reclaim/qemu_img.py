"""qemu-img: pure argv builders and JSON parsers, run through ``process.run``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from virt_reclaim import process

DEFAULT_QEMU_IMG = "qemu-img"
# Reading a header never takes long; a hung NFS mount must not hang us.
INFO_TIMEOUT_S = 60.0


class QemuImgError(Exception):
    """qemu-img failed or printed something we cannot understand."""


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says of one image (one layer of a chain)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    cluster_size: int | None
    backing_filename: str | None
    backing_format: str | None
    snapshot_count: int
    encrypted: bool
    compression_type: str | None
    corrupt: bool
    dirty: bool


def info_argv(
    path: str,
    *,
    qemu_img: str = DEFAULT_QEMU_IMG,
    backing_chain: bool = True,
    force_share: bool = False,
) -> list[str]:
    """Return the argv of ``qemu-img info`` for ``path`` with JSON output.

    ``force_share`` (``-U``) is needed to read the header of an image that a
    running QEMU holds locked; what it reads may be stale, which is fine for
    reporting and never a basis for rewriting.
    """
    argv = [qemu_img, "info", "--output=json"]
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
        backing_format=layer.get("backing-filename-format"),
        snapshot_count=len(layer.get("snapshots", [])),
        encrypted=bool(layer.get("encrypted", False)) or "encrypt" in specific,
        compression_type=specific.get("compression-type"),
        corrupt=bool(specific.get("corrupt", False)),
        dirty=bool(layer.get("dirty-flag", False)),
    )


def _optional_int(value: Any) -> int | None:  # noqa: ANN401 - JSON value of any type
    return None if value is None else int(value)


def info(
    path: str,
    *,
    qemu_img: str = DEFAULT_QEMU_IMG,
    backing_chain: bool = True,
    force_share: bool = False,
    timeout: float = INFO_TIMEOUT_S,
) -> list[ImageInfo]:
    """Run ``qemu-img info`` on ``path``; see ``parse_info`` for the result.

    Raises:
        QemuImgError: qemu-img failed, timed out, or printed garbage.
    """
    argv = info_argv(path, qemu_img=qemu_img, backing_chain=backing_chain, force_share=force_share)
    try:
        result = process.run(argv, timeout=timeout)
    except process.CommandError as exc:
        raise QemuImgError(str(exc)) from exc
    return parse_info(result.stdout)
