# Sourced by the package tests (sh): the bootstrapped Debian base trees they
# share, cached in $QCONNECT_CACHE (default /var/tmp/qconnect-package-test).
#
#   debian_base SUITE       # prints the tree's path; bootstraps it the first time
#
# A tree is complete only once .complete exists in it: an interrupted
# bootstrap is thrown away and done again, never used half-made.

cache=${QCONNECT_CACHE:-/var/tmp/qconnect-package-test}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

debian_base() {
    base="$cache/$1"
    if [ ! -f "$base/.complete" ]; then
        command -v debootstrap >/dev/null || {
            echo "needs debootstrap: apt-get install debootstrap" >&2; return 1; }
        rm -rf "$base"
        mkdir -p "$cache"
        echo "bootstrapping Debian $1 into $base (once; cached)" >&2
        debootstrap --variant=minbase "$1" "$base" "$mirror" >"$cache/$1.log" 2>&1 || {
            tail -20 "$cache/$1.log" >&2; return 1; }
        touch "$base/.complete"
    fi
    echo "$base"
}
