"""The loopback machine's fork-server: qrexec's long-running side, so a call costs a fork.

A loopback call used to be one Python process that imported the client, the
agent and the policy engine every time (~80 ms of imports, ~135 ms of CPU).
Real qrexec-client-vm is a small C program that hands the call to a
long-running agent; this is our long-running side. It imports everything a
call needs once, listens on ``DIR/run/qrexec.sock``, and for each request of
the per-call entry (``qconnect.loopback.forkcall``) forks a child that takes
the caller's stdin, stdout, stderr, working directory, environment and
command line, and runs the very same ``qconnect.loopback.client.main`` the
in-process path runs: every behaviour of a call is that code's.

The server is one thread (it forks, and a forked thread would be lost): a
``selectors`` loop over the listener, the connections and a wake-up socket
for SIGCHLD and SIGTERM. Per connection: the request (one SOCK_SEQPACKET
message, untrusted: bounded, checked, refused with one log line), the
fork, ``pid N`` back to the caller, and ``exit N`` / ``signal N`` when the
child has been reaped. A caller whose connection closes before its child has
ended was killed: the child is killed too (SIGKILL), as the in-process call
would have died with its process. SIGTERM stops accepting at once; calls
already running finish and get their status, then the server exits.

Resource handling: the server owns the listener, every connection and every
descriptor a request brought; each is closed when its call ends or is
refused. A child closes every descriptor but the caller's three (the
listener and other calls' connections never reach a service).
"""

import contextlib
import gc
import io
import logging
import os
import resource
import select  # noqa: F401
import selectors
import signal
import socket
import stat
import struct
import subprocess  # noqa: F401
import sys
import threading  # noqa: F401
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Everything a call needs is imported here once, so a child starts with it:
# select, subprocess and threading above, the blocking relay and the policy engine
# (``client`` imports the latter lazily) below.
from qconnect.core import fdlimit, unixpath
from qconnect.core.errors import LoopbackError
from qconnect.loopback import client, forkcall
from qconnect.loopback.forkcall import REQUEST_FDS, BadRequest

logger = logging.getLogger("qconnect.loopback.forkserver")

# The listen backlog: a benchmark opens 1,000 connections at once, and each
# caller connects here; a short backlog would refuse some, and a refused
# caller runs its call in-process (correct, but slow).
BACKLOG = 4096

# Seconds a connection may take to send its request: a real caller sends it
# right after connecting; one that sends nothing only holds a descriptor.
REQUEST_SECONDS = 10.0

# Connections waiting for their request at once; beyond it the oldest is
# dropped (a flood of idle connections cannot exhaust the descriptors).
MAX_PENDING = 1024

_CONTROL_SIZE = socket.CMSG_SPACE(REQUEST_FDS * struct.calcsize("i"))
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class _Pending:
    conn: socket.socket
    deadline: float


@dataclass
class _Running:
    pid: int
    conn: socket.socket | None  #: None once the caller has gone


def _ensure_standard_fds() -> None:
    """Open /dev/null on a closed fd 0, 1 or 2, so a received descriptor never lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


class ForkServer:
    """One machine's fork-server; ``serve()`` runs it until SIGTERM or SIGINT."""

    def __init__(self, machine: Path) -> None:
        self.machine = machine.resolve()
        self.path = forkcall.socket_path(str(self.machine))
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.bound_inode = 0
        self.pending: dict[int, _Pending] = {}
        self.running: dict[int, _Running] = {}
        self.stopping = False
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.wake_read, self.wake_write = socket.socketpair()

    # -- set-up ---------------------------------------------------------------

    def _remove_stale_socket(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise LoopbackError(f"{self.path} exists and is not a socket: remove it first")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            unixpath.connect_unix(probe, self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: left by a server that was killed
            return
        finally:
            probe.close()
        raise LoopbackError(f"{self.machine} is already served (something listens on {self.path})")

    def listen(self) -> None:
        """Bind and listen on ``DIR/run/qrexec.sock`` (mode 0600), removing a stale socket."""
        _ensure_standard_fds()
        if not (self.machine / "qubes.json").is_file():
            raise LoopbackError(f"{self.machine} is not a loopback machine: qubes.json is missing")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            unixpath.listen_unix(listener, self.path, mode=0o600, backlog=BACKLOG)
        except OSError as error:
            listener.close()
            raise LoopbackError(f"cannot listen on {self.path}: {error.strerror}") from None
        listener.setblocking(False)
        self.bound_inode = os.lstat(self.path).st_ino
        self.listener = listener
        # One connection and a child's status per call: raise the soft limit
        # for the server (a child gets the original back).
        fdlimit.raise_open_file_limit()
        self.selector.register(listener, selectors.EVENT_READ, self._accept)

    # -- the loop -------------------------------------------------------------

    def serve(self, ready: Callable[[], None] = lambda: None) -> None:
        """Listen, call ``ready()``, and serve until SIGTERM/SIGINT and every call has ended."""
        self.listen()
        self.wake_read.setblocking(False)
        self.wake_write.setblocking(False)
        signal.set_wakeup_fd(self.wake_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.selector.register(self.wake_read, selectors.EVENT_READ, self._drain_wakeups)
        # The objects imported so far live as long as the server: keep them
        # out of the collector's way, so children do not copy their pages.
        gc.freeze()
        ready()
        logger.info("serving %s on %s", self.machine, self.path)
        try:
            while not (self.stopping and not self.running):
                if self.stopping and self.listener is not None:
                    self._close_listener()
                for key, _events in self.selector.select(self._timeout()):
                    self._handle(key)
                self._reap()
                self._expire_pending()
        finally:
            self._close_listener()
            signal.set_wakeup_fd(-1)
        logger.info("stopped")

    def _handle(self, key: selectors.SelectorKey) -> None:
        """Run one event's handler; a failure costs that connection, never the server."""
        try:
            key.data(key.fileobj)
        except Exception as error:  # a bug must not end every other call
            logger.error("error serving a call (continuing): %r", error)
            fd = key.fd
            if fd in self.pending:
                self._drop_pending(fd)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _drain_wakeups(self, sock: object) -> None:
        try:
            while self.wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _timeout(self) -> float | None:
        if not self.pending:
            return None
        first = min(pending.deadline for pending in self.pending.values())
        return max(0.0, first - time.monotonic())

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            if os.lstat(self.path).st_ino == self.bound_inode:
                os.unlink(self.path)
        except OSError:
            pass
        for fd in list(self.pending):
            self._drop_pending(fd)

    # -- connections ------------------------------------------------------------

    def _accept(self, listener: object) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                # EMFILE and friends: the caller's connect succeeded and it
                # now waits; it falls back to in-process when we close it.
                logger.warning("cannot accept a call: %s", error.strerror)
                return
            conn.setblocking(False)
            _pid, uid, _gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.getuid():
                logger.warning(
                    "refused a call from uid %d (only uid %d may call)", uid, os.getuid()
                )
                conn.close()
                continue
            if len(self.pending) >= MAX_PENDING:
                oldest = min(self.pending, key=lambda fd: self.pending[fd].deadline)
                logger.warning("too many connections without a request: dropped the oldest")
                self._drop_pending(oldest)
            self.pending[conn.fileno()] = _Pending(conn, time.monotonic() + REQUEST_SECONDS)
            self.selector.register(conn, selectors.EVENT_READ, self._request)

    def _drop_pending(self, fd: int) -> None:
        self._take_pending(fd).close()

    def _take_pending(self, fd: int) -> socket.socket:
        """The connection waiting on ``fd``, no longer waited on (the caller now owns it)."""
        pending = self.pending.pop(fd)
        self.selector.unregister(pending.conn)
        return pending.conn

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, pending in self.pending.items() if pending.deadline <= now]:
            logger.warning("a connection sent no request within %.0f s: closed", REQUEST_SECONDS)
            self._drop_pending(fd)

    def _request(self, conn_object: object) -> None:
        assert isinstance(conn_object, socket.socket)
        conn = conn_object
        fds: list[int] = []
        try:
            payload, ancillary, flags, _ = conn.recvmsg(
                forkcall.MAX_REQUEST + 1, _CONTROL_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError as error:
            logger.warning("cannot read a call request: %s", error.strerror or error)
            self._drop_pending(conn.fileno())
            return
        self._take_pending(conn.fileno())
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
        try:
            if not payload and not fds:
                conn.close()
                return  # connected and closed without a word: nothing to log
            argv, environ = self._check(payload, fds, flags)
        except (BadRequest, OSError) as error:
            logger.warning("refused a malformed call request: %s", error)
            conn.close()
            self._close_all(fds)
            return
        caller, _uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        self._fork(conn, argv, environ, fds, caller)

    @staticmethod
    def _check(
        payload: bytes, fds: list[int], flags: int
    ) -> tuple[list[bytes], dict[bytes, bytes]]:
        if flags & socket.MSG_TRUNC:
            raise BadRequest(f"request of more than {forkcall.MAX_REQUEST} bytes")
        if flags & socket.MSG_CTRUNC or len(fds) != REQUEST_FDS:
            raise BadRequest(f"expected {REQUEST_FDS} descriptors (stdin, stdout, stderr, cwd)")
        argv, environ = forkcall.decode_request(payload)
        if not stat.S_ISDIR(os.fstat(fds[3]).st_mode):
            raise BadRequest("the working directory descriptor is not a directory")
        return argv, environ

    @staticmethod
    def _close_all(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- calls ----------------------------------------------------------------

    def _fork(
        self,
        conn: socket.socket,
        argv: list[bytes],
        environ: dict[bytes, bytes],
        fds: list[int],
        caller: int,
    ) -> None:
        """Fork the call's child; ``caller`` is the pid of the qrexec-client-vm that asked."""
        try:
            pid = os.fork()
        except OSError as error:
            logger.warning("cannot fork a call (the caller runs it itself): %s", error.strerror)
            conn.close()
            self._close_all(fds)
            return
        if pid == 0:
            self._child(argv, environ, fds, caller)  # never returns
        self._close_all(fds)
        self.running[pid] = _Running(pid, conn)
        try:
            conn.send(b"pid %d" % pid)
        except OSError:
            self._caller_gone(pid)
            return
        self.selector.register(conn, selectors.EVENT_READ, lambda _conn: self._caller_readable(pid))

    def _caller_readable(self, pid: int) -> None:
        """The caller sends nothing after its request: this is its end (or junk, dropped)."""
        conn = self.running[pid].conn
        assert conn is not None
        try:
            if conn.recv(forkcall.MAX_REPLY):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._caller_gone(pid)

    def _caller_gone(self, pid: int) -> None:
        """The caller died before its call: the call dies too (it was that process, in-process)."""
        running = self.running[pid]
        if running.conn is not None:
            if self.selector.get_map().get(running.conn.fileno()) is not None:
                self.selector.unregister(running.conn)
            running.conn.close()
            running.conn = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            running = self.running.pop(pid, None)
            if running is None or running.conn is None:
                continue
            if os.WIFSIGNALED(status):
                reply = b"signal %d" % os.WTERMSIG(status)
            else:
                reply = b"exit %d" % os.waitstatus_to_exitcode(status)
            self.selector.unregister(running.conn)
            with contextlib.suppress(OSError):
                running.conn.send(reply)
            running.conn.close()

    def _child(
        self, argv: list[bytes], environ: dict[bytes, bytes], fds: list[int], caller: int
    ) -> None:
        """Become the call: the caller's descriptors, directory and environment, then client.main.

        Never returns. Every server descriptor is closed here by number; the
        Python objects that held them are frozen out of the collector and
        stay referenced from this stack, so none is ever closed twice.
        """
        status = 1
        try:
            gc.freeze()
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            for target in (0, 1, 2):
                os.dup2(fds[target], target)
            os.fchdir(fds[3])
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
            os.environb.clear()
            os.environb.update(environ)
            _fresh_standard_streams()
            client.main(
                [os.fsdecode(word) for word in argv], machine=str(self.machine), caller_pid=caller
            )
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            with _suppress_all():
                traceback.print_exc()
        finally:
            with _suppress_all():
                sys.stderr.flush()
            os._exit(status)


class _suppress_all:
    """``contextlib.suppress(BaseException)`` for the child's last words, without contextlib."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _fresh_standard_streams() -> None:
    """New sys.stdin/stdout/stderr on the caller's descriptors, as a fresh interpreter has.

    The server's own stream objects may hold buffered bytes or state of
    their own; a call must start from empty ones. A directory on one of them
    ends the call as it ends a Python start (exit 1, one line).
    """
    encoding = sys.stdout.encoding if sys.stdout else "utf-8"
    errors = sys.stdout.errors if sys.stdout else "strict"
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.write(2, f"qrexec-client-vm: <{name}> is a directory, cannot continue\n".encode())
            os._exit(1)
    sys.stdin = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding, errors
    )
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
        encoding,
        errors,
        line_buffering=os.isatty(1),
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding, "backslashreplace", write_through=True
    )


def serve(machine: Path) -> None:
    """``qconnect loopback serve DIR``, in the foreground; prints "listening on PATH" when ready."""

    def ready() -> None:
        print(f"listening on {forkcall.socket_path(str(machine.resolve()))}", flush=True)

    ForkServer(machine).serve(ready)
