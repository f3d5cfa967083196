#!/usr/bin/env bash
# Build a small real Debian 12 guest from Debian packages alone, once, into a
# cache folder outside the repository: a 1.25 GiB qcow2 disk (MBR: vda1 ext4 root,
# vda2 256 MiB swap) and the kernel and initramfs for direct kernel boot.
# No loop mount: mkfs.ext4 -d fills the root partition inside the raw file.
# A stamp of the inputs decides whether a cached build is still good; the build
# is made in a temporary folder beside it and renamed into place whole.
#
# usage: build-debian-guest.sh [CACHE_DIR]   (default /var/lib/virt-reclaim-testbed)
set -euo pipefail

cache=${1:-${VR_TESTBED_DIR:-/var/lib/virt-reclaim-testbed}}
out=$cache/debian
suite=bookworm
include=systemd-sysv,udev,dbus,qemu-guest-agent,linux-image-amd64,initramfs-tools,e2fsprogs,util-linux,procps,kmod
# The root filesystem keeps about 600 MiB free: the tests' zero-fills write all of it under TCG.
disk_mib=1280
swap_mib=256
root_start_mib=1
root_mib=$((disk_mib - root_start_mib - swap_mib))
# Module folders a virtio guest under TCG never loads: about half of the kernel's modules.
unused_modules=(drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet
    drivers/infiniband drivers/staging drivers/bluetooth drivers/iio drivers/isdn
    drivers/usb drivers/hid drivers/input/touchscreen drivers/scsi/qla2xxx drivers/scsi/lpfc
    drivers/scsi/mpt3sas drivers/scsi/bfa drivers/scsi/qedf drivers/scsi/qedi drivers/net/can
    drivers/mtd drivers/nfc drivers/thunderbolt drivers/platform drivers/hwmon drivers/target
    sound net/wireless net/mac80211 net/bluetooth fs/ocfs2 fs/gfs2 fs/nfs fs/nfsd fs/smb
    fs/ceph fs/btrfs fs/xfs fs/f2fs fs/ntfs3 fs/jfs)

log() { echo "debian guest: $*"; }
apt_name() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }

kernel_pkg=$(apt_name)
if [ -z "$kernel_pkg" ]; then
    apt-get update -qq
    kernel_pkg=$(apt_name)
fi
[ -n "$kernel_pkg" ] || { echo "debian guest: cannot tell the kernel package" >&2; exit 1; }
stamp=$( { echo "$kernel_pkg"; cat "$0"; } | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    log "cached in $out"
    exit 0
fi

# The Debian mirror this host uses (deb822 sources first, then sources.list).
mirror=$(awk -v suite="$suite" '
    /^[[:space:]]*$/ { ok = 0; uri = ""; next }
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
    ok && uri != "" { print uri; exit }
' /etc/apt/sources.list.d/*.sources 2>/dev/null)
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk -v suite="$suite" '$1 == "deb" && $3 == suite {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

# Delete a build folder, after unmounting what debootstrap or the chroot left mounted in it.
remove_build() {
    local m
    for m in $(awk -v r="$1/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$1"
}

mkdir -p "$cache"
chmod 755 "$cache"
# One build at a time; one that waited finds the other's result.
exec 9> "$cache/.debian.lock"
flock 9
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    log "cached in $out"
    exit 0
fi
for old in "$cache"/.debian-build.*/; do
    [ -d "$old" ] && remove_build "${old%/}"
done

log "building Debian 12 ($kernel_pkg) from $mirror into $out (about 2-3 minutes)"
started=$(date +%s)
work=$(mktemp -d "$cache/.debian-build.XXXXXX")
root=$work/root
trap 'remove_build "$work"' EXIT

if command -v debootstrap >/dev/null; then
    debootstrap=(debootstrap)
else
    # Not installed: run it unpacked from its Debian package.
    (cd "$work" && apt-get download debootstrap >/dev/null 2>&1) \
        || { apt-get update -qq && (cd "$work" && apt-get download debootstrap >/dev/null); }
    dpkg -x "$work"/debootstrap_*.deb "$work/debootstrap"
    export DEBOOTSTRAP_DIR=$work/debootstrap/usr/share/debootstrap
    debootstrap=("$work/debootstrap/usr/sbin/debootstrap")
fi
"${debootstrap[@]}" --variant=minbase --include="$include" "$suite" "$root" "$mirror" \
    > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
kver=$(ls "$root/lib/modules")

# Small: no documentation, manuals or translations now or from later installs.
cat > "$root/etc/dpkg/dpkg.cfg.d/01-vr-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$root"/usr/share/{man,info,lintian}/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
    "$root"/etc/resolv.conf
for dir in "${unused_modules[@]}"; do
    rm -rf "${root:?}/lib/modules/$kver/kernel/$dir"
done
chroot "$root" depmod -a "$kver"

echo vr-debian > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvr-debian\n' > "$root/etc/hosts"
tr -d - < /proc/sys/kernel/random/uuid > "$root/etc/machine-id"
chroot "$root" passwd -d root >/dev/null
root_uuid=$(cat /proc/sys/kernel/random/uuid)
swap_uuid=$(cat /proc/sys/kernel/random/uuid)
# No `discard` mount option: deleted blocks come back to the host only through a trim.
cat > "$root/etc/fstab" <<EOF
UUID=$root_uuid / ext4 errors=remount-ro 0 1
UUID=$swap_uuid none swap sw 0 0
EOF

# The initramfs finds the virtio root disk, includes e2fsck for it and waits for no resume device.
printf '%s\n' virtio_pci virtio_blk ext4 >> "$root/etc/initramfs-tools/modules"
# MODULES=list: only those modules and what they need (most: 17 MB, unpacked at every boot).
printf 'MODULES=list\nFSTYPE=ext4\nCOMPRESS=gzip\n' > "$root/etc/initramfs-tools/conf.d/vr-guest"
echo RESUME=none > "$root/etc/initramfs-tools/conf.d/resume"
mount -t proc proc "$root/proc"
chroot "$root" update-initramfs -u -k "$kver" >/dev/null
umount "$root/proc"

# Debian starts the agent only from a udev rule on its port: start it with the system too.
mkdir -p "$root/etc/systemd/system/qemu-guest-agent.service.d" \
    "$root/etc/systemd/system/multi-user.target.wants"
cat > "$root/etc/systemd/system/qemu-guest-agent.service.d/vr-guest.conf" <<'EOF'
[Service]
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
ln -sf /lib/systemd/system/qemu-guest-agent.service \
    "$root/etc/systemd/system/multi-user.target.wants/qemu-guest-agent.service"
# Nothing may trim, scrub or download behind a test's back.
for unit in fstrim.timer apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
            dpkg-db-backup.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# A little data that is there from the start: tests check it with `sha256sum -c`.
mkdir -p "$root/srv/vr-base"
for n in $(seq 1 20000); do
    echo "2026-11-29T00:00:$((n % 60))Z vr-debian base line $n request served status=$((200 + n % 5))"
done > "$root/srv/vr-base/base.log"
head -c 2M /dev/urandom > "$root/srv/vr-base/base.bin"
(cd "$root/srv/vr-base" && sha256sum base.log base.bin > SHA256SUMS)

mkdir -p "$work/debian"
cp "$root/boot/vmlinuz-$kver" "$work/debian/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/debian/initrd.img"
# Booted directly: the guest needs no initramfs of its own.
rm -f "$root/boot/initrd.img-$kver"

le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) \
    $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
# One MBR partition entry: not bootable, CHS fields "beyond 8 GiB" (LBA only), type, LBA, sectors.
mbr_entry() { printf "\\x00\\xfe\\xff\\xff\\x$1\\xfe\\xff\\xff$(le32 "$2")$(le32 "$3")"; }
raw=$work/disk.raw
truncate -s "${disk_mib}M" "$raw"
mkfs.ext4 -q -F -L root -U "$root_uuid" -d "$root" \
    -E "offset=$((root_start_mib * 1048576)),lazy_itable_init=0,lazy_journal_init=0,nodiscard" \
    "$raw" "${root_mib}M"
truncate -s "${swap_mib}M" "$work/swap.raw"
mkswap -q -L swap -U "$swap_uuid" "$work/swap.raw"
dd if="$work/swap.raw" of="$raw" bs=1M seek=$((disk_mib - swap_mib)) conv=notrunc,sparse status=none
{
    head -c 440 /dev/zero
    printf "$(le32 $((0x$(od -An -N4 -tx4 /dev/urandom | tr -d ' '))))"
    printf '\x00\x00'
    mbr_entry 83 $((root_start_mib * 2048)) $((root_mib * 2048))
    mbr_entry 82 $(((disk_mib - swap_mib) * 2048)) $((swap_mib * 2048))
    head -c 32 /dev/zero
    printf '\x55\xaa'
} > "$work/mbr.bin"
[ "$(stat -c %s "$work/mbr.bin")" = 512 ] || { echo "debian guest: bad MBR" >&2; exit 1; }
dd if="$work/mbr.bin" of="$raw" conv=notrunc status=none
qemu-img convert -O qcow2 "$raw" "$work/debian/disk.qcow2"

cat > "$work/debian/info" <<EOF
kernel_package=$kernel_pkg
kernel=$kver
mirror=$mirror
root_uuid=$root_uuid
swap_uuid=$swap_uuid
EOF
echo "$stamp" > "$work/debian/stamp"
chmod 755 "$work/debian"
chmod 644 "$work/debian"/*
rm -rf "$out.old"
[ -d "$out" ] && mv "$out" "$out.old"
mv "$work/debian" "$out"
rm -rf "$out.old"
log "built in $(($(date +%s) - started)) s: disk.qcow2 $(du -m "$out/disk.qcow2" | cut -f1) MiB on the host"
