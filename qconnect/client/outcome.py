"""What a ``qrexec-client-vm`` exit code means, in words a user can act on.

Pure: the codes are qrexec's (see :mod:`qconnect.core.qrexec`); the words name the
binding and, for a refusal, the dom0 command that would allow the call.
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


def describe_exit(returncode: int, *, source_qube: str, target: str, remote_port: int) -> Outcome:
    """Turn a ``qrexec-client-vm`` exit status (Popen's, negative for a signal) into words."""
    if returncode == 0:
        return Outcome(Kind.OK, "closed")
    if returncode == EXIT_REFUSED:
        return Outcome(
            Kind.REFUSED,
            "refused by dom0 policy, or no free qrexec channel (exit code 126); "
            f"to allow it, run in dom0: {policy_allow_command(source_qube, target, remote_port)}",
        )
    if returncode == EXIT_QREXEC_PROBLEM:
        return Outcome(
            Kind.UNREACHABLE,
            f"the target could not connect to its port {remote_port}: nothing listening there, "
            "or a qrexec failure (exit code 125)",
        )
    if returncode == EXIT_NO_SERVICE:
        return Outcome(
            Kind.NO_SERVICE,
            f"{target} has no {SERVICE} service (exit code 127)",
        )
    number = -returncode if returncode < 0 else returncode - 128
    if returncode < 0 or 128 < returncode < 128 + 65:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if returncode < 0:
            return Outcome(Kind.SIGNALLED, f"qrexec-client-vm was killed by {name}")
        # qrexec passes on the remote service's status: 128+N is a service killed by signal N
        return Outcome(
            Kind.SIGNALLED,
            f"the service in {target} was killed by {name} (exit code {returncode})",
        )
    return Outcome(Kind.FAILED, f"the service failed with exit code {returncode}")
