"""qrexec's own rules, shared by every side: ports, qube names, exit codes.

Pure and standard-library only: the per-call executables, the loopback
``qrexec-client-vm`` and the dom0 policy tool all import it.
"""

import re

from qconnect.core.errors import ArgumentError, SpecError

#: The RPC service this project implements and calls.
SERVICE = "qubes.ConnectTCP"

# qrexec-client-vm exit codes (qubes-core-qrexec, libqrexec/remote.c and
# qrexec-client-vm.c): what the caller sees when the call itself fails.
EXIT_REFUSED = 126  #: dom0 policy refused the call (or no free data channel)
EXIT_QREXEC_PROBLEM = 125  #: qrexec failed, e.g. the built-in TCP connect was refused
EXIT_NO_SERVICE = 127  #: the target has no such service

# Each qube's qrexec-daemon in dom0 has a table of 256 vchan data ports
# (qubes-core-qrexec, daemon/qrexec-daemon.c, allocate_vchan_port): a call
# takes a port of the *target's* table, from the half shared by every caller
# whose domain id is on the same side of the target's, and frees it some
# time after the caller has exited. So at most 128 calls from one side are
# in flight at a target; the next is refused with EXIT_REFUSED.
MAX_CALLS_IN_FLIGHT = 128

# The built-in TCP service's port rule (qrexec's parse_port in the agent):
# decimal digits only, no sign, no leading zero, 1..65535.
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")

# dom0 keeps these characters in a qube name given to qrexec-client-vm and
# replaces every other one with "_" (qrexec-daemon's sanitize_name with
# '@' and ':' allowed for targets like @dispvm:NAME).
_SAFE_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

# A real qube name (qubes.vm.validate_name): starts with a letter, at most
# 31 characters of letters, digits, "_", "." and "-", and not "none"/"default".
_QUBE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_RESERVED_QUBE_NAMES = frozenset({"none", "default", "Domain-0"})


def parse_port(text: str, *, what: str = "port") -> int:
    """Return the TCP port ``text`` names, by qrexec's rule, or raise SpecError.

    The same rule judges every port a user types and every qrexec argument a
    peer sends, so that nothing this tool accepts is refused by qrexec and
    nothing qrexec refuses slips through here (``080``, ``+80``, ``0x50`` and
    ``8e1`` are all refused, as ``int()`` would accept some of them).
    """
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise SpecError(
            f"invalid {what} {shown!r}: expected a decimal number from 1 to 65535 "
            "without sign or leading zero"
        )
    return int(text)


def sanitize_name(name: str, *, extra: str = "") -> str:
    """Return ``name`` as dom0 passes it on: unsafe characters become ``_``."""
    allowed = _SAFE_NAME_CHARS | frozenset(extra)
    return "".join(c if c in allowed else "_" for c in name)


def sanitize_target(target: str) -> str:
    """dom0's treatment of the TARGET word: ``$`` reads as ``@``, then sanitising."""
    return sanitize_name(target.replace("$", "@"), extra="@:")


def sanitize_service(service: str) -> str:
    """dom0's treatment of ``SERVICE+ARG``: ``+`` is kept, other unsafe characters become ``_``."""
    return sanitize_name(service, extra="+")


def is_valid_qube_name(name: str) -> bool:
    """Whether ``name`` could be a qube's name (not a keyword like ``@default``)."""
    return bool(_QUBE_NAME_RE.fullmatch(name)) and name not in _RESERVED_QUBE_NAMES


def validate_target(target: str) -> str:
    """Check a call's TARGET word before it reaches qrexec; return it unchanged.

    Accepts what qrexec-client-vm accepts unchanged: a qube name, ``dom0``,
    ``@default`` (also written empty), ``@dispvm`` and ``@dispvm:NAME``. A name
    dom0 would silently mangle into another qube's name is refused instead.
    """
    if target in ("", "@default", "@dispvm", "dom0"):
        return target
    if target.startswith("@dispvm:") and is_valid_qube_name(target[len("@dispvm:") :]):
        return target
    if is_valid_qube_name(target):
        return target
    shown = target if len(target) <= 40 else target[:40] + "..."
    raise ArgumentError(
        f"invalid qube name {shown!r}: expected a qube name (a letter, then up to 30 "
        "letters, digits, '_', '.' or '-'), '@default', '@dispvm' or '@dispvm:NAME'"
    )


def service_call(port: int) -> str:
    """The ``SERVICE+ARG`` word for a call to ``port``."""
    return f"{SERVICE}+{port}"
