"""The target qube's side of a loopback call: what qrexec-agent does when a call arrives.

It finds the service (``SERVICE+ARG`` before ``SERVICE`` in each directory of
the search path), reads its rpc-config, and opens it: starts an executable
with qrexec's argv and environment, connects to a socket service, or makes
the built-in TCP connection of a ``/dev/tcp/HOST`` symlink. The reference is
qubes-core-qrexec's libqrexec/exec.c (find_file, find_qrexec_service,
exec_qubes_rpc2) and libqrexec/toml.c; failures map to qrexec's exit codes.
Standard library only: this runs in every call.
"""

import os
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qconnect.core import unixpath
from qconnect.core.errors import AgentCallFailed, RpcConfigError
from qconnect.core.qrexec import EXIT_NO_SERVICE, EXIT_QREXEC_PROBLEM
from qconnect.loopback import layout
from qconnect.loopback.rpcconfig import RpcConfig, parse_rpc_config

# Linux's limit on a file name (NAME_MAX): a longer service name cannot exist.
_NAME_MAX = 255

_DEV_TCP = "/dev/tcp"


@dataclass(frozen=True)
class Request:
    """One call as the target's agent receives it from dom0 (already sanitised)."""

    source: str  #: the calling qube, as dom0 names it (trustworthy)
    target: str  #: the qube the policy resolved the call to
    service: str  #: the service name, without argument
    argument: str  #: the part after "+", possibly empty

    @property
    def full_name(self) -> str:
        """``SERVICE+ARG``; dom0 adds the "+" when the caller gave no argument."""
        return f"{self.service}+{self.argument}"

    @property
    def descriptor(self) -> bytes:
        """What a socket service reads first: ``SERVICE+ARG SOURCE`` and a NUL."""
        return f"{self.full_name} {self.source}".encode() + b"\0"


@dataclass(frozen=True)
class FoundService:
    """Where the search path led: ``kind`` is "executable", "socket" or "tcp"."""

    kind: str
    path: str  #: the file found, or the ``/dev/tcp/...`` link target for "tcp"


def _find_file(directories: list[Path], name: str, *, tcp_links: bool) -> FoundService | None:
    """qrexec's find_file: the first existing ``DIR/name``; broken links are skipped."""
    if len(name) > _NAME_MAX or "/" in name or name in ("", ".", ".."):
        return None
    for directory in directories:
        candidate = directory / name
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise AgentCallFailed(
                EXIT_QREXEC_PROBLEM, f"stat {candidate}: {error.strerror}"
            ) from None
        if stat.S_ISLNK(info.st_mode):
            if tcp_links:
                link = os.readlink(candidate)
                if link == _DEV_TCP or link.startswith(_DEV_TCP + "/"):
                    if link == _DEV_TCP + "/":
                        raise AgentCallFailed(EXIT_QREXEC_PROBLEM, "/dev/tcp/ not followed by host")
                    return FoundService("tcp", link)
            try:
                info = os.stat(candidate)
            except FileNotFoundError:
                continue
            except OSError as error:
                raise AgentCallFailed(
                    EXIT_QREXEC_PROBLEM, f"stat {candidate}: {error.strerror}"
                ) from None
        if stat.S_ISSOCK(info.st_mode):
            return FoundService("socket", str(candidate))
        return FoundService("executable", str(candidate))
    return None


def load_config(machine: Path, request: Request) -> RpcConfig:
    """The rpc-config for this call (``SERVICE+ARG`` before ``SERVICE``); errors are 125."""
    directories = layout.rpc_config_path(machine, request.target)
    found = _find_file(directories, request.full_name, tcp_links=False) or _find_file(
        directories, request.service, tcp_links=False
    )
    if found is None:
        return RpcConfig()
    try:
        with open(found.path, encoding="utf-8", errors="surrogateescape") as file:
            return parse_rpc_config(file.read(), source=found.path)
    except RpcConfigError as error:
        raise AgentCallFailed(
            EXIT_QREXEC_PROBLEM, f"cannot load service configuration: {error}"
        ) from None
    except OSError as error:
        raise AgentCallFailed(
            EXIT_QREXEC_PROBLEM, f"failed to load {found.path}: {error}"
        ) from None


def find_service(machine: Path, request: Request) -> FoundService:
    """Search the target's service path; 127 when absent, 125 when unusable."""
    directories = layout.service_path(machine, request.target)
    found = _find_file(directories, request.full_name, tcp_links=True) or _find_file(
        directories, request.service, tcp_links=True
    )
    if found is None:
        raise AgentCallFailed(EXIT_NO_SERVICE, f"Service not found: {request.full_name}")
    if found.kind == "executable" and not os.access(found.path, os.X_OK):
        raise AgentCallFailed(
            EXIT_QREXEC_PROBLEM,
            f"Unknown service type (not executable, not a socket): {found.path}",
        )
    return found


def connect_unix(path: str) -> socket.socket:
    """Connect to a socket service; 125 when nobody listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unixpath.connect_unix(sock, path)
    except OSError as error:
        sock.close()
        raise AgentCallFailed(EXIT_QREXEC_PROBLEM, f"connect {path}: {error.strerror}") from None
    return sock


def _valid_port(text: str) -> bool:
    """qrexec's validate_port: digits, no leading zero, at most 65535."""
    return (
        0 < len(text) <= 5
        and text[0] in "123456789"
        and all(c in "0123456789" for c in text)
        and int(text) <= 65535
    )


def tcp_address(link: str, argument: str) -> tuple[str, str]:
    """(host, port) for a ``/dev/tcp[/HOST[/PORT]]`` link and the call's argument."""
    address = link[len(_DEV_TCP) :]
    host: str | None = None
    port: str | None = None
    if address.startswith("/"):
        host, _, fixed = address[1:].partition("/")
        port = fixed if _ else None
    if port is None:
        if not argument:
            raise AgentCallFailed(
                EXIT_QREXEC_PROBLEM, f"No or empty argument provided, cannot connect to {link}"
            )
        if host is None:
            host, plus, port = argument.rpartition("+")
            if not plus:
                raise AgentCallFailed(
                    EXIT_QREXEC_PROBLEM, f"No port provided, cannot connect to {argument}"
                )
            if "_" in host:
                raise AgentCallFailed(
                    EXIT_QREXEC_PROBLEM, f"Underscore not allowed in hostname {host}"
                )
            host = host.replace("+", ":")
        else:
            port = argument
    elif argument:
        raise AgentCallFailed(
            EXIT_QREXEC_PROBLEM, f"Unexpected argument {argument} to service {link}"
        )
    assert host is not None  # a link without host takes it from the argument above
    return host, port


def _is_loopback(numeric: str) -> bool:
    """127.0.0.0/8, ::1 or IPv4-mapped 127.x, in getaddrinfo's numeric form."""
    numeric = numeric.partition("%")[0].lower()
    return (
        numeric.startswith("127.")
        or numeric == "::1"
        or (numeric.startswith("::ffff:127.") and numeric.count(".") == 3)
    )


def connect_tcp(host: str, port: str) -> socket.socket:
    """The built-in TCP service's connect: numeric host and port only (never DNS).

    The loopback only ever connects to loopback addresses: anything else is a
    refused connection here (a real qube would try it).
    """
    if not _valid_port(port):
        raise AgentCallFailed(EXIT_QREXEC_PROBLEM, f"Invalid port number {port}")
    ipv6_only = ":" in host or "%" in host
    try:
        # Bytes, not str: a str host goes through the idna codec, whose import
        # (stringprep, unicodedata) costs milliseconds per call for nothing.
        infos = socket.getaddrinfo(
            host.encode("ascii", "replace"),
            port,
            socket.AF_INET6 if ipv6_only else socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
            socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
        )
    except socket.gaierror as error:
        raise AgentCallFailed(
            EXIT_QREXEC_PROBLEM, f"getaddrinfo({host}, {port}) failed: {error}"
        ) from None
    family, kind, proto, _, address = infos[0]
    if not _is_loopback(str(address[0])):
        raise AgentCallFailed(
            EXIT_QREXEC_PROBLEM, f"loopback qrexec connects to loopback addresses only, not {host}"
        )
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.connect(address)
    except OSError as error:
        sock.close()
        raise AgentCallFailed(EXIT_QREXEC_PROBLEM, f"connect: {error.strerror}") from None
    return sock


def service_environment(machine: Path, request: Request, base: dict[str, str]) -> dict[str, str]:
    """An executable service's environment: the target qube's, plus qrexec's variables.

    qrexec-agent strips inherited ``QREXEC*`` variables (but QREXEC_SERVICE_PATH
    and QREXEC_AGENT_PID) and adds the call's own.
    """
    kept = {
        key: value
        for key, value in base.items()
        if not key.startswith("QREXEC") or key in ("QREXEC_SERVICE_PATH", "QREXEC_AGENT_PID")
    }
    env = layout.env_for(machine, request.target, kept)
    env["QREXEC_AGENT_PID"] = str(os.getpid())
    env["QREXEC_REQUESTED_TARGET_TYPE"] = ""
    env["QREXEC_SERVICE_FULL_NAME"] = request.full_name
    env["QREXEC_REMOTE_DOMAIN"] = request.source
    env["QREXEC_SERVICE_ARGUMENT"] = request.argument
    return env


@dataclass
class ExecutableService:
    """A started executable: the agent's ends of its stdin, stdout and stderr."""

    process: "subprocess.Popen[bytes]"
    stdin: socket.socket  #: our end of its stdin (a socketpair, as qrexec uses)
    stdout: socket.socket  #: our end of its stdout
    stderr: int  #: read end of its stderr pipe


def start_executable(machine: Path, request: Request, path: str) -> ExecutableService:
    """fork+exec the service as qrexec does: argv[1] is the argument when it is not empty."""
    stdin_ours, stdin_theirs = socket.socketpair()
    stdout_ours, stdout_theirs = socket.socketpair()
    stderr_read, stderr_write = os.pipe()
    argv = [path, request.argument] if request.argument else [path]
    try:
        process = subprocess.Popen(
            argv,
            stdin=stdin_theirs.fileno(),
            stdout=stdout_theirs.fileno(),
            stderr=stderr_write,
            env=service_environment(machine, request, dict(os.environ)),
            cwd=layout.qube_dir(machine, request.target),
        )
    except OSError as error:
        for sock in (stdin_ours, stdout_ours):
            sock.close()
        os.close(stderr_read)
        # qrexec's child exits 127 when execve says ENOENT (a missing
        # interpreter, say) and 125 for any other failure.
        code = EXIT_NO_SERVICE if isinstance(error, FileNotFoundError) else EXIT_QREXEC_PROBLEM
        raise AgentCallFailed(code, f"execve {path}: {error.strerror}") from None
    finally:
        stdin_theirs.close()
        stdout_theirs.close()
        os.close(stderr_write)
    return ExecutableService(process, stdin_ours, stdout_ours, stderr_read)
