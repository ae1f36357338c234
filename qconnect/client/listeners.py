"""Listening sockets: bound here before the event loop starts, or adopted from systemd.

Binding synchronously, before the process goes to the background, is what
lets ``qvm-connect-tcp`` report "port in use" to the shell that ran it.
"""

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass

from qconnect.client.limits import LISTEN_BACKLOG
from qconnect.core.errors import ClientError, PrivilegedPortError, SpecError
from qconnect.core.spec import BindingSpec, parse_fd_name

#: Where Linux keeps the first port an unprivileged process may bind.
UNPRIVILEGED_PORT_START_FILE = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
#: The historical value, used when the sysctl cannot be read.
DEFAULT_UNPRIVILEGED_PORT_START = 1024


@dataclass
class Listener:
    """A bound, listening socket and the binding it serves. The owner closes ``sock``."""

    spec: BindingSpec
    sock: socket.socket


def unprivileged_port_start() -> int:
    try:
        with open(UNPRIVILEGED_PORT_START_FILE) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return DEFAULT_UNPRIVILEGED_PORT_START


def _bind_error(spec: BindingSpec, error: OSError) -> ClientError:
    where = f"{spec.bind_host}:{spec.local_port}"
    if error.errno == errno.EADDRINUSE:
        return ClientError(
            f"cannot listen on {where}: the port is already in use "
            "(another binding? see 'qconnect list'; or pick another local port)"
        )
    if error.errno == errno.EACCES and spec.local_port < unprivileged_port_start():
        return PrivilegedPortError(
            f"cannot listen on {where}: ports below {unprivileged_port_start()} need root; "
            f"run 'sudo qvm-connect-tcp {spec}', or use a local port of 1024 or more, "
            f"e.g. '{spec.local_port + 8000 if spec.local_port + 8000 <= 65535 else 8080}:"
            f"{spec.target}:{spec.remote_port}'"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return ClientError(
            f"cannot listen on {where}: {spec.bind_address} is not an address of this qube"
        )
    return ClientError(f"cannot listen on {where}: {os.strerror(error.errno or 0) or error}")


def open_listener(spec: BindingSpec) -> Listener:
    """Bind and listen for ``spec``; raise ClientError (PrivilegedPortError for EACCES).

    SO_REUSEADDR as the original's socat ``reuseaddr``: a restarted binding
    must not fail on connections of its predecessor in TIME_WAIT. An IPv6
    bind listens on IPv6 only, as the spec says.
    """
    family = socket.AF_INET6 if spec.family_is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((spec.bind_address, spec.local_port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise _bind_error(spec, error) from None
    return Listener(spec, sock)


def open_listeners(specs: list[BindingSpec]) -> list[Listener]:
    """Bind every spec or none: on the first failure, close the ones already bound."""
    listeners: list[Listener] = []
    try:
        for spec in specs:
            listeners.append(open_listener(spec))
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def listener_from_fd(fd: int, name: str) -> Listener:
    """Adopt a listening TCP socket systemd passed as ``fd`` under FileDescriptorName ``name``.

    The socket's own address gives the bind address and local port; the
    name gives the target and remote port (:attr:`BindingSpec.fd_name`).
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ClientError(f"file descriptor {fd} from systemd is not a socket: {error}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not (
            sock.type == socket.SOCK_STREAM and listening
        ):
            raise ClientError(
                f"socket {name!r} (fd {fd}) from systemd is not a listening TCP socket: "
                "use ListenStream=ADDRESS:PORT and Accept=no"
            )
        try:
            target, remote_port = parse_fd_name(name)
        except SpecError as error:
            raise ClientError(
                f"{error} (set FileDescriptorName= of the .socket unit to the binding, e.g. web+80)"
            ) from None
        address, local_port = sock.getsockname()[:2]
        bind_address = str(ipaddress.ip_address(address.split("%", 1)[0]))
    except BaseException:
        sock.detach()
        raise
    return Listener(BindingSpec(bind_address, local_port, target, remote_port), sock)


def adopt_systemd_listeners() -> list[Listener]:
    """The sockets of systemd socket activation (LISTEN_FDS), or [] when there are none.

    The LISTEN_* variables are removed from the environment so the
    qrexec-client-vm children do not think they were socket-activated.
    """
    from systemd import daemon  # only needed under systemd

    named: dict[int, str] = daemon.listen_fds_with_names(True)
    listeners: list[Listener] = []
    try:
        for fd, name in sorted(named.items()):
            listeners.append(listener_from_fd(fd, name))
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners
