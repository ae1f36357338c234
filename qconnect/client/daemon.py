"""Starting a client process: bind, then either stay attached or go to the background.

``qvm-connect-tcp`` is run from terminals and from ``/rw/config/rc.local``,
so by default it must return, as the original does; unlike the original it
returns only once every listener is bound and the background process is
serving, and reports a bind failure with a non-zero exit status.
"""

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio

import qconnect
from qconnect.client import qrexec_call
from qconnect.client.listeners import Listener
from qconnect.client.registry import (
    control_socket_path,
    ensure_runtime_dir,
    log_file_path,
)
from qconnect.client.server import ClientServer, ServerOptions
from qconnect.core.errors import ClientError, PrivilegedPortError
from qconnect.core.logs import PrintableFormatter, setup_logging
from qconnect.core.printable import printable
from qconnect.core.qrexec_client import LOOPBACK_MACHINE_ENV, LOOPBACK_QUBE_ENV
from qconnect.core.unixpath import listen_unix

logger = logging.getLogger("qconnect.client")

LOG_IDENTIFIER = "qvm-connect-tcp"

#: Set in the environment of the copy of us that sudo runs, so that a sudo
#: which does not really give root cannot make us loop, and so that the copy
#: finds qrexec-client-vm without trusting PATH (qrexec_call).
SUDO_MARK_ENV = qrexec_call.SUDO_MARK_ENV

#: Seconds the shell waits for the background process to say it is serving.
#: It only has to set up logging and start its event loop: well under a
#: second; the margin is for a loaded machine.
READY_TIMEOUT = 30.0

#: Where journald takes log streams: present on every systemd machine (every
#: Qubes qube), absent in a bare container.
JOURNAL_SOCKET = "/run/systemd/journal/stdout"


def bind_or_sudo(bind: Callable[[], list[Listener]]) -> list[Listener]:
    """Bind every listener; for a port below 1024 without root, re-run ourselves under sudo.

    An app qube's default user has passwordless sudo (as the original relied
    on); ``sudo -n`` never prompts, so without it the error says what to do.
    The command sudo runs is :func:`root_argv`'s: nothing in it comes from the
    working directory or the user's PATH. sudo itself is found on PATH, as the
    user's shell finds it when they type ``sudo``.
    """
    try:
        return bind()
    except PrivilegedPortError as error:
        if os.geteuid() == 0 or os.environ.get(SUDO_MARK_ENV) == "1":
            raise
        sudo = shutil.which("sudo")
        if sudo is None:
            raise
        check = subprocess.run([sudo, "-n", "true"], capture_output=True, timeout=30, check=False)
        if check.returncode != 0:
            raise ClientError(f"{error} (sudo needs a password here)") from None
        argv = root_argv(sudo, sys.argv[1:], os.environ)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sudo, argv)


#: Where ``env`` is: /usr/bin on every distribution with a merged /usr (all
#: of Qubes' templates), /bin on the others. sudo would look a bare ``env`` up
#: on the user's PATH when its sudoers has no secure_path.
ENV_PROGRAMS = ("/usr/bin/env", "/bin/env")

#: What the root copy runs, with ``python -I`` (no working directory, no
#: PYTHON* variables, no user site-packages on sys.path): the directory this
#: very process imported qconnect from goes first on sys.path, so root runs
#: the code the user ran, found from where it is installed, never from the
#: directory sudo was started in.
ROOT_ENTRY = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from qconnect.client.cli import main; sys.exit(main())"
)

#: Variables the root copy keeps from the user's environment (sudo drops the
#: rest, PATH included: root gets sudo's secure_path). A process "inside" a
#: loopback qube stays inside it: the machine gives its own qrexec-client-vm
#: and registry (qrexec_call.find_qrexec_client_vm, registry.runtime_dir).
KEPT_FOR_ROOT = (LOOPBACK_MACHINE_ENV, LOOPBACK_QUBE_ENV)


def root_argv(sudo: str, args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The command line that re-runs ``qvm-connect-tcp ARGS`` as root through ``sudo -n``.

    Every program in it is named by its absolute path, the interpreter runs
    isolated, and PATH is not passed: root finds qrexec-client-vm by itself.
    """
    env_program = next((path for path in ENV_PROGRAMS if os.access(path, os.X_OK)), None)
    if env_program is None:
        raise ClientError(f"cannot re-run as root: no env program at {' or '.join(ENV_PROGRAMS)}")
    package_dir = Path(qconnect.__file__).resolve().parent.parent
    kept = [f"{name}={environ[name]}" for name in KEPT_FOR_ROOT if environ.get(name)]
    return [
        sudo,
        "-n",
        "--",
        env_program,
        f"{SUDO_MARK_ENV}=1",
        *kept,
        os.path.abspath(sys.executable),
        "-I",
        "-c",
        ROOT_ENTRY,
        str(package_dir),
        *args,
    ]


def _control_socket() -> tuple[socket.socket, Path]:
    """Bind this process's control socket in the registry (see registry.py)."""
    ensure_runtime_dir()
    path = control_socket_path(os.getpid())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a previous process with our pid died without cleaning up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listen_unix(sock, str(path), mode=0o600, backlog=16)  # ours alone, as the registry is
    except OSError as error:
        sock.close()
        raise ClientError(f"cannot create {path}: {os.strerror(error.errno or 0)}") from None
    return sock, path


def serve(
    listeners: list[Listener],
    options: ServerOptions,
    *,
    register: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run the event loop in this process until every binding is stopped."""
    control: socket.socket | None = None
    control_path: Path | None = None
    if register:
        try:
            control, control_path = _control_socket()
        except ClientError as error:
            if not options.systemd:
                raise
            logger.warning("%s; 'qconnect list' will not show these bindings", error)
    try:
        server = ClientServer(listeners, options, control, on_ready)
        for binding in server.bindings:
            logger.info(
                "%s: listening, %s mode, up to %d connections",
                binding.spec,
                options.mode.value,
                binding.max_connections,
            )
        trio.run(server.run)
        if options.log_path is not None and options.log_path_is_ours:
            with contextlib.suppress(OSError):
                os.unlink(options.log_path)  # a clean stop: nothing left to look into
    finally:
        if control_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(control_path)
        for listener in listeners:
            listener.sock.close()
    return 0


def _redirect_logging_for_background(verbose: bool, log_file: str | None) -> str:
    """Send our log to ``log_file``, else journald when there is one, else the registry's file.

    Returns where the log goes, for ``qconnect list``. Called in the
    background process, whose stdio is /dev/null.
    """
    if log_file is not None:
        log_to_file(log_file, verbose)
        return log_file
    if os.path.exists(JOURNAL_SOCKET):
        try:
            from systemd import journal

            stream = journal.stream(LOG_IDENTIFIER)
            os.dup2(stream.fileno(), 2)
            info = os.fstat(2)
            os.environ["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
            setup_logging(LOG_IDENTIFIER, verbose=verbose)
            return f"the journal: journalctl -t {LOG_IDENTIFIER} _PID={os.getpid()}"
        except (ImportError, OSError):
            pass
    ensure_runtime_dir()
    path = str(log_file_path(os.getpid()))
    log_to_file(path, verbose)
    return path


def log_to_file(path: str, verbose: bool) -> None:
    """Log to ``path`` (appending, timestamped), on stderr's descriptor so nothing is lost."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise ClientError(f"cannot open log file {path}: {os.strerror(error.errno or 0)}") from None
    os.dup2(fd, 2)
    os.close(fd)
    setup_logging(LOG_IDENTIFIER, verbose=verbose)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            PrintableFormatter(f"%(asctime)s {LOG_IDENTIFIER}[%(process)d]: %(message)s")
        )


def serve_in_background(
    listeners: list[Listener], options: ServerOptions, verbose: bool, log_file: str | None
) -> int:
    """Fork a background process that serves ``listeners``; return when it is serving.

    The listeners are already bound and listening, so connections that
    arrive meanwhile wait in the backlog. The child reports through a pipe:
    one "ok" line once its event loop runs, or one error line.
    """
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = _background_child(listeners, options, verbose, log_file, write_end)
        os._exit(code)
    os.close(write_end)
    for listener in listeners:
        listener.sock.close()
    report = b""
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read(4096)
    if report.startswith(b"ok"):
        return 0
    message = printable(report.strip()) or "the background process failed to start"
    raise ClientError(message)


def _background_child(
    listeners: list[Listener],
    options: ServerOptions,
    verbose: bool,
    log_file: str | None,
    report_fd: int,
) -> int:
    """The background process: detach, set up logging, serve; tell the parent how it went."""
    reported = False

    def report(text: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            with contextlib.suppress(OSError):
                os.write(report_fd, text.encode()[:4000])
                os.close(report_fd)

    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.chdir("/")
        options.log_path = _redirect_logging_for_background(verbose, log_file)
        options.log_path_is_ours = log_file is None
        return serve(listeners, options, on_ready=lambda: report("ok\n"))
    except ClientError as error:
        report(f"{error}\n")
        logger.error("%s", error)
        return 1
    except BaseException as error:
        report(f"the background process failed: {error!r}\n")
        logger.exception("the background process failed")
        return 1
    finally:
        report("the background process ended before serving\n")


def run_foreground(
    listeners: list[Listener], options: ServerOptions, verbose: bool, log_file: str | None
) -> int:
    if log_file is not None:
        log_to_file(log_file, verbose)
        options.log_path = log_file
    else:
        setup_logging(LOG_IDENTIFIER, verbose=verbose)
    return serve(listeners, options)
