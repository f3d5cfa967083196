"""qemu-img, run through ``process.run``: the one way the package runs it (``QemuImg``).

The argv builders and output parsers are pure functions in qemu_img_argv.py.
"""

from __future__ import annotations

import json
import threading

from virt_reclaim import process
from virt_reclaim.errors import QemuImgCancelled, QemuImgError
from virt_reclaim.image.imagefile import NewImage
from virt_reclaim.image.qemu_img_argv import (
    DEFAULT_QEMU_IMG,
    Extent,
    ImageInfo,
    check_argv,
    compare_argv,
    convert_argv,
    create_argv,
    create_overlay_argv,
    info_argv,
    map_argv,
    measure_argv,
    parse_info,
    parse_map,
    parse_measure,
    target_spec,
)
from virt_reclaim.units import MIB

# Reading a header never takes long; a hung NFS mount must not hang us.
INFO_TIMEOUT_S = 60.0
# More layers than any chain libvirt or a management tool builds; a loop ends here.
MAX_CHAIN = 64


def _timeout_for(size_bytes: int, bytes_per_second: float) -> float:
    """A timeout that scales with the work: a floor for small images, a rate for large ones."""
    return 300.0 + size_bytes / bytes_per_second


# Rates well below what a slow disk or one core does, so that only a hang times out.
_READ_RATE = 20 * MIB
_COMPRESS_RATE = 5 * MIB


class QemuImg:
    """qemu-img as the package uses it: one program path, heavy work at low priority.

    Setting ``cancel`` kills a running convert, check or compare (QemuImgCancelled).
    The job's new images (``NewImage``) are written and read only through their
    descriptors (``target_spec`` of ``/dev/fd/N``).
    """

    def __init__(
        self,
        qemu_img: str = DEFAULT_QEMU_IMG,
        priority: process.Priority | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.qemu_img = qemu_img
        self.priority = priority
        self.cancel = cancel

    def info(
        self,
        path: str,
        *,
        force_share: bool = False,
        image_format: str | None = None,
        backing_chain: bool = True,
    ) -> list[ImageInfo]:
        """Run ``qemu-img info`` on ``path``; the image first, then its backing files.

        The chain is read one layer at a time, each with the format the layer above
        records for it (``qemu-img info --backing-chain`` would probe a backing file whose
        format the header does not record: a guest's bytes would choose it). A layer that
        names a backing file without its format is refused.

        Raises:
            QemuImgError: qemu-img failed, timed out, or printed garbage; a layer names a
                backing file but not its format; the chain is deeper than MAX_CHAIN.
        """
        layers: list[ImageInfo] = []
        layer_path, layer_format = path, image_format
        while True:
            argv = info_argv(layer_path, qemu_img=self.qemu_img, backing_chain=False,
                             force_share=force_share, image_format=layer_format)  # fmt: skip
            layer = parse_info(self._run(argv, timeout=INFO_TIMEOUT_S).stdout)[0]
            layers.append(layer)
            if not backing_chain or not layer.backing_filename:
                return layers
            if layer.backing_format is None:
                raise QemuImgError(
                    f"{layer_path} names the backing file {layer.backing_filename} but not its "
                    "format, which qemu would guess from the file's bytes; record it with "
                    f"'qemu-img rebase -u -F FORMAT -b {layer.backing_recorded} {layer_path}'"
                )
            if len(layers) > MAX_CHAIN:
                raise QemuImgError(f"{path}: a backing chain deeper than {MAX_CHAIN} layers")
            layer_path, layer_format = layer.backing_filename, layer.backing_format

    def measure(self, path: str, *, force_share: bool = False, image_format: str = "qcow2") -> int:
        """Bytes a qcow2 copy of ``path`` (its whole chain) needs at most, uncompressed."""
        argv = measure_argv(path, qemu_img=self.qemu_img, image_format=image_format,
                            force_share=force_share)  # fmt: skip
        return parse_measure(self._run(argv, timeout=INFO_TIMEOUT_S * 5).stdout)

    def map(
        self, path: str, *, force_share: bool = False, image_format: str = "qcow2"
    ) -> list[Extent]:
        """Where the guest's data of ``path`` lies: see ``parse_map``."""
        argv = map_argv(path, qemu_img=self.qemu_img, force_share=force_share,
                        image_format=image_format)  # fmt: skip
        return parse_map(self._run(argv, timeout=INFO_TIMEOUT_S * 5).stdout)

    def create_overlay(self, image: NewImage, *, backing: str, backing_format: str) -> None:
        """Make the job's new file ``image`` an empty qcow2 overlay over ``backing``.

        ``backing_format`` is the format the domain XML states for ``backing``.
        """
        argv = create_overlay_argv(image.fd_path, backing=backing, backing_format=backing_format,
                                   qemu_img=self.qemu_img)  # fmt: skip
        self._run(argv, timeout=INFO_TIMEOUT_S, pass_fds=(image.fd,))

    def convert(
        self,
        source: str,
        target: NewImage,
        *,
        compression: str | None,
        cluster_size: int | None,
        backing: str | None,
        backing_format: str | None,
        size_bytes: int,
        on_progress: process.ProgressCallback | None,
        preallocation: str = "off",
        rate_limit: int | None = None,
        source_format: str = "qcow2",
        cancel: threading.Event | None = None,
    ) -> None:
        """Rewrite ``source`` into the job's new file ``target`` at low priority.

        qemu-img writes only through the descriptor: ``create_argv`` makes the empty
        qcow2 in it, ``convert_argv`` fills it. ``backing`` is the name as the source's
        header records it. ``cancel`` (a watch's) ends it instead of the job's own stop
        event.
        """
        fds = (target.fd,)
        create = create_argv(
            target.fd_path, size_bytes=size_bytes, qemu_img=self.qemu_img,
            compression=compression, cluster_size=cluster_size, backing=backing,
            backing_format=backing_format, preallocation=preallocation,
        )  # fmt: skip
        # Preallocation writes the metadata of the whole size: a hung disk must not hang us.
        self._run(create, timeout=_timeout_for(size_bytes, _READ_RATE), pass_fds=fds)
        argv = convert_argv(
            source, target_spec(target.fd_path), qemu_img=self.qemu_img, compression=compression,
            backing=backing, backing_format=backing_format, rate_limit=rate_limit,
            source_format=source_format,
        )  # fmt: skip
        self._run(
            argv,
            timeout=_timeout_for(size_bytes, _COMPRESS_RATE),
            on_output=on_progress,
            priority=self.priority,
            cancel=cancel or self.cancel,
            pass_fds=fds,
        )

    def check(self, image: NewImage | str, *, size_bytes: int) -> None:
        """Raise QemuImgError unless the qcow2 ``image`` has no errors, corruptions or leaks.

        ``image`` is the job's new image (read through its descriptor) or a path.
        """
        spec, fds, name = _opened(image)
        result = self._run(
            check_argv(spec, qemu_img=self.qemu_img), timeout=_timeout_for(size_bytes, _READ_RATE),
            ok_codes=(0, 1, 2, 3), cancel=self.cancel, pass_fds=fds,
        )  # fmt: skip
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = {}
        problems = {
            key: report.get(key, 0)
            for key in ("check-errors", "corruptions", "leaks")
            if report.get(key, 0)
        }
        if result.returncode != 0 or problems:
            raise QemuImgError(
                f"qemu-img check {name}: status {result.returncode}, {problems or result.stderr}"
            )

    def compare(
        self,
        first: str,
        second: NewImage | str,
        *,
        size_bytes: int,
        first_format: str = "qcow2",
        second_backing: str | None = None,
        second_backing_format: str | None = None,
    ) -> None:
        """Raise QemuImgError unless both images show the guest the same bytes.

        ``second`` is a qcow2: the job's new image (read through its descriptor, its
        backing file ``second_backing`` by absolute path, the original's) or a path.
        """
        spec, fds, name = _opened(second, second_backing, second_backing_format)
        argv = compare_argv(first, spec, qemu_img=self.qemu_img, first_format=first_format)
        result = self._run(argv, timeout=_timeout_for(size_bytes, _READ_RATE), ok_codes=(0, 1),
                           cancel=self.cancel, pass_fds=fds)  # fmt: skip
        if result.returncode == 1:
            raise QemuImgError(f"{name} differs from {first}: {result.stdout.strip()}")

    def _run(
        self,
        argv: list[str],
        *,
        timeout: float,
        ok_codes: tuple[int, ...] = (0,),
        on_output: process.ProgressCallback | None = None,
        priority: process.Priority | None = None,
        cancel: threading.Event | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> process.Completed:
        try:
            return process.run(
                argv, timeout=timeout, ok_codes=ok_codes, on_output=on_output, priority=priority,
                cancel=cancel, pass_fds=pass_fds,
            )  # fmt: skip
        except process.CommandCancelled as exc:
            raise QemuImgCancelled(str(exc)) from exc
        except process.CommandError as exc:
            raise QemuImgError(str(exc)) from exc


def _opened(
    image: NewImage | str, backing: str | None = None, backing_format: str | None = None
) -> tuple[str, tuple[int, ...], str]:
    """What qemu-img is given for ``image``, the descriptors it needs, and the image's name."""
    if isinstance(image, str):
        return image, (), image
    spec = target_spec(image.fd_path, backing=backing, backing_format=backing_format)
    return spec, (image.fd,), image.path
