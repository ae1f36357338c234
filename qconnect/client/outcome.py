"""How a call ended: its exit code's meaning, in words a user can act on, and its result.

Pure: the codes are qrexec's (see :mod:`qconnect.core.qrexec`); the words name the
binding and, for a refusal, the dom0 command that would allow the call.
:class:`CallResult` is what call.py returns for one call; the counters, the
pacing and the log line are all read from it.
"""

import enum
import shlex
import signal
from dataclasses import dataclass

from qconnect.core.qrexec import EXIT_NO_SERVICE, EXIT_QREXEC_PROBLEM, EXIT_REFUSED, SERVICE


class Kind(enum.Enum):
    """How a call ended, as far as the caller can tell."""

    OK = "ok"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    NO_SERVICE = "no-service"
    SIGNALLED = "signalled"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    words: str


def policy_allow_command(source_qube: str, target: str, remote_port: int) -> str:
    """The ``qconnect policy`` command that, run in dom0, lets this call through.

    A call to ``@default`` needs a rule naming the qube that should serve it;
    the caller cannot know which one the user means, so it is left as a
    placeholder the user must fill in.
    """
    if target == "@default":
        return (
            f"qconnect policy allow {shlex.quote(source_qube)} --port {remote_port} "
            "--default-target QUBE"
        )
    return (
        f"qconnect policy allow {shlex.quote(source_qube)} --port {remote_port} "
        f"--target {shlex.quote(target)}"
    )


def exit_kind(returncode: int) -> Kind:
    """What a ``qrexec-client-vm`` exit status (Popen's, negative for a signal) means."""
    if returncode == 0:
        return Kind.OK
    if returncode == EXIT_REFUSED:
        return Kind.REFUSED
    if returncode == EXIT_QREXEC_PROBLEM:
        return Kind.UNREACHABLE
    if returncode == EXIT_NO_SERVICE:
        return Kind.NO_SERVICE
    if returncode < 0 or 128 < returncode < 128 + 65:
        return Kind.SIGNALLED
    return Kind.FAILED


def describe_exit(returncode: int, *, source_qube: str, target: str, remote_port: int) -> Outcome:
    """Turn a ``qrexec-client-vm`` exit status (Popen's, negative for a signal) into words."""
    kind = exit_kind(returncode)
    if kind is Kind.OK:
        return Outcome(kind, "closed")
    if kind is Kind.REFUSED:
        return Outcome(
            kind,
            "refused by dom0 policy, or no free qrexec channel (exit code 126); "
            f"to allow it, run in dom0: {policy_allow_command(source_qube, target, remote_port)}",
        )
    if kind is Kind.UNREACHABLE:
        return Outcome(
            kind,
            f"the target could not connect to its port {remote_port}: nothing listening there, "
            "or a qrexec failure (exit code 125)",
        )
    if kind is Kind.NO_SERVICE:
        return Outcome(kind, f"{target} has no {SERVICE} service (exit code 127)")
    if kind is Kind.FAILED:
        return Outcome(kind, f"the service failed with exit code {returncode}")
    number = -returncode if returncode < 0 else returncode - 128
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if returncode < 0:
        return Outcome(kind, f"qrexec-client-vm was killed by {name}")
    # qrexec passes on the remote service's status: 128+N is a service killed by signal N
    return Outcome(kind, f"the service in {target} was killed by {name} (exit code {returncode})")


@dataclass(frozen=True)
class Relayed:
    """Bytes a relayed call moved."""

    out: int  #: from the client to the call
    back: int  #: from the call to the client


#: What qrexec-client-vm prints, and all it prints, when dom0 refuses a call
#: (qubes-core-qrexec, agent/qrexec-client-vm.c): the agent closed the trigger
#: socket before sending the connection's parameters. A service's own exit
#: code 126 comes after the call was connected, with the service's words.
REQUEST_REFUSED = b"Request refused\n"

#: Exit codes that prove dom0 allowed the call: served (0), or failed at the
#: target (125: its connect failed, 127: no such service). Any other code may
#: be qrexec-client-vm's own failure before dom0 was asked (1, 255).
ALLOWED_EXITS = frozenset({0, EXIT_QREXEC_PROBLEM, EXIT_NO_SERVICE})


@dataclass(frozen=True)
class Hang:
    """Why a call was ended before it was accepted."""

    waited: float  #: seconds the call was watched
    unread: int  #: bytes the client sent that the call never read


class Ending(enum.Enum):
    """How a call ended, as the binding's counters count it."""

    SERVED = "served"  #: it ran to its end, whatever its exit code, or ended at shutdown
    REFUSED = "refused"  #: exit code 126: dom0 refused it, or the service said so itself
    HUNG = "hung"  #: ended by us: not accepted within the call timeout


@dataclass(frozen=True)
class CallResult:
    """What one call did."""

    returncode: int | None  #: None: ended at shutdown before it exited
    stderr: bytes = b""  #: its first bytes (call.MAX_STDERR_KEPT)
    relayed: Relayed | None = None  #: relay mode only
    hang: Hang | None = None  #: set when the call was ended for not being accepted

    @property
    def kind(self) -> Kind | None:
        """What its exit code means; None when it did not exit on its own."""
        return None if self.returncode is None else exit_kind(self.returncode)

    @property
    def ending(self) -> Ending:
        if self.hang is not None:
            return Ending.HUNG
        if self.kind is Kind.REFUSED:
            return Ending.REFUSED
        return Ending.SERVED

    @property
    def refused_by_dom0(self) -> bool:
        """Whether dom0 refused the call (policy or no free port), not the service with 126."""
        return self.returncode == EXIT_REFUSED and self.stderr == REQUEST_REFUSED

    @property
    def allowed_by_dom0(self) -> bool:
        """Whether the call proves dom0's policy let it through (see ALLOWED_EXITS)."""
        return self.returncode in ALLOWED_EXITS and self.hang is None
