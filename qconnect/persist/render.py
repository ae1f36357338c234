"""The unit renderer: a binding and its settings in, unit file texts out. Pure.

Templates live in ``systemd-units/*.in`` (``string.Template`` syntax) and are
read by :func:`load_templates`; everything else here is text in, text out.

Naming: a binding's units are named after the whole binding, so the name is
deterministic, valid for every spec (``@default``, ``@dispvm:NAME``, IPv6
bind addresses) and can be read back into the spec. The four fields are
joined with ``/`` and the result escaped as ``systemd-escape`` does it (so
``/`` becomes ``-``); no ``:`` is left in a name, since tools that take
``PATH:NAME`` arguments (``systemd-analyze verify``) misread it: IPv6
addresses write ``:`` as ``_`` and ``@dispvm:NAME`` writes it as ``=``
(as in the FileDescriptorName):

- ``127.0.0.1:8080:web:80`` -> ``qconnect-bind-127.0.0.1-8080-web-80.socket``
- ``[::1]:444:@default:444`` -> ``qconnect-bind-__1-444-\\x40default-444.socket``
- ``9000:@dispvm:my-dvm:22`` ->
  ``qconnect-bind-127.0.0.1-9000-\\x40dispvm\\x3dmy\\x2ddvm-22.socket``
"""

import re
import shlex
import string
import textwrap
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from qconnect.core.errors import PersistError, QconnectError
from qconnect.core.install.header import PERSIST_MARK, persist_header, read_persist_header
from qconnect.core.printable import printable
from qconnect.core.qrexec import MAX_CALLS_IN_FLIGHT, service_call
from qconnect.core.resources import data_path
from qconnect.core.spec import BindingSpec, parse_spec
from qconnect.persist.escape import escape, is_valid_unit_name, unescape
from qconnect.persist.unitfile import check_comment_block, check_line, directives, exec_line

#: Every unit of a binding starts with this; the rest is the escaped spec.
UNIT_PREFIX = "qconnect-bind-"

#: The one service that serves every daemon-mode binding of a scope.
DAEMON_SERVICE = "qconnect-bindings.service"

#: First line of every unit file this tool generates: the mark by which it
#: recognises its own files and refuses to touch anyone else's
#: (written and read by :mod:`qconnect.core.install.header`).
GENERATED_MARK = PERSIST_MARK

# systemd's own default for MaxConnections=. Below MAX_CALLS_IN_FLIGHT (the
# 128 qrexec calls one qube may have in flight), leaving room for the qube's
# other calls; past the limit systemd refuses new connections at once
# instead of qrexec refusing them one call later.
DEFAULT_MAX_CONNECTIONS = 64

# How long socat (the fallback relay) keeps the second direction open after
# the first one ended: socat's -t. Its default of 0.5 s would cut off a
# server still answering a client that half-closed; one year means "until
# the other side ends too", which is what a TCP half-close means.
SOCAT_HALF_CLOSE_TIMEOUT = 31_536_000

#: Where the executables live in a Qubes qube.
DEFAULT_QREXEC_CLIENT_VM = "/usr/bin/qrexec-client-vm"
DEFAULT_SOCAT = "/usr/bin/socat"

#: The daemon-mode client's option to serve sockets passed by systemd.
QVM_CONNECT_TCP_SYSTEMD_OPTION = "--systemd"

# An executable path written into ExecStart= (and, for socat, into a
# ``sh -c`` command): absolute, and only characters that need no quoting in
# systemd or a shell, so no quoting rule of either can be got wrong.
_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_./+-]+")

# Linux's NAME_MAX and PATH_MAX (less its NUL): systemd refuses an
# executable path with a longer component ("neither a valid executable name
# nor an absolute path") and the kernel one longer than the whole.
_NAME_MAX = 255
_PATH_MAX = 4095

# Template placeholders that hold whole comment lines; every other
# placeholder is a value within one line.
_COMMENT_PLACEHOLDERS = frozenset({"header", "relay_note"})

_TEMPLATE_NAMES = (
    "qconnect-bind-per-connection.socket.in",
    "qconnect-bind-per-connection@.service.in",
    "qconnect-bind-daemon.socket.in",
    "qconnect-bindings.service.in",
)


class Mode(StrEnum):
    """How connections reach qrexec: a process per connection, or one client for all."""

    PER_CONNECTION = "per-connection"
    DAEMON = "daemon"


class Scope(StrEnum):
    """Which systemd instance runs the units: the user's manager or the system's."""

    USER = "user"
    SYSTEM = "system"


class Relay(StrEnum):
    """Per-connection mode: who moves the bytes between the connection and qrexec.

    ``handoff``: the connection is ``qrexec-client-vm --use-stdin-socket``'s
    fd 0, no other process. ``socat``: for a qrexec-client-vm without that
    option, which signals the remote's EOF by closing its stdout (no EOF at
    all when stdout is the connection, as in StandardInput=socket); socat,
    run as qrexec-client-vm's local program, turns each side's EOF into a
    ``shutdown()`` of the other, keeping half-close correct.
    """

    HANDOFF = "handoff"
    SOCAT = "socat"


@dataclass(frozen=True)
class Binding:
    """One permanent binding and every setting that shapes its unit files."""

    spec: BindingSpec
    scope: Scope
    mode: Mode
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    relay: Relay = Relay.HANDOFF
    qrexec_client_vm: str = DEFAULT_QREXEC_CLIENT_VM
    socat: str = DEFAULT_SOCAT

    @property
    def unit_prefix(self) -> str:
        return unit_prefix(self.spec)

    @property
    def socket_unit(self) -> str:
        return f"{self.unit_prefix}.socket"

    @property
    def service_unit(self) -> str:
        """The service the socket starts: a template per connection, or the shared daemon."""
        if self.mode is Mode.PER_CONNECTION:
            return f"{self.unit_prefix}@.service"
        return DAEMON_SERVICE


@dataclass(frozen=True)
class Templates:
    """The texts of ``systemd-units/*.in``, keyed by file name."""

    texts: dict[str, str]

    def render(self, name: str, **values: str) -> str:
        """The template ``name`` filled with ``values``, each checked for systemd's syntax.

        Every value must be one line of printable ASCII without a specifier
        or a continuation (the header and notes: comment lines only), and
        the result must hold exactly the directives of the template itself:
        a value can never add, drop or split a directive. PersistError if not.
        """
        for key, value in values.items():
            if key in _COMMENT_PLACEHOLDERS:
                check_comment_block(value, key.replace("_", " "))
            else:
                check_line(value, key.replace("_", " "))
        template = string.Template(self.texts[name])
        text = template.substitute(values)
        placeholders = {key: "#" if key in _COMMENT_PLACEHOLDERS else "x" for key in values}
        meant = [(item.section, item.key) for item in directives(template.substitute(placeholders))]
        if [(item.section, item.key) for item in directives(text)] != meant:
            raise PersistError(f"{name}: a value changed the unit's directives; nothing written")
        return text


@dataclass(frozen=True)
class GeneratedInfo:
    """What the header of a file this tool generated says about it."""

    spec: BindingSpec | None  #: None for the shared daemon service
    mode: Mode
    scope: Scope
    command: str


def template_directory() -> Path:
    """Where the unit templates are: the source tree, or ``share/qconnect`` when installed."""
    return data_path("systemd-units")


def load_templates(directory: Path | None = None) -> Templates:
    """Read the unit templates (the only I/O of this module)."""
    directory = template_directory() if directory is None else directory
    texts: dict[str, str] = {}
    for name in _TEMPLATE_NAMES:
        try:
            texts[name] = (directory / name).read_text()
        except OSError as error:
            raise PersistError(
                f"cannot read the unit template {directory / name}: {error.strerror}"
            ) from None
    return Templates(texts)


def unit_key(spec: BindingSpec) -> str:
    """The binding as one ':'-free string, fields joined by '/' (see the module docstring)."""
    bind = spec.bind_address.replace(":", "_")
    target = spec.target.replace(":", "=")
    return f"{bind}/{spec.local_port}/{target}/{spec.remote_port}"


def unit_prefix(spec: BindingSpec) -> str:
    """The deterministic unit name stem of a binding (see the module docstring)."""
    name = UNIT_PREFIX + escape(unit_key(spec))
    if not is_valid_unit_name(f"{name}@.service"):  # cannot happen for a parsed spec
        raise PersistError(f"binding {spec} gives no valid systemd unit name")
    return name


def spec_from_unit_name(name: str) -> BindingSpec | None:
    """The binding a unit of ours is named after, or None if ``name`` is not one of ours."""
    stem = name.rpartition(".")[0].partition("@")[0]
    if not stem.startswith(UNIT_PREFIX):
        return None
    try:
        fields = unescape(stem[len(UNIT_PREFIX) :]).split("/")
        if len(fields) != 4:
            return None
        bind, local_port, target, remote_port = fields
        bind_host = f"[{bind.replace('_', ':')}]" if "_" in bind else bind
        spec = parse_spec(f"{bind_host}:{local_port}:{target.replace('=', ':')}:{remote_port}")
    except (ValueError, QconnectError):
        return None
    return spec if unit_prefix(spec) == stem else None


def check_executable_path(path: str, what: str) -> str:
    """Return ``path`` if it can go into ExecStart= unquoted, else raise PersistError.

    Absolute and normalised (no empty, ``.`` or ``..`` component, no
    trailing ``/``, which systemd takes for a directory), of letters,
    digits and ``_.+-`` only, and within Linux's name and path lengths.
    """
    components = path.split("/")[1:]
    if (
        not _SAFE_PATH_RE.fullmatch(path)
        or len(path) > _PATH_MAX
        or any(part in ("", ".", "..") or len(part) > _NAME_MAX for part in components)
    ):
        raise PersistError(
            f"invalid {what} path '{printable(path[:80])}': expected an absolute, normalised "
            "path of letters, digits and '_.+-' between its '/'s"
        )
    return path


def check_max_connections(value: int) -> int:
    if not 1 <= value <= MAX_CALLS_IN_FLIGHT:
        raise PersistError(
            f"invalid --max-connections {value}: expected 1 to {MAX_CALLS_IN_FLIGHT} "
            f"(a qube has at most {MAX_CALLS_IN_FLIGHT} qrexec calls in flight)"
        )
    return value


def command_line(binding: Binding) -> str:
    """The canonical ``qconnect persist add`` command that generates exactly these files."""
    words = ["qconnect", "persist", "add", str(binding.spec), f"--{binding.scope}"]
    words += ["--mode", str(binding.mode)]
    if binding.mode is Mode.PER_CONNECTION:
        words += ["--max-connections", str(binding.max_connections)]
        words += ["--relay", str(binding.relay)]
        if binding.qrexec_client_vm != DEFAULT_QREXEC_CLIENT_VM:
            words += ["--qrexec-client-vm", binding.qrexec_client_vm]
        if binding.relay is Relay.SOCAT and binding.socat != DEFAULT_SOCAT:
            words += ["--socat", binding.socat]
    return shlex.join(words)


def remove_command(binding: Binding) -> str:
    return shlex.join(["qconnect", "persist", "remove", str(binding.spec), f"--{binding.scope}"])


def header(*, what: str, command: str, remove: str, settings: str) -> str:
    """The comment every generated file starts with: what made it, how, how to undo it."""
    return persist_header(what=what, command=command, remove=remove, settings=settings)


def per_connection_exec_start(binding: Binding) -> str:
    """The ExecStart= of one connection's service: qrexec-client-vm, alone or with socat.

    Handoff: the connection (fd 0, ``StandardInput=socket``) is used for both
    directions by qrexec-client-vm itself. Fallback, for a qrexec-client-vm
    without ``--use-stdin-socket`` (Qubes before 2024): qrexec-client-vm runs
    socat as its LOCAL_PROGRAM, talking to the call over a socketpair it
    shuts or closes on the remote's EOF, and socat reaches the connection
    through ``SAVED_FD_0`` (qrexec-client-vm's own stdin, which it passes to
    every local program, since Qubes 4.0). ``shut-down`` on both addresses makes
    socat pass each EOF on as ``shutdown(SHUT_WR)`` (its default for an fd of
    unknown kind is to do nothing while the other direction still runs). The
    call's side is the dual address ``STDIN!!STDOUT,shut-down``, whose options
    belong to the address socat writes to: socat 1.8 no longer applies
    ``STDIO,shut-down`` to fd 1, so the client's EOF would never reach the call.
    (``socat FD:0 EXEC:...,pipes`` is no option: socat 1.7 keeps both ends of
    its pipes, so the close that signals EOF never reaches it.) The words
    are joined by :func:`exec_line`, which quotes the ``sh -c`` command and
    writes its ``$`` as systemd's ``$$``.
    """
    qrexec_client_vm = check_executable_path(binding.qrexec_client_vm, "qrexec-client-vm")
    call = ["--", binding.spec.qrexec_target, service_call(binding.spec.remote_port)]
    if binding.relay is Relay.HANDOFF:
        return exec_line([qrexec_client_vm, "--use-stdin-socket", *call])
    socat = check_executable_path(binding.socat, "socat")
    connection = "FD:${SAVED_FD_0},shut-down"
    relay = f"exec {socat} -t {SOCAT_HALF_CLOSE_TIMEOUT} STDIN!!STDOUT,shut-down {connection}"
    return exec_line([qrexec_client_vm, *call, "/bin/sh", "-c", relay])


def daemon_exec_start(qvm_connect_tcp: str) -> str:
    path = check_executable_path(qvm_connect_tcp, "qvm-connect-tcp")
    return exec_line([path, QVM_CONNECT_TCP_SYSTEMD_OPTION])


def render_binding(binding: Binding, templates: Templates) -> dict[str, str]:
    """Unit file name -> text for one binding (the shared daemon service not included)."""
    if binding.mode is Mode.PER_CONNECTION:  # its values, checked before any reaches the text
        exec_start = per_connection_exec_start(binding)
        check_max_connections(binding.max_connections)
    settings = f"{binding.spec} {binding.mode} {binding.scope}"
    top = header(
        what=f"Binding {binding.spec} ({binding.mode}, {binding.scope} scope).",
        command=command_line(binding),
        remove=remove_command(binding),
        settings=settings,
    )
    listen = f"{binding.spec.bind_host}:{binding.spec.local_port}"
    common = {
        "header": top,
        "binding": str(binding.spec),
        "listen": listen,
        "service_unit": binding.service_unit,
    }
    if binding.mode is Mode.PER_CONNECTION:
        if binding.relay is Relay.HANDOFF:
            note = (
                "The connection is qrexec-client-vm's fd 0 for both directions "
                "(--use-stdin-socket): no other process, correct half-close."
            )
        else:
            note = (
                "This qrexec-client-vm has no --use-stdin-socket: socat, its local program, "
                "relays so that each side's EOF becomes a shutdown() of the other."
            )
        return {
            binding.socket_unit: templates.render(
                "qconnect-bind-per-connection.socket.in",
                **common,
                max_connections=str(binding.max_connections),
            ),
            binding.service_unit: templates.render(
                "qconnect-bind-per-connection@.service.in",
                **common,
                exec_start=exec_start,
                relay_note="\n".join(f"# {line}" for line in textwrap.wrap(note, 76)),
            ),
        }
    return {
        binding.socket_unit: templates.render(
            "qconnect-bind-daemon.socket.in", **common, fd_name=binding.spec.fd_name
        )
    }


def render_daemon_service(scope: Scope, qvm_connect_tcp: str, templates: Templates) -> str:
    """The shared service of daemon mode; it exists while any daemon-mode binding does."""
    exec_start = daemon_exec_start(qvm_connect_tcp)
    words = ["qconnect", "persist", "add", "SPEC", f"--{scope}", "--mode", "daemon"]
    command = shlex.join([*words, "--qvm-connect-tcp", qvm_connect_tcp])
    top = header(
        what=f"The client serving every daemon-mode binding ({scope} scope).",
        command=command,
        remove=f"removed with the last daemon-mode binding of the {scope} scope",
        settings=f"- {Mode.DAEMON} {scope}",
    )
    return templates.render("qconnect-bindings.service.in", header=top, exec_start=exec_start)


def parse_generated(text: str) -> GeneratedInfo | None:
    """Read the header of a file; None unless this tool generated it."""
    found = read_persist_header(text)
    if found is None or len(found.settings) != 3:
        return None
    words = found.settings
    try:
        spec = None if words[0] == "-" else parse_spec(words[0])
        return GeneratedInfo(spec, Mode(words[1]), Scope(words[2]), found.command)
    except (ValueError, QconnectError):
        return None


def exec_start_of(unit_text: str) -> str:
    """The ExecStart= value of a unit text (for ``show`` and for tests that run it)."""
    return _value_of(unit_text, "ExecStart")


def listen_of(unit_text: str) -> str:
    return _value_of(unit_text, "ListenStream")


def _value_of(unit_text: str, key: str) -> str:
    for line in unit_text.splitlines():
        if line.startswith(f"{key}="):
            return line[len(key) + 1 :]
    raise PersistError(f"no {key}= in unit text")
