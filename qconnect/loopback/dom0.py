"""dom0's part of a loopback call: sanitise the names, evaluate the policy, pick the target.

In real qrexec the calling qube's qrexec-daemon sanitises the request, asks
qrexec-policy-daemon, and either refuses ("Request refused", exit 126 at the
caller) or has the call set up to the target qube. Here the same decisions
are made by the very policy engine ``qconnect policy`` ships, over the
machine's ``policy.d`` and ``qubes.json``. The policy engine is imported
lazily: a call refused earlier never pays for it.
"""

from pathlib import Path

from qconnect.core.qrexec import sanitize_service, sanitize_target
from qconnect.loopback import layout
from qconnect.loopback.agent import Request
from qconnect.loopback.journal import Logger


class Refused(Exception):
    """dom0 refuses the call: the caller sees "Request refused" and 126; the reason is logged."""


def read_request(source: str, target: str, service: str) -> tuple[Request, str]:
    """What dom0 makes of a command line: sanitised names and the requested target.

    The returned Request has no target yet (the policy picks it); the
    second value is the target as the caller named it (``@default`` when
    empty).
    """
    requested_target = sanitize_target(target) or "@default"
    full_name = sanitize_service(service)
    service_name, _, argument = full_name.partition("+")
    if not service_name:
        raise Refused(f"empty service name in {service!r}")
    return Request(source, "", service_name, argument), requested_target


def _read_ask_answer(machine: Path) -> str:
    try:
        return (machine / "ask").read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return "deny"


def evaluate_policy(machine: Path, log: Logger, request: Request, requested_target: str) -> str:
    """dom0's decision for this call: the qube that serves it, or Refused.

    ``ask`` has no user to ask here: the machine's ``ask`` file answers
    (``allow``, ``allow QUBE`` or ``deny``; missing means deny).
    """
    try:
        from qconnect.policy.evaluate import evaluate_call
        from qconnect.policy.system_info import SystemInfo
    except ImportError as error:
        raise Refused(f"the policy engine is not available: {error}") from None
    from qconnect.core.errors import QconnectError

    try:
        system = SystemInfo.load(machine / "qubes.json")
        resolution = evaluate_call(
            machine / "policy.d",
            system,
            source=request.source,
            target=requested_target,
            service=request.service,
            argument=f"+{request.argument}",
        )
    except QconnectError as error:
        raise Refused(f"policy error, every call is refused: {error}") from None
    where = f" ({resolution.rule})" if resolution.rule else ""
    call = f"{request.full_name} from {request.source} to {requested_target}"
    action = resolution.action
    target = resolution.target
    if action == "ask":
        answer = _read_ask_answer(machine).split()
        if answer[:1] != ["allow"] or len(answer) > 2:
            raise Refused(f"{call}: ask{where} answered deny")
        if len(answer) == 2:
            target = answer[1]
            if target not in resolution.choices:
                raise Refused(
                    f"{call}: ask{where} answered {target}, not among {resolution.choices}"
                )
        log("qrexec-policy-daemon", f"{call}: ask{where} answered allow, target {target}")
    elif action != "allow":
        raise Refused(f"{call}: denied{where}: {resolution.reason}")
    if not target:
        raise Refused(f"{call}: {action}{where} without a target qube")
    if target.startswith("@dispvm"):
        raise Refused(f"{call}: {target}: disposable qubes are not emulated by the loopback")
    if target in ("@adminvm", "dom0") or not layout.qube_dir(machine, target).is_dir():
        raise Refused(f"{call}: target {target!r} is not a qube of this loopback machine")
    log("qrexec-policy-daemon", f"{call}: allowed{where}, target {target}")
    return target
