"""Step 3 of ``qconnect expose`` in dom0: what answers ``qubes.ConnectTCP +PORT`` in the target.

dom0 asks the target, through ``qvm-run --pass-io --no-autostart``, the
question qrexec-agent itself answers at every call: which file of its
service search path (``QREXEC_SERVICE_PATH``, default ``/run/qubes-rpc``,
``/usr/local/etc/qubes-rpc``, ``/etc/qubes-rpc``; ``SERVICE+ARG`` before
``SERVICE`` in every directory) serves the call, what kind of file it is
(qrexec's built-in ``/dev/tcp`` service, a socket service, an executable),
and which rpc-config file (same rule, ``QUBES_RPC_CONFIG_PATH``) says
whether the service gets the call's descriptor.

The target's answer is hostile text: the script prints a few ``key=value``
lines, read here with a size limit; an unknown key or a value outside its
set is ignored, and every value shown is made printable. dom0 only prints a
conclusion; nothing the target says decides what dom0 runs.

Standard library only (dom0 has no trio).
"""

import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from qconnect.core.install.header import SERVICE_EXECUTABLE_MARK, SERVICE_RPC_CONFIG_MARK
from qconnect.core.printable import printable
from qconnect.core.qrexec import SERVICE

#: dom0's tools (qubes-core-admin-client).
QVM_RUN = "qvm-run"
QVM_PREFS = "qvm-prefs"

# Longest answer read from the target; a real one is a few hundred bytes.
_MAX_ANSWER = 8192
_TIMEOUT = 60

# The script's exit code when it ran to the end (anything else: it did not run).
_DONE = 0

# Run by sh in the target, as root; $1 is the port. It looks, not starts:
# nothing is connected to, nothing executed. (The loopback machine's qvm-run
# sets the two search paths to a loopback qube's directories; a qube's shell
# has neither set, and qrexec-agent then uses the defaults written here.)
_SCRIPT = r"""
port="$1"
first() {  # first() PATH-LIST NAME...: the first existing NAME in the directories, in order
    list="$1"; shift
    for name in "$@"; do
        old_ifs="$IFS"; IFS=:
        for dir in $list; do
            IFS="$old_ifs"
            if [ -e "$dir/$name" ] || [ -L "$dir/$name" ]; then echo "$dir/$name"; return 0; fi
        done
        IFS="$old_ifs"
    done
    return 1
}
services="/run/qubes-rpc:/usr/local/etc/qubes-rpc:/etc/qubes-rpc"
configs="/run/qubes/rpc-config:/usr/local/etc/qubes/rpc-config:/etc/qubes/rpc-config"
service=$(first "${QREXEC_SERVICE_PATH:-$services}" "@SERVICE@+$port" "@SERVICE@")
if [ -n "$service" ]; then
    echo "service=$service"
    link=$(readlink "$service" 2>/dev/null || true)
    case "$link" in
        /dev/tcp/*) echo "kind=tcp"; echo "tcp=${link#/dev/tcp/}" ;;
        *)
            if [ -S "$service" ]; then echo "kind=socket"
            elif [ -L "$service" ] && [ ! -e "$service" ]; then echo "kind=dangling"
            elif [ -f "$service" ] && [ -x "$service" ]; then
                echo "kind=executable"
                if sed -n 2p "$service" 2>/dev/null | grep -qF -- @MARK@; then
                    echo "qconnect=yes"
                fi
            elif [ -f "$service" ]; then echo "kind=not-executable"
            else echo "kind=other"
            fi ;;
    esac
fi
config=$(first "${QUBES_RPC_CONFIG_PATH:-$configs}" "@SERVICE@+$port" "@SERVICE@")
if [ -n "$config" ]; then
    echo "config=$config"
    s='[[:space:]]*'
    value=$(sed -n "s/^${s}skip-service-descriptor$s=$s\\([a-z]*\\)$s\$/\\1/p" "$config" \
        2>/dev/null | tail -n 1)
    echo "skip-descriptor=$value"
    if head -n 1 "$config" 2>/dev/null | grep -qxF -- @CONFIG_MARK@; then
        echo "config-qconnect=yes"
    fi
fi
exit 0
"""

SCRIPT = (
    _SCRIPT.replace("@SERVICE@", SERVICE)
    .replace("@MARK@", shlex.quote(SERVICE_EXECUTABLE_MARK))
    .replace("@CONFIG_MARK@", shlex.quote(SERVICE_RPC_CONFIG_MARK))
)

_KINDS = ("tcp", "socket", "dangling", "executable", "not-executable", "other")
_KEYS = ("service", "kind", "tcp", "qconnect", "config", "skip-descriptor", "config-qconnect")


@dataclass(frozen=True)
class Answer:
    """What the target said serves the call (None: nothing found, or not said)."""

    service: str | None
    kind: str | None
    tcp_host: str | None
    from_qconnect: bool
    config: str | None
    config_from_qconnect: bool  #: the rpc-config is the one ``qconnect service install`` writes
    skip_descriptor: bool | None  #: the rpc-config's value; None: not set (qrexec: false)


def parse_answer(text: str) -> Answer:
    """The script's output, read as hostile: known keys and values only, shown printable."""
    found: dict[str, str] = {}
    for line in text[:_MAX_ANSWER].splitlines():
        key, equals, value = line.partition("=")
        if equals and key in _KEYS and key not in found:
            found[key] = value
    kind = found.get("kind")
    skip = found.get("skip-descriptor")

    def shown(key: str) -> str | None:
        return None if key not in found else printable(found[key])[:300]

    return Answer(
        service=shown("service"),
        kind=kind if kind in _KINDS else None,
        tcp_host=shown("tcp"),
        from_qconnect=found.get("qconnect") == "yes",
        config=shown("config"),
        config_from_qconnect=found.get("config-qconnect") == "yes",
        skip_descriptor={"true": True, "false": False}.get(skip or ""),
    )


def how_to_install(qube: str, template: str | None) -> str:
    """The commands that give ``qube`` qconnect's service (in the qube, or its template)."""
    where = f"run `qconnect service install` in {qube}"
    if template:
        where += (
            f" (it lasts in {qube}'s /usr/local), or `qconnect service install --layout "
            f"template` in its template {template} and restart {qube}"
        )
    return where


def judge(qube: str, via: str, port: int, answer: Answer, template: str | None) -> list[str]:
    """What to tell the user: one line per finding; a line starting "warning:" is a problem."""
    fix = how_to_install(qube, template)
    service = answer.service
    if service is None or answer.kind is None:
        return [
            f"warning: {qube} has no {SERVICE} service, so every call from {via} will fail: {fix}"
        ]
    lines: list[str] = []
    descriptor_sent = answer.skip_descriptor is not True
    config = answer.config or "no rpc-config file"
    if answer.kind == "tcp":
        lines.append(
            f"{qube} answers with {service}: qrexec's built-in service, which connects to "
            f"{answer.tcp_host}:{port} (the server must listen there; qconnect's service "
            f"adds IPv6, half-close and a per-port allowlist: {fix})"
        )
        if descriptor_sent:
            lines.append(
                f"warning: {config} does not set skip-service-descriptor=true, so the server "
                f"on port {port} would receive qrexec's call descriptor before the client's "
                f"bytes: {fix}"
            )
    elif answer.kind == "socket":
        whose = " (qconnect's, with its rpc-config)" if answer.config_from_qconnect else ""
        lines.append(f"{qube} answers with {service}: a socket service{whose}")
        if not descriptor_sent:
            lines.append(
                f"warning: {config} sets skip-service-descriptor=true, so the socket service "
                f"never learns the port and refuses every call: {fix}"
            )
    elif answer.kind == "executable":
        whose = "qconnect's executable service" if answer.from_qconnect else "an executable"
        lines.append(f"{qube} answers with {service}: {whose}")
        if answer.from_qconnect and not descriptor_sent:
            lines.append(
                f"warning: {config} sets skip-service-descriptor=true, so qconnect's service "
                f"cannot read the port and refuses every call: {fix}"
            )
    else:
        reason = {
            "dangling": "a symbolic link to nothing",
            "not-executable": "a file that is not executable",
            "other": "neither a socket nor an executable file",
        }[answer.kind]
        lines.append(
            f"warning: {qube}'s {service} is {reason}, so qrexec cannot serve any call "
            f"from {via}: {fix}"
        )
    return lines


def _template_of(qube: str, env: Mapping[str, str] | None) -> str | None:
    try:
        result = subprocess.run(
            [QVM_PREFS, "--get", qube, "template"], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=_TIMEOUT, check=False, env=env,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = result.stdout.strip()
    if result.returncode != 0 or not name or name in ("None", "-"):
        return None
    return printable(name)[:64]


def check(qube: str, via: str, port: int, env: Mapping[str, str] | None = None) -> list[str]:
    """Ask ``qube`` what answers ``qubes.ConnectTCP +port`` (never starts it); lines to print."""
    argv = [QVM_RUN, "--pass-io", "--no-autostart", "--user", "root", "--no-gui", qube]
    command = f"sh -c {shlex.quote(SCRIPT)} qconnect-check {port}"
    try:
        result = subprocess.run(
            [*argv, command], stdin=subprocess.DEVNULL, capture_output=True,
            timeout=_TIMEOUT, check=False, env=env,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        return [f"warning: could not check {qube}'s {SERVICE} service: {error}"]
    if result.returncode != _DONE:
        return [
            f"warning: {qube}'s {SERVICE} service not checked ({qube} is not running?): "
            f"start {qube} and run this command again, or make sure it has the service: "
            f"{how_to_install(qube, _template_of(qube, env))}"
        ]
    answer = parse_answer(result.stdout[:_MAX_ANSWER].decode(errors="replace"))
    template = None
    if any(line.startswith("warning:") or "qconnect's service adds" in line for line in
           judge(qube, via, port, answer, None)):  # fmt: skip
        template = _template_of(qube, env)
    return judge(qube, via, port, answer, template)
