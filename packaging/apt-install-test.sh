#!/bin/sh
# Install the .deb with apt into a freshly bootstrapped Debian tree, beside a
# stand-in for Qubes' qubes-core-agent-networking, and check that the two
# packages never fight:
#
#   packaging/apt-install-test.sh SUITE DEB      # SUITE: bookworm (12), trixie (13)
#
# - apt resolves qconnect's dependencies (python3-trio, python3-systemd) from
#   the distribution alone;
# - typing qvm-connect-tcp runs ours; Qubes' stays runnable as
#   qvm-connect-tcp.qubes and its /etc/qubes-rpc/qubes.ConnectTCP is untouched;
# - upgrading Qubes' package, then ours, keeps that so;
# - removing ours gives Qubes' qvm-connect-tcp back and leaves no diversion.
#
# Needs root, debootstrap and the network (the distribution's mirror). The
# bootstrapped base tree is cached in $QCONNECT_CACHE (default
# /var/tmp/qconnect-package-test); every run works on a throwaway copy.
set -eu

suite=${1:?usage: packaging/apt-install-test.sh SUITE DEB}
deb=${2:?usage: packaging/apt-install-test.sh SUITE DEB}
. "$(dirname "$0")/debian-base.sh"

[ "$(id -u)" = 0 ] || { echo "apt-install-test: needs root (chroot, debootstrap)" >&2; exit 1; }
[ -f "$deb" ] || { echo "apt-install-test: no such package: $deb" >&2; exit 1; }
base=$(debian_base "$suite")

work=$(mktemp -d "${TMPDIR:-/tmp}/qconnect-apt-test.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
root="$work/root"
cp -a "$base" "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/qconnect.deb"

# The stand-in for Qubes' package: the two files qconnect must not fight over.
fake="$work/fake"
mkdir -p "$fake/DEBIAN" "$fake/usr/bin" "$fake/etc/qubes-rpc"
printf '#!/bin/sh\necho "qubes-original $*"\n' >"$fake/usr/bin/qvm-connect-tcp"
chmod 755 "$fake/usr/bin/qvm-connect-tcp"
ln -s /dev/tcp/127.0.0.1 "$fake/etc/qubes-rpc/qubes.ConnectTCP"
printf 'Package: qubes-core-agent-networking\nVersion: 4.2.0\nArchitecture: all\nMaintainer: test <test@localhost>\nDescription: stand-in for the Qubes package\n' \
    >"$fake/DEBIAN/control"
dpkg-deb --root-owner-group -b "$fake" "$root/tmp/qubes-networking.deb" >/dev/null

cat >"$root/tmp/check.sh" <<'EOF'
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() { echo "FAIL: $*" >&2; exit 1; }
dpkg -i /tmp/qubes-networking.deb >/dev/null
[ "$(qvm-connect-tcp x)" = "qubes-original x" ] || fail "Qubes' stand-in does not run"

apt-get update -qq
apt-get install -y -qq /tmp/qconnect.deb >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; fail "apt could not install qconnect"; }
python3 -c 'import trio; print("python", __import__("sys").version.split()[0], "trio", trio.__version__)'
qvm-connect-tcp --help | grep -q 'BIND:\]LOCALPORT' || fail "qvm-connect-tcp is not qconnect's"
[ "$(qconnect --version)" = "qconnect $(dpkg-query -W -f='${Version}' qconnect)" ] || fail "qconnect --version"
[ "$(qvm-connect-tcp.qubes x)" = "qubes-original x" ] || fail "Qubes' client is not at qvm-connect-tcp.qubes"
[ "$(readlink /etc/qubes-rpc/qubes.ConnectTCP)" = /dev/tcp/127.0.0.1 ] || fail "the stock service was touched"
dpkg-divert --list /usr/bin/qvm-connect-tcp | grep -q 'by qconnect' || fail "no diversion"
man -w qconnect >/dev/null 2>&1 || [ -f /usr/share/man/man1/qconnect.1.gz ] || fail "no man page"

dpkg -i /tmp/qubes-networking.deb >/dev/null       # Qubes' package upgraded
qvm-connect-tcp --help | grep -q 'BIND:\]LOCALPORT' || fail "a Qubes upgrade replaced ours"
[ "$(qvm-connect-tcp.qubes x)" = "qubes-original x" ] || fail "a Qubes upgrade lost its client"
apt-get install -y -qq --reinstall /tmp/qconnect.deb >/dev/null 2>&1 || fail "reinstall"
qvm-connect-tcp --help | grep -q 'BIND:\]LOCALPORT' || fail "our upgrade lost ours"

apt-get remove -y -qq qconnect >/dev/null 2>&1 || fail "apt could not remove qconnect"
[ "$(qvm-connect-tcp x)" = "qubes-original x" ] || fail "removing qconnect did not give Qubes' client back"
[ ! -e /usr/bin/qvm-connect-tcp.qubes ] || fail "qvm-connect-tcp.qubes left behind"
dpkg-divert --list /usr/bin/qvm-connect-tcp | grep -q . && fail "diversion left behind"
apt-get purge -y -qq qconnect >/dev/null 2>&1 || true
[ "$(readlink /etc/qubes-rpc/qubes.ConnectTCP)" = /dev/tcp/127.0.0.1 ] || fail "the stock service was touched"
echo "OK"
EOF

# A private mount namespace: /proc for the chroot, gone when the test ends.
unshare --mount --fork sh -c '
    mount -t proc proc "$1/proc"
    chroot "$1" sh /tmp/check.sh
' sh "$root"
echo "apt-install-test $suite: passed"
