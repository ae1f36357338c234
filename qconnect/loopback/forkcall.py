"""The per-call loopback ``qrexec-client-vm`` entry: hand the call to the machine's fork-server.

Real qrexec-client-vm is a small C program that passes the call to a
long-running agent. Ours does the same: it connects to the fork-server of its
loopback machine (``qconnect.loopback.forkserver``, ``DIR/run/qrexec.sock``),
sends its command line, its environment, its standard descriptors and its
working directory, and waits for the exit status of the child the server
forked for the call; SIGTERM, SIGINT and SIGHUP it receives are passed on to
that child. With no server there (no socket, a stale one, a refusal before
the call started) it runs the call itself, in-process, as before:
``qconnect.loopback.client.main``.

This module runs in every call, so it imports ``_socket``, ``_signal``, ``os``
and ``sys`` only (``socket`` and ``signal`` cost ~10-20 ms each to import;
the whole entry costs ~1 ms on top of the interpreter's start). The wire
format (pure functions below) is shared with the server:

- request, one SOCK_SEQPACKET message: ``MAGIC NUL argc NUL argv... env...``
  (every field NUL-terminated, env entries ``KEY=VALUE``), at most
  ``MAX_REQUEST`` bytes, with ``REQUEST_FDS`` descriptors attached
  (SCM_RIGHTS): fd 0, 1, 2 and the working directory (O_PATH);
- replies: ``pid N`` once the child is forked, then ``exit N`` or
  ``signal N`` when it has ended.
"""

import _signal  # type: ignore[import-not-found]  # no stub; signal costs ~10 ms
import _socket
import os
import sys

from qconnect.core import unixpath

#: The fork-server's socket, relative to the machine directory.
SOCKET_PATH = ("run", "qrexec.sock")

#: ``layout.MACHINE_ENV``, repeated here: layout imports pathlib (~10 ms).
MACHINE_ENV = "QCONNECT_LOOPBACK_MACHINE"

#: First field of a request: the protocol and its version.
MAGIC = b"qconnect-loopback-call/1"

# The largest request: a command line and an environment are a few KiB; 128
# KiB is far above any real one and below the default socket send buffer
# (~208 KiB), which bounds one SOCK_SEQPACKET message. A larger request is
# not sent: the call runs in-process instead.
MAX_REQUEST = 128 * 1024

#: Descriptors sent with a request: stdin, stdout, stderr, working directory.
REQUEST_FDS = 4

# The largest reply ("signal 64", "pid 4194304"): replies are read with this bound.
MAX_REPLY = 64

# The signals a caller passes on to its call: those a user or a supervisor
# sends to end a qrexec-client-vm. Anything else (SIGKILL included) ends only
# the caller; the server then sees its connection close and kills the call.
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)

# Signals whose default action dumps core: a call that died of one is
# reported as exit 128+N rather than reproduced on the caller (no core file).
_CORE_SIGNALS = frozenset(
    getattr(_signal, name)
    for name in ("SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE", "SIGSEGV", "SIGSYS")
    if hasattr(_signal, name)
)


class BadRequest(ValueError):
    """A request the server refuses (malformed, oversized, wrong descriptors)."""


def socket_path(machine: str) -> str:
    return os.path.join(machine, *SOCKET_PATH)


def encode_request(argv: list[bytes], environ: dict[bytes, bytes]) -> bytes:
    """The request's bytes; fields containing NUL cannot exist (C strings) and are refused."""
    fields = [MAGIC, b"%d" % len(argv), *argv]
    fields += [key + b"=" + value for key, value in environ.items()]
    if any(b"\0" in field for field in fields):
        raise BadRequest("a NUL inside an argument or the environment")
    return b"".join(field + b"\0" for field in fields)


def decode_request(payload: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """(argv, environment) of a request; BadRequest for anything else (untrusted input)."""
    if len(payload) > MAX_REQUEST:
        raise BadRequest(f"request of more than {MAX_REQUEST} bytes")
    if not payload.endswith(b"\0"):
        raise BadRequest("request does not end with NUL")
    fields = payload[:-1].split(b"\0")
    if fields[0] != MAGIC:
        raise BadRequest(f"request does not start with {MAGIC.decode()}")
    count_text = fields[1] if len(fields) > 1 else b""
    if not count_text.isdigit() or len(count_text) > 6:
        raise BadRequest(f"bad argument count {count_text[:20]!r}")
    count = int(count_text)
    if count > len(fields) - 2:
        raise BadRequest(f"argument count {count} beyond the request's {len(fields) - 2} fields")
    argv = fields[2 : 2 + count]
    environ: dict[bytes, bytes] = {}
    for entry in fields[2 + count :]:
        key, equals, value = entry.partition(b"=")
        if not key or not equals:
            raise BadRequest(f"bad environment entry {entry[:40]!r}")
        environ[key] = value
    return argv, environ


def decode_reply(reply: bytes) -> tuple[str, int]:
    """("pid" | "exit" | "signal", number), or ("", 0) for anything else."""
    kind, _, number = reply.partition(b" ")
    if kind in (b"pid", b"exit", b"signal") and number.isdigit() and len(number) < 12:
        return kind.decode(), int(number)
    return "", 0


class _Forwarder:
    """Signal handlers that pass SIGTERM/SIGINT/SIGHUP on to the call's child.

    A signal that comes before the child's pid is known waits in ``pending``.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.pending: list[int] = []
        # A signal this process was started ignoring stays ignored, as it
        # would in-process; but client.main always restores SIGINT's default.
        self.previous = {
            signum: handler
            for signum in FORWARDED_SIGNALS
            if (handler := _signal.getsignal(signum)) != _signal.SIG_IGN or signum == _signal.SIGINT
        }
        for signum in self.previous:
            _signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.pid:
            self._kill(signum)
        else:
            self.pending.append(signum)

    def _kill(self, signum: int) -> None:
        try:  # noqa: SIM105 (contextlib costs milliseconds to import, per call)
            os.kill(self.pid, signum)
        except OSError:
            pass  # the child has just ended: its status is on the way

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            self._kill(signum)
        self.pending.clear()

    def restore(self) -> None:
        """The handlers from before; a signal that came meanwhile is re-raised on us."""
        for signum, handler in self.previous.items():
            _signal.signal(signum, handler)
        for signum in self.pending:
            os.kill(os.getpid(), signum)


def _connect(machine: str) -> "_socket.socket | None":
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        unixpath.connect_unix(sock, socket_path(machine))
    except OSError:
        sock.close()
        return None
    return sock


def _send_request(sock: "_socket.socket", argv: list[str]) -> bool:
    """Send the call; False when it cannot be sent (too large, a closed stdio descriptor)."""
    try:
        payload = encode_request([os.fsencode(word) for word in argv], dict(os.environb))
    except BadRequest:
        return False
    if len(payload) > MAX_REQUEST:
        return False
    try:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, cwd))
        sock.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    except OSError:
        return False
    finally:
        os.close(cwd)
    return True


def _reply(sock: "_socket.socket") -> tuple[str, int]:
    try:
        return decode_reply(sock.recv(MAX_REPLY))
    except OSError:
        return "", 0


def _exit(kind: str, number: int) -> None:
    """End this process as the call ended: its exit code, or its signal."""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 (contextlib costs milliseconds to import, per call)
            stream.flush()
        except (OSError, ValueError):
            pass
    if kind == "signal" and number not in _CORE_SIGNALS:
        _signal.signal(number, _signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(128 + number if kind == "signal" else number)


def _in_process(argv: list[str], machine: str) -> None:
    from qconnect.loopback.client import main as run_call

    run_call(argv, machine=machine)


def main(machine: str, argv: list[str] | None = None) -> None:
    """Run one call through the fork-server, or in-process without one; never returns.

    ``machine`` is the directory baked into the generated launcher;
    QCONNECT_LOOPBACK_MACHINE overrides it, as in ``client.main``.
    """
    words = sys.argv[1:] if argv is None else argv
    machine_dir = os.environ.get(MACHINE_ENV) or machine
    sock = _connect(machine_dir)
    if sock is None:
        _in_process(words, machine)
        return
    forwarder = _Forwarder()
    try:
        kind, pid = _reply(sock) if _send_request(sock, words) else ("", 0)
        if kind != "pid":
            # Refused before anything ran (busy, junk, a failed fork): run it here.
            forwarder.restore()
            sock.close()
            _in_process(words, machine)
            return
        forwarder.started(pid)
        # The child holds the caller's stdin and stdout now; letting go of
        # ours gives the reader EOF when the call closes them, as in-process.
        for fd in (0, 1):
            try:  # noqa: SIM105 (contextlib costs milliseconds to import, per call)
                os.close(fd)
            except OSError:
                pass
        kind, number = _reply(sock)
        while kind == "pid":  # a repeated pid reply is junk: wait for the status
            kind, number = _reply(sock)
    finally:
        sock.close()
    if kind not in ("exit", "signal"):
        os.write(2, b"qrexec-client-vm: the loopback qrexec server went away during the call\n")
        os._exit(255)
    _exit(kind, number)
