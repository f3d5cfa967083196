#!/usr/bin/env bash
# Build the tiny test guest (Debian kernel, busybox, qemu-guest-agent) into a
# cache folder outside the repository, once. A stamp of the inputs decides
# whether a cached build is still good; the build is renamed into place whole.
#
# usage: build-guest.sh [CACHE_DIR]   (default /var/lib/virt-reclaim-testbed)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-${VR_TESTBED_DIR:-/var/lib/virt-reclaim-testbed}}
out=$cache/guest
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         virtio_blk virtio_console crc32c_generic crc16 mbcache jbd2 ext4)

kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
    apt-get update -qq
    kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
stamp=$( { echo "$kernel_pkg"; cat "$0" "$here/guest-init" "$here/guest-shutdown" "$here/guest-attach-disk"; } | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    echo "test guest: cached in $out"
    exit 0
fi

echo "test guest: building $kernel_pkg + busybox + qemu-guest-agent into $out"
mkdir -p "$cache"
chmod 755 "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "$kernel_pkg" qemu-guest-agent busybox-static >/dev/null 2>&1) \
    || { apt-get update -qq && (cd "$work" && apt-get download "$kernel_pkg" qemu-guest-agent busybox-static >/dev/null); }
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done

root=$work/root
mkdir -p "$root"/{bin,sbin,lib/modules,lib64,usr/lib/x86_64-linux-gnu,usr/sbin,etc}
cp "$work/x/bin/busybox" "$root/bin/busybox"
cp "$work/x/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
kver=$(ls "$work/x/lib/modules")
for m in "${modules[@]}"; do
    cp "$(find "$work/x/lib/modules/$kver" -name "$m.ko" | head -n1)" "$root/lib/modules/$m.ko"
done
# qemu-ga is dynamically linked; the host (same Debian release) has its libraries.
ldd "$root/usr/sbin/qemu-ga" | awk '/=>/ {print $3} /^\t\/lib64/ {print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
install -m 755 "$here/guest-init" "$root/init"
install -m 755 "$here/guest-shutdown" "$root/sbin/shutdown"
install -m 755 "$here/guest-attach-disk" "$root/sbin/attach-disk"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"

mkdir -p "$work/guest"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/guest/initrd.img"
cp "$work/x/boot/vmlinuz-$kver" "$work/guest/vmlinuz"
echo "$stamp" > "$work/guest/stamp"
chmod 755 "$work/guest"
chmod 644 "$work/guest"/*
rm -rf "$out.old"
[ -d "$out" ] && mv "$out" "$out.old"
mv "$work/guest" "$out"
rm -rf "$out.old"
echo "test guest: built ($(du -sh "$out" | cut -f1))"
