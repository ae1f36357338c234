"""Has qrexec-client-vm's call been accepted yet? Read from the kernel's counters.

qrexec-client-vm reads its input only once dom0 has allowed the call and
the target has started the service; before that, whatever the user's
client sent waits unread. So "accepted" is visible from outside: input was
consumed, or something came back. A call is *hung* when, after the call
timeout, nothing was consumed, nothing came back, and the client's bytes
are waiting; a connection on which the client sent nothing cannot be told
from an idle one (a protocol where the server speaks first) and is left
alone.

The readings (:class:`Progress`) come from two places:

- handoff mode: the accepted TCP socket, which qrexec-client-vm owns as its
  fd 0 while we keep a duplicate. TCP_INFO's ``tcpi_bytes_received``
  (Linux >= 4.1) minus SIOCINQ is what has been read from the socket; its
  ``tcpi_bytes_acked`` plus SIOCOUTQ is what was written to it.
- relay mode: the relay's own counts, and SIOCINQ of the child's end of its
  stdin socketpair (a duplicate we keep): delivered minus still unread is
  what the child read.

The judgement (:func:`judge`) is pure: readings in, a verdict out.
"""

import enum
import fcntl
import socket
import struct
import termios
from dataclasses import dataclass

#: Offsets in Linux's ``struct tcp_info`` (include/uapi/linux/tcp.h):
#: tcpi_state is its first byte; tcpi_bytes_acked and tcpi_bytes_received are
#: the two __u64 at 120 and 128 (Linux >= 4.1). Reading the first 136 bytes
#: is enough; an older kernel returns fewer and we say so.
TCP_INFO_STATE = 0
TCP_INFO_BYTES_ACKED = 120
TCP_INFO_BYTES_RECEIVED = 128
TCP_INFO_LENGTH = 136

#: TCP states (include/net/tcp_states.h) in which the peer's FIN has arrived.
#: tcpi_bytes_received counts that FIN as one byte of sequence space, which is
#: not a byte anyone can read.
TCP_STATES_PEER_FIN = {6, 8, 9, 11}  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING


@dataclass(frozen=True)
class Progress:
    """One reading of a pending call's input and output.

    ``consumed``: bytes the call read from its input (a lower bound in relay
    mode, see :func:`relay_progress`). ``waiting``: bytes the user's client
    sent that are still unread. ``returned``: bytes (or an EOF) that went
    back towards the user's client, including the call's stderr.
    ``moved``: a counter of everything that arrived, to see whether anything
    happened between two readings.
    """

    consumed: int
    waiting: int
    returned: int
    moved: int


class Verdict(enum.Enum):
    ACCEPTED = "accepted"  #: the call reads or writes: nothing more to watch
    IDLE = "idle"  #: the client sent nothing: cannot be told from an idle connection
    SUSPECT = "suspect"  #: the client's bytes wait unread: hung if it stays so


def judge(progress: Progress) -> Verdict:
    if progress.consumed > 0 or progress.returned > 0:
        return Verdict.ACCEPTED
    if progress.waiting > 0:
        return Verdict.SUSPECT
    return Verdict.IDLE


def still_hung(first: Progress, second: Progress) -> bool:
    """Whether two SUSPECT readings, taken some time apart, prove the call hung.

    Nothing may have moved in between: a call that was accepted at the last
    moment reads the waiting bytes at once and shows it; bytes that arrived
    only just now could not have been read yet, so they earn another look.
    """
    return judge(second) is Verdict.SUSPECT and second == first


class ProbeUnsupported(OSError):
    """The kernel does not give the counters (TCP_INFO too short, not a TCP socket)."""


def _ioctl_int(sock: socket.socket, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]
    return value


def unread_bytes(sock: socket.socket) -> int:
    """SIOCINQ (FIONREAD): bytes in the socket's receive queue that nobody has read."""
    return _ioctl_int(sock, termios.FIONREAD)


def tcp_progress(sock: socket.socket) -> Progress:
    """Read a TCP socket's progress (handoff mode); raises ProbeUnsupported on an old kernel.

    Any owner of the socket reads from the same queue, so the duplicate we
    keep sees exactly what qrexec-client-vm did with its fd 0.
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LENGTH)
    if len(info) < TCP_INFO_LENGTH:
        raise ProbeUnsupported(f"TCP_INFO has {len(info)} bytes, not {TCP_INFO_LENGTH}")
    state = info[TCP_INFO_STATE]
    acked, received = struct.unpack_from("=QQ", info, TCP_INFO_BYTES_ACKED)
    if state in TCP_STATES_PEER_FIN and received > 0:
        received -= 1
    waiting = unread_bytes(sock)
    unsent = _ioctl_int(sock, termios.TIOCOUTQ)  # SIOCOUTQ: written, not yet acknowledged
    return Progress(
        consumed=max(0, received - waiting),
        waiting=waiting,
        returned=acked + unsent,
        moved=received,
    )


def relay_progress(delivered: int, child_stdin: socket.socket, returned: int) -> Progress:
    """Progress of a relayed call from the relay's counts and the child's stdin queue.

    ``delivered`` is what the relay counts as handed to the child; a chunk
    it is still pushing is not counted yet but may already sit in the queue,
    so ``delivered - unread`` is a lower bound of what the child read.
    """
    waiting = unread_bytes(child_stdin)
    return Progress(
        consumed=max(0, delivered - waiting),
        waiting=waiting,
        returned=returned,
        moved=delivered + waiting,
    )
