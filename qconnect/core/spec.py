"""The binding spec grammar: ``[BIND:]LOCALPORT:[VMNAME]:PORT``.

Compatible with the original ``qvm-connect-tcp [localport]:[vmname]:[port]``
for every input it handles correctly (empty localport = the remote port,
empty vmname = ``@default``), extended with an ssh ``-L`` style bind address
(``127.0.0.2:8080:web:80``, ``[::1]:8080:web:80``). Pure: text in, a
:class:`BindingSpec` or a :class:`SpecError` out.
"""

import ipaddress
from dataclasses import dataclass

from qconnect.core.errors import QconnectError, SpecError
from qconnect.core.printable import printable
from qconnect.core.qrexec import parse_port, validate_target

#: Where a binding listens unless told otherwise. The original listened on
#: 0.0.0.0 while printing "localhost", exposing the port to every qube on the
#: same network; we listen where the message says.
DEFAULT_BIND = "127.0.0.1"

_BIND_ALIASES = {"localhost": "127.0.0.1", "*": "0.0.0.0"}

# Every character an IPv4 or IPv6 literal is written with: hex digits, ':'
# and '.' (an IPv4-mapped IPv6 address has both). A bind address is checked
# against this set before ipaddress reads it, because ipaddress also takes an
# IPv6 zone id ('%' and nearly any text after it), which parse_bind_address
# refuses; see there why.
_ADDRESS_CHARS = frozenset("0123456789abcdefABCDEF:.")

# How much of a refused value an error message shows: enough to recognise
# it, short enough that a hostile megabyte stays one readable line.
_SHOWN_MAX = 60


def _shown(text: str) -> str:
    """``text`` quoted for an error message: one line, control characters escaped."""
    cut = text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "..."
    return f"'{printable(cut)}'"


@dataclass(frozen=True, order=True)
class BindingSpec:
    """One local TCP listener forwarded to ``remote_port`` in ``target``.

    ``target`` is the word given to qrexec-client-vm: a qube name,
    ``@default`` (dom0's policy picks the qube), ``@dispvm`` or ``@dispvm:NAME``.
    ``bind_address`` is a normalised IP literal (no brackets).
    """

    bind_address: str
    local_port: int
    target: str
    remote_port: int

    @property
    def is_loopback(self) -> bool:
        """Whether only this qube can reach the listener."""
        return ipaddress.ip_address(self.bind_address).is_loopback

    @property
    def family_is_ipv6(self) -> bool:
        return ipaddress.ip_address(self.bind_address).version == 6

    @property
    def bind_host(self) -> str:
        """The bind address as written in a spec or ``ListenStream=`` (IPv6 bracketed)."""
        return f"[{self.bind_address}]" if self.family_is_ipv6 else self.bind_address

    @property
    def qrexec_target(self) -> str:
        """The TARGET word for qrexec-client-vm (``@default`` is passed as is)."""
        return self.target

    @property
    def fd_name(self) -> str:
        """The binding as a systemd ``FileDescriptorName=`` (which may not contain ':').

        A socket passed by systemd already carries the bind address and local
        port; the name carries the rest: ``TARGET+PORT`` with the ':' of
        ``@dispvm:NAME`` written as '='.
        """
        return f"{self.target.replace(':', '=')}+{self.remote_port}"

    def __str__(self) -> str:
        return f"{self.bind_host}:{self.local_port}:{self.target}:{self.remote_port}"

    def startup_message(self) -> str:
        """The original's start-up line, kept word for word for scripts that read it."""
        return f"Binding TCP '{self.target}:{self.remote_port}' to 'localhost:{self.local_port}'..."


def parse_bind_address(text: str) -> str:
    """Return ``text`` as a normalised IP literal, or raise SpecError.

    Host names other than ``localhost`` are refused: a binding must not
    depend on name resolution, which another qube may be able to influence.

    IPv6 zone ids (``[fe80::1%eth0]``) are refused too, whatever the
    interface name. The bind address is written into a systemd unit
    (``ListenStream=``, ``Description=``, the header comment), into its
    unit name and into shell command lines, and Python's ipaddress accepts
    any text after the ``%`` but ``/`` and ``%`` -- spaces and newlines
    included -- while a Linux interface name may hold any byte but ``/``,
    ``:`` and white space; so a zone would have to be limited to a charset
    of our own (``[A-Za-z0-9_.-]``) and could still not work: systemd's
    ``ListenStream=`` does not parse a zone at all (systemd 252 refuses
    ``[fe80::1%%lo]:80`` and the socket never listens), and a zone names
    an interface that would have to exist whenever the unit is loaded,
    early at boot included, before a qube's network is up. A listener
    limited to one interface is what a socket unit's ``BindToDevice=`` is
    for. The same grammar serves ``qvm-connect-tcp``, so a spec means the
    same thing in a one-off binding and in a permanent one.
    """
    bracketed = text.startswith("[") and text.endswith("]")
    literal = text[1:-1] if bracketed else _BIND_ALIASES.get(text, text)
    if "%" in literal:
        raise SpecError(
            f"invalid bind address {_shown(text)}: IPv6 zone ids (%INTERFACE) are not "
            "supported; expected an IP address without '%'"
        )
    if not literal or not set(literal) <= _ADDRESS_CHARS:
        raise SpecError(
            f"invalid bind address {_shown(text)}: expected an IPv4 address, an IPv6 "
            "address in brackets, 'localhost' or '*'"
        )
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise SpecError(
                f"invalid bind address {_shown(text)}: expected an IPv6 address in brackets"
            ) from None
    try:
        return str(ipaddress.IPv4Address(literal))
    except ValueError:
        pass
    try:
        return str(ipaddress.IPv6Address(literal))
    except ValueError:
        raise SpecError(
            f"invalid bind address {_shown(text)}: expected an IPv4 address, an IPv6 address "
            "in brackets, 'localhost' or '*'"
        ) from None


def _split_fields(text: str) -> list[str]:
    """Split on ':' but keep a bracketed IPv6 bind address whole."""
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise SpecError(
                f"invalid binding {_shown(text)}: '[' of an IPv6 address is never closed"
            )
        head, rest = text[: close + 1], text[close + 1 :]
        if not rest.startswith(":"):
            raise SpecError(
                f"invalid binding {_shown(text)}: expected ':' after the bracketed bind address"
            )
        return [head, *rest[1:].split(":")]
    return text.split(":")


def _join_dispvm(fields: list[str]) -> list[str]:
    """Rejoin ``@dispvm:NAME``, the one target that itself contains a colon."""
    for index, field in enumerate(fields[:-1]):
        if field in ("@dispvm", "$dispvm") and len(fields) in (4, 5) and index == len(fields) - 3:
            return [*fields[:index], f"{field}:{fields[index + 1]}", fields[-1]]
    return fields


def parse_spec(text: str, *, default_bind: str = DEFAULT_BIND) -> BindingSpec:
    """Parse one binding spec, or raise SpecError naming the bad part.

    ``8080`` alone is refused: the original would silently call a qube named
    "8080". So are extra fields and anything :func:`parse_port` refuses.
    """
    usage = "expected [BIND:]LOCALPORT:[VMNAME]:PORT, e.g. 8080:work:80 or ::444"
    if not text:
        raise SpecError(f"empty binding: {usage}")
    fields = _join_dispvm(_split_fields(text))
    if len(fields) == 3:
        bind_text, (local_text, target_text, port_text) = default_bind, fields
    elif len(fields) == 4:
        bind_text, local_text, target_text, port_text = fields
    else:
        raise SpecError(f"invalid binding {_shown(text)}: {usage}")
    if not port_text:
        raise SpecError(f"invalid binding {_shown(text)}: the remote PORT is missing; {usage}")
    remote_port = parse_port(port_text, what="remote port")
    local_port = parse_port(local_text, what="local port") if local_text else remote_port
    target = target_text.replace("$", "@") or "@default"
    try:
        validate_target(target)
    except QconnectError as error:
        raise SpecError(f"invalid binding {_shown(text)}: {error}") from None
    bind_address = parse_bind_address(bind_text)
    return BindingSpec(bind_address, local_port, target, remote_port)


def parse_fd_name(name: str) -> tuple[str, int]:
    """Return ``(target, remote_port)`` from a :attr:`BindingSpec.fd_name`, or raise SpecError."""
    target_text, plus, port_text = name.rpartition("+")
    if not plus or not target_text:
        raise SpecError(
            f"invalid socket name {_shown(name)}: expected TARGET+PORT, e.g. web+80 or @default+444"
        )
    target = target_text.replace("=", ":")
    try:
        validate_target(target)
    except QconnectError as error:
        raise SpecError(f"invalid socket name {_shown(name)}: {error}") from None
    return target, parse_port(port_text, what="remote port")
