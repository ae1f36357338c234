#!/bin/sh
# Boot Debian 12 under qemu with systemd as PID 1 and check the .deb there:
#
#   packaging/qemu-test.sh DEB
#
# The VM's disk is a raw ext4 image made (mkfs.ext4 -d) from a bootstrapped
# tree with systemd, Debian's kernel and qconnect's dependencies (cached in
# $QCONNECT_CACHE/bookworm-vm), plus the .deb and packaging/vm-check.sh run at
# boot by a unit. The kernel and initrd are the tree's own, booted directly;
# the console is ttyS0; the VM has no network (-nic none). Boot 1 installs
# the package and persists two bindings, then reboots (qemu -no-reboot ends,
# and the host boots the same disk again); boot 2 checks them at boot and
# powers off. Each boot reads its result back from the image (debugfs).
#
# KVM is used when it works, else qemu's emulation (TCG). Each boot is
# bounded by QCONNECT_QEMU_TIMEOUT seconds (default 600). Everything is made
# in a temporary directory and removed; on failure the console logs are kept
# (their path is printed).
#
# Needs root (chroot, mkfs of a tree with root's files), qemu-system-x86
# (installed when missing), e2fsprogs, and the network the first time only.
set -eu

deb=${1:?usage: packaging/qemu-test.sh DEB}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/debian-base.sh"
timeout=${QCONNECT_QEMU_TIMEOUT:-600}
# A working KVM boots the kernel to its panic (no root given) in a second or
# two; a /dev/kvm that opens but does not run guests (nested virtualization
# without vmx/svm) never gets past the boot loader.
kvm_probe_seconds=15
qemu=qemu-system-x86_64

[ "$(id -u)" = 0 ] || { echo "qemu-test: needs root (chroot, disk image of a root tree)" >&2; exit 1; }
[ -f "$deb" ] || { echo "qemu-test: no such package: $deb" >&2; exit 1; }
if ! command -v "$qemu" >/dev/null; then
    echo "installing qemu-system-x86" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends qemu-system-x86) >/dev/null
fi

# The VM's packages: a bootable systemd system, and what the .deb depends on
# (first alternative, without versions), so the VM itself needs no network.
depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g' | grep . | sort -u | tr '\n' ' ')
packages="systemd systemd-sysv udev kmod linux-image-amd64 initramfs-tools python3 $depends"

vm="$cache/bookworm-vm"
if [ "$(cat "$vm/.complete" 2>/dev/null)" != "$packages" ]; then
    base=$(debian_base bookworm)
    echo "making the VM tree $vm (once per package list; cached)" >&2
    rm -rf "$vm" "$vm.new"
    cp -a "$base" "$vm.new"
    rm -f "$vm.new/.complete"
    cp /etc/resolv.conf "$vm.new/etc/resolv.conf"
    unshare --mount --fork sh -c '
        mount -t proc proc "$1/proc"
        chroot "$1" sh -c "export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
            apt-get update -qq && apt-get install -y -qq --no-install-recommends $2 && apt-get clean"
    ' sh "$vm.new" "$packages" >"$cache/bookworm-vm.log" 2>&1 || {
        tail -20 "$cache/bookworm-vm.log" >&2; exit 1; }
    echo qconnect-vm >"$vm.new/etc/hostname"
    echo "/dev/vda / ext4 rw 0 1" >"$vm.new/etc/fstab"
    rm -f "$vm.new/etc/resolv.conf"
    printf '%s' "$packages" >"$vm.new/.complete"
    mv "$vm.new" "$vm"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/qconnect-qemu-test.XXXXXX")
keep=""
cleanup() {
    if [ -n "$keep" ]; then
        logs=$(mktemp -d "${TMPDIR:-/tmp}/qconnect-qemu-test-logs.XXXXXX")
        cp "$work"/console-*.log "$logs"/ 2>/dev/null || true
        echo "qemu-test: console logs kept in $logs" >&2
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# The root tree: hard links to the cached one (files are only ever added
# here, never changed, so the cache is not touched), then one ext4 image.
root="$work/root"
cp -al "$vm" "$root"
rm -f "$root/.complete"
mkdir -p "$root/var/lib/qconnect-vmtest"
cp "$deb" "$root/var/lib/qconnect-vmtest/qconnect.deb"
cp "$here/vm-check.sh" "$root/usr/local/sbin/qconnect-vmtest"
chmod 755 "$root/usr/local/sbin/qconnect-vmtest"
cat >"$root/etc/systemd/system/qconnect-vmtest.service" <<'EOF'
[Unit]
Description=qconnect package test (packaging/qemu-test.sh)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/qconnect-vmtest
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -s ../qconnect-vmtest.service "$root/etc/systemd/system/multi-user.target.wants/"
kernel=$(ls "$root"/boot/vmlinuz-* | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | tail -1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd"
size=$(( $(du -sm "$root" | cut -f1) + 512 ))
truncate -s "${size}M" "$work/disk.img"
mkfs.ext4 -q -F -L qconnect-vm -d "$root" "$work/disk.img"
rm -rf "$root"

# KVM when it runs this kernel, else TCG (or QCONNECT_QEMU_ACCEL).
choose_accelerator() {
    if [ -n "${QCONNECT_QEMU_ACCEL:-}" ]; then
        echo "$QCONNECT_QEMU_ACCEL"
    elif [ -r /dev/kvm ] && [ -w /dev/kvm ] &&
        timeout -k 5 "$kvm_probe_seconds" "$qemu" -accel kvm -m 256 -nographic -no-reboot -nic none \
            -kernel "$work/vmlinuz" -append "console=ttyS0 panic=-1" </dev/null 2>&1 |
            grep -q "Kernel panic"; then
        echo kvm
    else
        echo tcg
    fi
}

# One boot: until the VM powers off or reboots (-no-reboot), at most $timeout s.
boot() {
    console="$work/console-$1.log"
    status=0
    timeout -k 10 "$timeout" "$qemu" -accel "$accelerator" -m 1024 -smp 1 \
        -nographic -nodefaults -serial stdio -no-reboot -nic none \
        -drive file="$work/disk.img",format=raw,if=virtio \
        -kernel "$work/vmlinuz" -initrd "$work/initrd" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1" \
        </dev/null >"$console" 2>"$work/qemu-$1.err" || status=$?
    cat "$work/qemu-$1.err" >>"$console"
    [ "$status" = 124 ] && echo "qemu-test: boot $1 did not end within ${timeout}s" >&2
    debugfs -R "cat /var/lib/qconnect-vmtest/result-$1" "$work/disk.img" 2>/dev/null >"$work/result-$1" || true
    sed 's/^/  vm: /' "$work/result-$1"
    grep -qx "STAGE $1: passed" "$work/result-$1"
}

start=$(date +%s)
accelerator=$(choose_accelerator)
echo "qemu-test: accelerator $accelerator"
for stage in 1 2; do
    boot "$stage" || {
        keep=1
        echo "qemu-test: boot $stage failed; end of its console:" >&2
        tail -40 "$work/console-$stage.log" >&2
        exit 1
    }
done
echo "qemu-test: passed in $(( $(date +%s) - start ))s (accelerator $accelerator)"
