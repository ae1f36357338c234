#!/bin/sh
# Runs at boot inside the test VM of packaging/qemu-test.sh, as root, from
# qconnect-vmtest.service, under the real systemd (PID 1). Two stages, one per
# boot, with a reboot in between:
#
# 1. install the .deb (dpkg, with systemd running), enable the socket service,
#    make this VM the qube "work" of a loopback machine whose qube "web" is this
#    same system, record the system's state, `persist add` two bindings (one
#    daemon-mode, one per-connection), reboot;
# 2. check that the service and the bindings came back at boot, serve an HTTP
#    request through each binding (client unit -> loopback qrexec-client-vm ->
#    the socket service's socket -> 127.0.0.1:9000), read the journal fields
#    and the STATUS= lines, `persist remove` both and compare the system with
#    the record; power off.
#
# Every line goes to the console and to /var/lib/qconnect-vmtest/result-STAGE,
# which the host reads from the disk image afterwards; the last line of a
# stage is "STAGE N: passed" or a "FAIL: ..." line.
set -u
export LC_ALL=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

state=/var/lib/qconnect-vmtest
machine=$state/machine
stage=$(cat "$state/stage" 2>/dev/null || echo 1)
result=$state/result-$stage
daemon_spec=8080:web:9000
handoff_spec=8081:web:9000

say() { printf '%s\n' "$*" | tee -a "$result" >/dev/console; }
# Run a command, its output into the result; fail with MESSAGE if it fails.
run() {
    message=$1; shift
    "$@" >"$state/out" 2>&1
    status=$?
    tee -a "$result" <"$state/out" >/dev/console
    [ "$status" = 0 ] || fail "$message (exit $status: $*)"
}
fail() {
    say "FAIL: $*"
    say "--- the end of this boot's journal:"
    journalctl -b --no-pager -n 80 -o short-monotonic | tee -a "$result" >/dev/console
    sync
    systemctl poweroff --no-block
    exit 1
}

# What `persist remove` must give back: every file under the places persist
# writes (with its content), the unit files systemd knows and their state.
snapshot() {
    find /etc /usr/local /root -xdev -printf '%p %y %m %U:%G %l\n' | sort
    find /etc /usr/local /root -xdev -type f -exec sha256sum {} + | sort -k 2
    systemctl list-unit-files --no-legend --no-pager | sort
}

# Whether something listens on 127.0.0.1:PORT (state 0A in /proc/net/tcp).
listening() {
    hex=$(printf '%04X' "$1")
    grep -q "^ *[0-9]*: 0100007F:$hex 00000000:0000 0A" /proc/net/tcp
}

fetch() {
    python3 -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=120).read().decode())' "$1"
}

stage1() {
    say "stage 1: $(uname -r), systemd $(systemctl --version | head -1 | cut -d' ' -f2), PID 1 is $(cat /proc/1/comm), virtualization: $(systemd-detect-virt || true)"
    run "dpkg could not install the package" dpkg -i "$state/qconnect.deb"
    run "qconnect does not run" qconnect --version
    run "the socket service could not be enabled" systemctl enable --now qconnect-connecttcp.socket
    [ -S /run/qubes-rpc/qubes.ConnectTCP ] || fail "no socket at /run/qubes-rpc/qubes.ConnectTCP"
    mkdir -p /etc/qconnect
    echo "9000 work" >/etc/qconnect/connecttcp.allow

    # The loopback machine: this VM is the qube "work" (its qrexec-client-vm
    # is the loopback's) and the qube "web", whose root is this system's /,
    # so the loopback's agent searches the real /run/qubes-rpc first.
    run "loopback init" qconnect loopback init "$machine" --qube work --qube web \
        --policy 'qubes.ConnectTCP +9000 work web allow'
    rm -r "$machine/qubes/web/root"
    ln -s / "$machine/qubes/web/root"
    cat >/usr/bin/qrexec-client-vm <<EOF
#!/bin/sh
# The test VM is the qube "work" of a loopback machine: its client plays qrexec.
export QCONNECT_LOOPBACK_MACHINE=$machine QCONNECT_LOOPBACK_QUBE=work
exec $machine/bin/qrexec-client-vm "\$@"
EOF
    chmod 755 /usr/bin/qrexec-client-vm
    mkdir -p "$state/www"
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$state/www/token"

    snapshot >"$state/before"
    run "persist add (daemon)" qconnect persist add --system --persistence full --mode daemon "$daemon_spec"
    run "persist add (per-connection)" qconnect persist add --system --persistence full "$handoff_spec"
    run "persist list" qconnect persist list
    systemctl list-unit-files --no-legend --no-pager 'qconnect-bind*.socket' | cut -d' ' -f1 >"$state/sockets"
    [ "$(wc -l <"$state/sockets")" = 2 ] || fail "persist add made $(wc -l <"$state/sockets") socket units, not 2"
    echo 2 >"$state/stage"
    say "STAGE 1: passed"
    sync
    systemctl reboot --no-block
}

stage2() {
    say "stage 2: booted again"
    # Back at boot, and idle: sockets listening, no service started yet.
    for unit in qconnect-connecttcp.socket $(cat "$state/sockets"); do
        [ "$(systemctl is-enabled "$unit")" = enabled ] || fail "$unit is not enabled after the reboot"
        [ "$(systemctl is-active "$unit")" = active ] || fail "$unit is not active after the reboot"
        say "ok: $unit enabled and listening at boot"
    done
    [ -S /run/qubes-rpc/qubes.ConnectTCP ] || fail "after the reboot /run/qubes-rpc/qubes.ConnectTCP is not the socket"
    [ -f /run/qubes/rpc-config/qubes.ConnectTCP ] || fail "tmpfiles did not write /run/qubes/rpc-config/qubes.ConnectTCP"
    for unit in qconnect-connecttcp.service qconnect-bindings.service; do
        [ "$(systemctl is-active "$unit")" = inactive ] || fail "$unit runs before any connection"
    done
    listening 8080 && listening 8081 || fail "the bindings do not listen on 127.0.0.1:8080/8081"
    say "ok: the socket service and both bindings are back, nothing running yet"

    run "web server" systemd-run --unit=qconnect-vmtest-web --property=WorkingDirectory="$state/www" \
        python3 -m http.server 9000 --bind 127.0.0.1
    tries=0
    until listening 9000; do
        tries=$((tries + 1))
        [ "$tries" -lt 600 ] || fail "the web server does not listen on 9000"
        sleep 0.1
    done
    token=$(cat "$state/www/token")
    for port in 8080 8081; do
        answer=$(fetch "http://127.0.0.1:$port/token" 2>"$state/out") || {
            tee -a "$result" <"$state/out" >/dev/console; fail "no answer through 127.0.0.1:$port"; }
        [ "$answer" = "$token" ] || fail "127.0.0.1:$port answered '$answer', not '$token'"
        say "ok: a request through 127.0.0.1:$port was served by web:9000"
    done

    journalctl --no-pager -o verbose -t qvm-connect-tcp >"$state/client-journal"
    grep -q '^ *QCONNECT_' "$state/client-journal" || {
        tee -a "$result" <"$state/client-journal" >/dev/console
        fail "journalctl -t qvm-connect-tcp shows no QCONNECT_* field"; }
    say "ok: journalctl -t qvm-connect-tcp: $(grep -o '^ *QCONNECT_[A-Z_]*' "$state/client-journal" | sort -u | tr -d ' ' | tr '\n' ' ')"
    journalctl --no-pager -o verbose -t qconnect-service >"$state/service-journal"
    grep -q '^ *QCONNECT_CALLER=work$' "$state/service-journal" || {
        tee -a "$result" <"$state/service-journal" >/dev/console
        fail "the socket service's journal does not name the caller work"; }
    say "ok: the socket service logged the call with QCONNECT_CALLER=work"
    # The socket service sends its counters every few seconds (STATUS=).
    tries=0
    until systemctl show -p StatusText --value qconnect-connecttcp.service | grep -q ' 2 served'; do
        tries=$((tries + 1))
        [ "$tries" -lt 600 ] || fail "the socket service's STATUS= never counted the 2 calls: $(
            systemctl show -p StatusText --value qconnect-connecttcp.service)"
        sleep 0.1
    done
    for unit in qconnect-bindings.service qconnect-connecttcp.service; do
        line=$(systemctl status --no-pager "$unit" | grep '^ *Status: ')
        [ -n "$line" ] || { systemctl status --no-pager "$unit" | tee -a "$result" >/dev/console
            fail "systemctl status $unit shows no Status: line"; }
        say "ok: systemctl status $unit: $(echo "$line" | sed 's/^ *//')"
    done

    run "stopping the web server" systemctl stop qconnect-vmtest-web.service
    run "persist remove (daemon)" qconnect persist remove --system "$daemon_spec"
    run "persist remove (per-connection)" qconnect persist remove --system "$handoff_spec"
    snapshot >"$state/after"
    diff "$state/before" "$state/after" >"$state/out" || {
        tee -a "$result" <"$state/out" >/dev/console; fail "persist remove did not leave the system as before"; }
    [ -z "$(systemctl list-units --all --plain --no-legend --no-pager 'qconnect-bind*')" ] || {
        systemctl list-units --all --plain --no-legend --no-pager 'qconnect-bind*' | tee -a "$result" >/dev/console
        fail "units of removed bindings are still loaded"; }
    ! listening 8080 && ! listening 8081 || fail "a removed binding still listens"
    say "ok: persist remove left every file and unit as before, nothing listens"
    say "STAGE 2: passed"
    sync
    systemctl poweroff --no-block
}

case $stage in
    1) stage1 ;;
    2) stage2 ;;
    *) fail "unknown stage '$stage'" ;;
esac
