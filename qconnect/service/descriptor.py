"""The socket service's call descriptor ``SERVICE+ARG SOURCE\\0``: bounded, strict parsing.

qrexec-agent opens a connection to a socket service and first writes the
descriptor (qubes-core-qrexec, libqrexec/exec.c: the part of the command after
``QUBESRPC ``, with its trailing NUL), then the caller's bytes. Pure code: bytes
in, a CallDescriptor or a ServiceError out. The caller's bytes may follow the
NUL in the same read, so splitting returns them too.
"""

from dataclasses import dataclass

from qconnect.core.errors import ServiceError
from qconnect.core.printable import printable
from qconnect.core.qrexec import SERVICE, is_valid_qube_name

# Longest descriptor we wait for before calling the peer hostile. A valid one
# is at most ~60 bytes ("qubes.ConnectTCP+65535 " plus a 31-character qube
# name); 1 KiB still lets us name a long bogus argument (e.g. 200 characters)
# in the log, while a peer that sends 64 KiB without a NUL costs one small read.
MAX_DESCRIPTOR = 1024


@dataclass(frozen=True)
class CallDescriptor:
    """One call as qrexec announced it: which service and argument, from which qube."""

    service: str
    argument: str
    source: str


def _shown(text: str) -> str:
    """The peer's ``text``, quoted, escaped and cut short, for a log line."""
    return "'" + printable(text if len(text) <= 40 else text[:40] + "...") + "'"


def split_descriptor(buffer: bytes) -> tuple[bytes, bytes] | None:
    """Split ``buffer`` at the descriptor's NUL: (descriptor, caller's first bytes).

    Returns None while the NUL has not arrived yet and the buffer is still
    within MAX_DESCRIPTOR; raises ServiceError once it is too long to be one.
    """
    end = buffer.find(b"\0", 0, MAX_DESCRIPTOR + 1)
    if end >= 0:
        return buffer[:end], buffer[end + 1 :]
    if len(buffer) > MAX_DESCRIPTOR:
        raise ServiceError(f"no service descriptor: no NUL within the first {MAX_DESCRIPTOR} bytes")
    return None


def parse_descriptor(raw: bytes) -> CallDescriptor:
    """Parse ``SERVICE+ARG SOURCE`` (without its NUL) into a CallDescriptor.

    Only our own service is accepted; the source must look like a qube name
    (dom0 supplies it, but a socket reachable by other local processes must
    not let them pose as a qube with a name that would mislead the log). The
    argument is returned as text, unchecked: the port rule is applied by the
    caller so that a bad port is logged together with the caller's name.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ServiceError("bad service descriptor: not ASCII") from None
    words = text.split(" ")
    if len(words) != 2:
        raise ServiceError(
            f"bad service descriptor {_shown(text)}: expected 'SERVICE+ARGUMENT SOURCE'"
        )
    call, source = words
    service, _plus, argument = call.partition("+")
    if service != SERVICE:
        raise ServiceError(f"bad service descriptor: service {_shown(service)}, expected {SERVICE}")
    if not (is_valid_qube_name(source) or source == "dom0"):
        raise ServiceError(f"bad service descriptor: source {_shown(source)} is not a qube name")
    return CallDescriptor(service=service, argument=argument, source=source)
