#!/usr/bin/env bash
# One idempotent setup for `make test` and `make demo` on Debian 12 as root:
# Debian packages, the .venv with the package and its test extras, Prometheus'
# own tools for the tests (unpacked, not installed), a running libvirtd, and the
# cached test guests (busybox, then Debian 12). Each step is skipped when already done.
#
# usage: scripts/setup.sh [--venv-only]
set -euo pipefail

cd "$(dirname "$0")/.."
venv_only=false
[ "${1:-}" = "--venv-only" ] && venv_only=true

log() { echo "setup: $*"; }

packages=(
    python3 python3-venv python3-dev gcc make pkg-config
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
    qemu-system-x86 qemu-utils e2fsprogs cpio kmod
    debootstrap  # builds the Debian test guest
    systemd  # systemd-analyze checks the unit
    groff-base man-db zsh  # render the man page, parse the zsh completion (tests)
)

install_packages() {
    local missing=()
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

make_venv() {
    local stamp=.venv/.setup-stamp want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    log "creating .venv and installing virt-reclaim with its test extras"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING" || true
    .venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING" || true
    .venv/bin/python -c "import libvirt, apscheduler, pydantic, structlog, virt_reclaim"
    echo "$want" > "$stamp"
}

# promtool, node_exporter and Prometheus itself, which the tests run against
# examples/prometheus/, examples/grafana/ and the metrics file. Installing the packages
# would start a Prometheus server and an exporter as services on the host: they are
# downloaded and unpacked into the test bed instead, once (the stamp's first line names
# the packages, the others the versions unpacked).
tools_dir=${VR_TESTBED_DIR:-/var/lib/virt-reclaim-testbed}/tools
tool_packages=(prometheus prometheus-node-exporter)
tool_binaries=(promtool prometheus prometheus-node-exporter)

fetch_prometheus_tools() {
    local stamp=$tools_dir/stamp want work deb binary done=true
    want="${tool_packages[*]}"
    for binary in "${tool_binaries[@]}"; do
        [ -x "$tools_dir/bin/$binary" ] || done=false
    done
    if $done && [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$want" ]; then
        return
    fi
    log "unpacking ${tool_binaries[*]} into $tools_dir (not installed as services)"
    work=$(mktemp -d)
    # apt-get download fetches as root here: _apt cannot write to the temporary folder.
    if ! (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root \
            "${tool_packages[@]}" >/dev/null 2>&1); then
        apt-get update -qq
        (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${tool_packages[@]}" >/dev/null)
    fi
    for deb in "$work"/*.deb; do
        dpkg-deb -x "$deb" "$work/root"
    done
    install -d "$tools_dir/bin"
    for binary in "${tool_binaries[@]}"; do
        install -m 0755 "$work/root/usr/bin/$binary" "$tools_dir/bin/"
    done
    {
        echo "$want"
        for deb in "$work"/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done
    } > "$stamp"
    rm -rf "$work"
}

fix_kvm_device() {
    # Without udev /dev/kvm stays root-only. libvirt probes QEMU as root (KVM
    # works) but checks its capability cache as libvirt-qemu (KVM missing), so
    # every define re-probes QEMU for 30-50 s. Debian's udev rule gives root:kvm 0660.
    if [ -c /dev/kvm ] && [ "$(stat -c %a /dev/kvm)" != 660 ]; then
        chgrp kvm /dev/kvm && chmod 660 /dev/kvm
    fi
}

start_libvirtd() {
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        return
    fi
    if [ -d /run/systemd/system ]; then
        log "starting libvirtd with systemctl"
        systemctl start virtlogd.socket libvirtd.socket libvirtd.service 2>/dev/null \
            || systemctl start virtqemud.socket virtlogd.socket
    else
        log "no service manager: starting virtlogd and libvirtd by hand"
        pgrep -x virtlogd >/dev/null || virtlogd -d
        pgrep -x libvirtd >/dev/null || libvirtd -d
    fi
    for _ in $(seq 1 60); do
        virsh -c qemu:///system version >/dev/null 2>&1 && return
        sleep 0.5
    done
    echo "setup: libvirtd does not answer on qemu:///system" >&2
    exit 1
}

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (it installs Debian packages and drives the system libvirtd)" >&2
    exit 1
fi
if $venv_only; then
    install_packages
    make_venv
    # Lint needs no network: without the tools, the tests that run them skip (outside CI).
    fetch_prometheus_tools || log "could not unpack the Prometheus tools; their tests will skip"
    exit 0
fi
install_packages
make_venv
fetch_prometheus_tools
fix_kvm_device
start_libvirtd
bash tests/testbed/build-guest.sh
bash tests/testbed/build-debian-guest.sh
log "ready"
