#!/bin/sh
# Build qconnect's native packages from a copy of this source tree:
#
#   packaging/build.sh deb OUTDIR   # qconnect_VERSION_all.deb (+ .buildinfo, .changes)
#   packaging/build.sh rpm OUTDIR   # qconnect-VERSION-1.noarch.rpm, qconnect-dom0-VERSION-1.noarch.rpm
#
# Everything is built in a throwaway directory (the checkout is never written
# to); only the packages are copied to OUTDIR. `make deb`, `make rpm` and the
# package tests all come through here.
set -eu

kind=${1:?usage: packaging/build.sh deb|rpm OUTDIR}
out=${2:?usage: packaging/build.sh deb|rpm OUTDIR}
src=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$src/qconnect/__init__.py")
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/qconnect-build.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
tree="$work/qconnect-$version"
mkdir "$tree"

# The tracked and new (not ignored) files: no .venv, caches or earlier builds.
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$src" && git ls-files -z --cached --others --exclude-standard |
        xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh |
        tar --null -T - -cf -) | tar -xf - -C "$tree"
else
    (cd "$src" && tar --exclude=./.venv --exclude=./dist --exclude=./build \
        --exclude='__pycache__' --exclude='.*_cache' -cf - .) | tar -xf - -C "$tree"
fi

case $kind in
deb)
    command -v dpkg-buildpackage >/dev/null || { echo "dpkg-buildpackage missing: apt-get install dpkg-dev debhelper dh-python" >&2; exit 1; }
    (cd "$tree" && dpkg-buildpackage -us -uc -b --no-sign >"$work/build.log" 2>&1) || {
        cat "$work/build.log" >&2; exit 1; }
    cp "$work"/qconnect_"$version"_all.deb "$out"/
    echo "$out/qconnect_${version}_all.deb"
    ;;
rpm)
    command -v rpmbuild >/dev/null || { echo "rpmbuild missing: apt-get install rpm (Debian) or dnf install rpm-build" >&2; exit 1; }
    mkdir -p "$work/rpm/SOURCES"
    (cd "$work" && tar -czf "rpm/SOURCES/qconnect-$version.tar.gz" "qconnect-$version")
    # Outside an RPM system (Debian) the build requirements cannot be looked
    # up in rpm's database: the Debian packages that provide them are checked
    # by the build itself (stage.py imports trio and systemd).
    nodeps=
    rpm -q rpm >/dev/null 2>&1 || nodeps=--nodeps
    for spec in qconnect qconnect-dom0; do
        rpmbuild -bb $nodeps --define "_topdir $work/rpm" --define "_build_id_links none" \
            "$tree/packaging/rpm/$spec.spec" >"$work/$spec.log" 2>&1 || {
            cat "$work/$spec.log" >&2; exit 1; }
    done
    cp "$work"/rpm/RPMS/noarch/*.rpm "$out"/
    ls "$out"/qconnect-*"$version"-*.noarch.rpm
    ;;
*)
    echo "packaging/build.sh: unknown package kind '$kind' (expected deb or rpm)" >&2
    exit 2
    ;;
esac
