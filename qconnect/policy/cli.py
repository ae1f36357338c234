"""``qconnect policy``: write, list, explain and lint dom0's qubes.ConnectTCP policy.

Runs in dom0 on the standard library only (never imports trio). Every user
mistake becomes one line naming the bad value, a non-zero exit and nothing
written; ``--dry-run`` prints the diff an edit would make.
"""

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qconnect.core import argtypes
from qconnect.core.errors import CommandLineError, PolicyError
from qconnect.core.printable import printable
from qconnect.core.qrexec import SERVICE, is_valid_qube_name
from qconnect.policy.editor import (
    QCONNECT_FILE,
    EditResult,
    LegacyFormat,
    NewFormat,
    PolicyEditor,
    PolicyFormat,
)
from qconnect.policy.evaluate import Call, evaluate, target_as_sent
from qconnect.policy.lint import (
    Problem,
    lint_directory,
    lint_file,
    problem_from_error,
    sort_problems,
)
from qconnect.policy.loader import (
    POLICY_DIR,
    Policy,
    default_legacy_dir,
    invalid_file_name,
    load_legacy_policy,
    load_policy,
)
from qconnect.policy.rules import Allow, Ask, Deny, Rule
from qconnect.policy.system_info import QUBESD_QUERY, SystemInfo, is_dom0
from qconnect.policy.tokens import (
    AnyVM,
    DefaultVM,
    DispVMTemplate,
    Place,
    QubeName,
    Token,
    TokenError,
    parse_token,
)

PROG = "qconnect policy"


# -- arguments ----------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--policy-dir",
        type=argtypes.path,
        default=POLICY_DIR,
        metavar="DIR",
        help=f"dom0's policy directory (default {POLICY_DIR})",
    )
    common.add_argument(
        "--qubes",
        type=argtypes.path,
        metavar="FILE",
        help="the qubes, as JSON of qubesd's internal.GetSystemInfo (default in dom0: ask qubesd)",
    )
    common.add_argument(
        "--legacy",
        action="store_true",
        help="use the R4.0 format: one file per port in the legacy directory",
    )
    common.add_argument(
        "--legacy-dir",
        type=argtypes.path,
        metavar="DIR",
        help="the R4.0 policy directory (default /etc/qubes-rpc/policy beside --policy-dir)",
    )
    editing = argparse.ArgumentParser(add_help=False)
    editing.add_argument(
        "--file",
        default=QCONNECT_FILE,
        type=_policy_file_name,
        metavar="NAME",
        help=f"the policy file our rules go to (default {QCONNECT_FILE})",
    )
    editing.add_argument("--dry-run", action="store_true", help="print the diff instead of writing")

    commands = parser.add_subparsers(dest="policy_command", metavar="ACTION")
    commands.required = True

    allow = commands.add_parser(
        "allow",
        parents=[common, editing],
        help="let SOURCE reach a TCP port of a qube",
        description="Add qubes.ConnectTCP +PORT SOURCE QUBE allow (calls naming QUBE) or "
        "qubes.ConnectTCP +PORT SOURCE @default allow target=QUBE (calls naming no target).",
    )
    allow.add_argument(
        "source",
        metavar="SOURCE",
        type=_word(Place.SOURCE, "source"),
        help="calling qube, or @tag:T, @type:T, @anyvm",
    )
    _add_ports(allow)
    where = allow.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--target",
        metavar="QUBE",
        type=_word(Place.TARGET, "target", default_ok=False),
        help="for calls that name QUBE",
    )
    where.add_argument(
        "--default-target",
        metavar="QUBE",
        type=_word(Place.REDIRECT, "default target"),
        help="for calls that name no target: sent to QUBE",
    )
    allow.add_argument("--ask", action="store_true", help="ask the user in dom0 each time")
    allow.add_argument(
        "--no-autostart", action="store_true", help="refuse when the target is not running"
    )
    allow.set_defaults(handler=run_allow)

    deny = commands.add_parser(
        "deny",
        parents=[common, editing],
        help="refuse SOURCE's calls to a port",
        description="Add qubes.ConnectTCP +PORT SOURCE @anyvm deny (or QUBE with --target).",
    )
    deny.add_argument("source", metavar="SOURCE", type=_word(Place.SOURCE, "source"))
    _add_ports(deny)
    deny.add_argument(
        "--target",
        metavar="QUBE",
        type=_word(Place.TARGET, "target"),
        help="only calls naming QUBE (default: all)",
    )
    deny.set_defaults(handler=run_deny)

    remove = commands.add_parser(
        "remove",
        parents=[common, editing],
        help="remove rules this tool added",
        description="Remove rules from qconnect's block; rules written by hand are never touched.",
    )
    remove.add_argument("source", metavar="SOURCE", nargs="?", type=_word(Place.SOURCE, "source"))
    remove.add_argument("--port", action="append", default=[], type=argtypes.port, metavar="PORT")
    target = remove.add_mutually_exclusive_group()
    target.add_argument("--target", metavar="QUBE", type=_word(Place.TARGET, "target"))
    target.add_argument(
        "--default-target", metavar="QUBE", type=_word(Place.REDIRECT, "default target")
    )
    remove.add_argument("--all", action="store_true", help="remove every rule this tool added")
    remove.set_defaults(handler=run_remove)

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="every rule that can decide a qubes.ConnectTCP call, in evaluation order",
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=run_list)

    explain = commands.add_parser(
        "explain",
        parents=[common],
        help="how dom0 decides one call",
        description="The decision on qubes.ConnectTCP+PORT from SOURCE to TARGET, the qube "
        "that serves it and the deciding rule. TARGET is the word the calling qube puts in "
        "its call (a qube, uuid:UUID, @default or empty, @adminvm, @dispvm, @dispvm:NAME, "
        "or anything else): it is rewritten as qrexec rewrites it and decided as dom0 "
        "decides, refusals included.",
    )
    explain.add_argument("source", metavar="SOURCE", type=_qube_word("source"))
    explain.add_argument("target", metavar="TARGET")
    explain.add_argument("port", metavar="PORT", type=argtypes.port)
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(handler=run_explain)

    lint = commands.add_parser(
        "lint",
        parents=[common],
        help="report every problem, with FILE:LINE (exit 1 if any)",
    )
    lint.add_argument("paths", metavar="PATH", nargs="*", type=argtypes.path)
    lint.set_defaults(handler=run_lint)

    importing = commands.add_parser(
        "import-legacy",
        parents=[common, editing],
        help="turn R4.0 qubes.ConnectTCP files into rules with the same decisions",
    )
    importing.set_defaults(handler=run_import_legacy)


def _add_ports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        action="append",
        required=True,
        type=argtypes.port,
        metavar="PORT",
        help="TCP port in the target (repeat for several: one rule each)",
    )


def _word(place: Place, what: str, *, default_ok: bool = True) -> Callable[[str], str]:
    """A validator for a SOURCE, QUBE or default target word: its grammar, not its existence.

    Whether the qube exists is asked later, of the machine (exit 1 when it
    does not); a word that could never be one is a wrong command line.
    """

    def parse_word(text: str) -> str:
        try:
            token = _token(text, place, what, None)
        except PolicyError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if isinstance(token, DefaultVM) and not default_ok:
            raise argparse.ArgumentTypeError(
                "invalid target '@default': use --default-target QUBE for such calls"
            )
        return text

    return parse_word


def _qube_word(what: str) -> Callable[[str], str]:
    """A validator for a word that must be a qube's name (or dom0)."""

    def parse_qube(text: str) -> str:
        try:
            _check_qube(text, what, None)
        except PolicyError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse_qube


def _policy_file_name(file_name: str) -> str:
    """``--file``: a name dom0 reads (qrexec's filter_filepaths skips any other)."""
    if (
        invalid_file_name(file_name)
        or not file_name.endswith(".policy")
        or file_name.startswith(".")
    ):
        raise argparse.ArgumentTypeError(
            f"invalid policy file name {file_name!r}: expected lowercase letters, digits, "
            "'_', '.' or '-', not starting with '.', ending in .policy"
        )
    return file_name


def run(args: argparse.Namespace) -> int:
    handler = args.handler
    result: int = handler(args)
    return result


# -- shared helpers -------------------------------------------------------------


def _legacy_dir(args: argparse.Namespace) -> Path:
    legacy_dir: Path | None = args.legacy_dir
    return legacy_dir if legacy_dir is not None else default_legacy_dir(args.policy_dir)


def _format(args: argparse.Namespace) -> PolicyFormat:
    if args.legacy:
        return LegacyFormat(_legacy_dir(args))
    # --file is checked by its validator: dom0 reads only *.policy names of
    # these characters and skips dot-files (qrexec's filter_filepaths).
    file_name: str = getattr(args, "file", QCONNECT_FILE)
    return NewFormat(args.policy_dir, file_name, args.legacy_dir)


def _system(args: argparse.Namespace, *, required: bool) -> SystemInfo | None:
    """The qubes: from --qubes, else from qubesd in dom0; None when unknowable and optional."""
    if args.qubes is not None:
        return SystemInfo.load(args.qubes)
    if required or shutil.which(QUBESD_QUERY) is not None:
        return SystemInfo.from_running_system()
    return None


def _load(args: argparse.Namespace) -> Policy:
    if args.legacy:
        return load_legacy_policy(_legacy_dir(args))
    return load_policy(args.policy_dir, legacy_dir=args.legacy_dir)


def _ports(ports: Sequence[int]) -> list[int]:
    """The --port values (checked by their validator), each once, in the order given."""
    return list(dict.fromkeys(ports))


def _check_qube(name: str, what: str, system: SystemInfo | None) -> None:
    if not (is_valid_qube_name(name) or is_dom0(name)):
        raise PolicyError(
            f"invalid {what} {name!r}: expected a qube name (a letter, then up to 30 letters, "
            "digits, '_', '.' or '-')"
        )
    if system is not None and not is_dom0(name) and name not in system:
        raise PolicyError(f"unknown {what} {name!r}: no such qube on this machine")


def _token(text: str, place: Place, what: str, system: SystemInfo | None) -> Token:
    try:
        token = parse_token(text, place)
    except TokenError as error:
        raise PolicyError(f"invalid {what}: {error}") from None
    if isinstance(token, QubeName):
        _check_qube(token.name, what, system)
    if isinstance(token, DispVMTemplate):
        _check_qube(token.template, what, system)
    return token


def _source(text: str, system: SystemInfo | None) -> Token:
    return _token(text, Place.SOURCE, "source", system)


def _target(text: str, system: SystemInfo | None, *, default_ok: bool = False) -> Token:
    token = _token(text, Place.TARGET, "target", system)
    if isinstance(token, DefaultVM) and not default_ok:
        raise PolicyError("invalid target '@default': use --default-target QUBE for such calls")
    return token


def _redirect(text: str, system: SystemInfo | None) -> Token:
    return _token(text, Place.REDIRECT, "default target", system)


def shell_word(word: str) -> str:
    """``word`` as one shell word on one printable line: pasted into bash, it gives ``word`` back.

    ``shlex.quote`` alone keeps a newline or an escape sequence as it is, which
    would end the ``# Last change:`` comment and start a policy line. A word
    with a character ``printable`` escapes goes in bash's ``$'...'`` quoting,
    whose escapes (``\\n``, ``\\xNN``, ``\\uNNNN``, ``\\\\``...) are the ones
    ``printable`` writes; only a non-printable character from U+0080 to U+00FF
    is written ``\\u00NN``, as bash's ``\\xNN`` would be one raw byte, not it.
    """
    if printable(word) == word:
        return shlex.quote(word)
    escaped = []
    for char in word:
        shown = printable(char)
        if shown != char and 0x80 <= ord(char) <= 0xFF:
            shown = f"\\u{ord(char):04x}"
        escaped.append(shown.replace("'", "\\'"))
    return "$'" + "".join(escaped) + "'"


def _command(*words: str | None) -> str:
    """The command line recorded in our block: every word quoted, empty (None) ones left out."""
    return " ".join(shell_word(w) for w in ("qconnect", "policy", *words) if w is not None)


def _port_words(ports: Sequence[object]) -> list[str]:
    return [word for port in ports for word in ("--port", str(port))]


def _report(result: EditResult, fmt: PolicyFormat) -> int:
    for rule in result.removed:
        print(f"removed:  {printable(fmt.render(rule))}")
    for rule in result.replaced:
        print(f"replaced: {printable(fmt.render(rule))}")
    for rule in result.added:
        print(f"added:    {printable(fmt.render(rule))}")
    if not result.changes:
        print("nothing to change")
    for change in result.changes:
        if not result.written:
            sys.stdout.write(change.diff())
        elif change.new is None:
            print(f"removed {change.path}")
        else:
            print(f"wrote {change.path}")
    if not result.written and result.changes:
        print("(dry run: nothing written)")
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


# -- actions ------------------------------------------------------------------


def run_allow(args: argparse.Namespace) -> int:
    system = _system(args, required=False)
    fmt = _format(args)
    source = _source(args.source, system)
    ports = _ports(args.port)
    autostart = False if args.no_autostart else None
    action: Allow | Ask
    if args.target is not None:
        target = _target(args.target, system)
        where = ("--target", target.text)
        action = Allow(autostart=autostart)
        if args.ask:
            # Preselect QUBE in the dialog when it can be a redirect (a qube, not @tag:...).
            preselect = target if Place.REDIRECT in target.allowed else None
            action = Ask(default_target=preselect, autostart=autostart)
    else:
        redirect = _redirect(args.default_target, system)
        target = DefaultVM()
        where = ("--default-target", redirect.text)
        # An ask for a @default call offers the targets rules name: target= makes
        # QUBE the one choice, default_target= preselects it.
        action = (
            Ask(target=redirect, default_target=redirect, autostart=autostart)
            if args.ask
            else Allow(target=redirect, autostart=autostart)
        )
    rules = [Rule(SERVICE, f"+{port}", source, target, action) for port in ports]
    command = _command(
        "allow",
        source.text,
        *_port_words(ports),
        *where,
        "--ask" if args.ask else None,
        "--no-autostart" if args.no_autostart else None,
    )
    result = PolicyEditor(fmt, system).add(rules, command=command, dry_run=args.dry_run)
    return _report(result, fmt)


def run_deny(args: argparse.Namespace) -> int:
    system = _system(args, required=False)
    fmt = _format(args)
    source = _source(args.source, system)
    ports = _ports(args.port)
    # No --target: every call of SOURCE to the port, named target or not (@anyvm covers @default).
    target = AnyVM() if args.target is None else _target(args.target, system, default_ok=True)
    rules = [Rule(SERVICE, f"+{port}", source, target, Deny()) for port in ports]
    command = _command(
        "deny",
        source.text,
        *_port_words(ports),
        *(("--target", target.text) if args.target is not None else ()),
    )
    result = PolicyEditor(fmt, system).add(rules, command=command, dry_run=args.dry_run)
    return _report(result, fmt)


def run_remove(args: argparse.Namespace) -> int:
    if args.all and (args.source or args.port or args.target or args.default_target):
        raise CommandLineError("--all removes every rule this tool added: give it alone")
    if not args.all and args.source is None:
        raise CommandLineError(
            "say which rules to remove: SOURCE [--port PORT] [--target QUBE], or --all"
        )
    fmt = _format(args)
    ports = _ports(args.port)
    arguments = {f"+{port}" for port in ports}
    # The same checks as allow and deny, without asking whether the qubes exist:
    # a rule for a qube since removed must stay removable.
    wanted_source = None if args.source is None else _source(args.source, None).text
    wanted_target = (
        None if args.target is None else _target(args.target, None, default_ok=True).text
    )
    wanted_redirect = (
        None if args.default_target is None else _redirect(args.default_target, None).text
    )

    def matches(rule: Rule) -> bool:
        if args.all:
            return True
        if rule.source.text != wanted_source:
            return False
        if arguments and rule.argument not in arguments:
            return False
        if wanted_target is not None:
            return rule.target.text == wanted_target
        if wanted_redirect is not None:
            redirect = rule.action.target if isinstance(rule.action, Allow | Ask) else None
            return isinstance(rule.target, DefaultVM) and (
                redirect is not None and redirect.text == wanted_redirect
            )
        return True

    command = _command(
        "remove",
        wanted_source,
        *_port_words(ports),
        *(("--target", wanted_target) if wanted_target is not None else ()),
        *(("--default-target", wanted_redirect) if wanted_redirect is not None else ()),
        "--all" if args.all else None,
    )
    result = PolicyEditor(fmt).remove(matches, command=command, dry_run=args.dry_run)
    if not result.removed:
        raise PolicyError(
            "no rule added by qconnect matches; nothing removed (rules written by hand "
            "are never removed: edit them yourself)"
        )
    return _report(result, fmt)


def run_list(args: argparse.Namespace) -> int:
    policy = _load(args)
    rules = list(policy.rules_for(SERVICE))
    render = Rule.render_legacy if args.legacy else Rule.render
    if args.json:
        print(json.dumps([{"rule": str(r.location), "text": render(r)} for r in rules], indent=2))
        return 0
    if not rules:
        print(f"no rule decides {SERVICE} calls: every call is refused")
        return 0
    width = max(len(printable(str(rule.location))) for rule in rules)
    for rule in rules:
        print(f"{printable(str(rule.location)):<{width}}  {printable(render(rule))}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """Decide one call as dom0 would, for the target exactly as a qube would type it.

    Any TARGET is accepted, as any word can be put in a call: it is first
    rewritten as qrexec-client-vm and qrexec-daemon rewrite it
    (``target_as_sent``), then decided by the engine, which refuses words
    that are not a call's target with dom0's own reason. ``--json`` gives
    decision, target and rule, plus ``requested_target`` when the rewriting
    changed the word and ``warnings`` when there are any.
    """
    port: int = args.port
    system = _system(args, required=True)
    assert system is not None
    _check_qube(args.source, "source", system)
    typed: str = args.target
    sent = target_as_sent(typed)
    call = Call(args.source, sent, SERVICE, f"+{port}")
    policy = _load(args)
    resolution = evaluate(policy, system, call)
    if args.json:
        document: dict[str, object] = {
            "decision": resolution.action,
            "target": resolution.target,
            "rule": resolution.rule,
        }
        if sent != typed:
            document["requested_target"] = sent
        if resolution.warnings:
            document["warnings"] = list(resolution.warnings)
        print(json.dumps(document))
        return 0
    print(call.describe())
    if sent != typed:
        print(
            f"  sent as:  {sent or '@default'} (the qube typed {printable(typed)!r}; "
            "qrexec-client-vm and qrexec-daemon rewrite it)"
        )
    print(f"  decision: {resolution.action}")
    print(f"  target:   {resolution.target or '-'}")
    deciding = next((r for r in policy.rules if str(r.location) == resolution.rule), None)
    rule_text = f"  {printable(deciding.render())}" if deciding is not None else ""
    print(f"  rule:     {resolution.rule or '(none matched)'}{rule_text}")
    if resolution.choices:
        print(f"  choices:  {', '.join(resolution.choices)}")
    print(f"  why:      {resolution.reason}")
    for warning in resolution.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


def _block_problems(fmt: PolicyFormat) -> list[Problem]:
    """Damage to our own blocks (markers, foreign lines), which would stop the next edit."""
    try:
        PolicyEditor(fmt).managed()
    except PolicyError as error:
        return [problem_from_error(error)]
    return []


def run_lint(args: argparse.Namespace) -> int:
    system = _system(args, required=False) if args.qubes is not None else None
    problems: list[Problem] = []
    rule_count = 0
    paths = args.paths or [_legacy_dir(args) if args.legacy else args.policy_dir]
    for path in paths:
        if path.is_dir():
            found, policy = lint_directory(
                path, system=system, legacy_format=args.legacy, legacy_dir=args.legacy_dir
            )
            found.extend(_block_problems(LegacyFormat(path) if args.legacy else NewFormat(path)))
        elif path.exists():
            found, policy = lint_file(path, system=system, legacy_format=args.legacy)
        else:
            raise PolicyError(f"cannot lint {path}: no such file or directory")
        problems.extend(found)
        rule_count += len(policy.rules)
    for problem in sort_problems(problems):
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"no problems ({rule_count} rules)")
    return 0


def run_import_legacy(args: argparse.Namespace) -> int:
    if args.legacy:
        raise CommandLineError("import-legacy writes the new format: drop --legacy")
    legacy_dir = _legacy_dir(args)
    errors: list[PolicyError] = []
    policy = load_legacy_policy(legacy_dir, on_error=errors.append)
    if errors:
        raise PolicyError(f"cannot import, the R4.0 policy does not parse: {errors[0]}")
    rules = [
        dataclasses.replace(rule, location=None) for rule in policy.rules if rule.service == SERVICE
    ]
    if not rules:
        raise PolicyError(f"no {SERVICE} rules in {legacy_dir}: nothing to import")
    files = sorted(
        {str(r.location.file) for r in policy.rules if r.location and r.service == SERVICE}
    )
    # Keep the first of rules competing for the same calls: later ones never decided anything.
    unique: dict[tuple[object, ...], Rule] = {}
    for rule in rules:
        unique.setdefault((rule.argument, rule.source, rule.target), rule)
    fmt = _format(args)
    command = _command("import-legacy", "--legacy-dir", str(legacy_dir))
    result = PolicyEditor(fmt).add(list(unique.values()), command=command, dry_run=args.dry_run)
    status = _report(result, fmt)
    if result.written:
        print(
            f"imported {len(unique)} rule(s) from {', '.join(files)}; the R4.0 files stay in "
            f"{legacy_dir}: remove them once you have checked `{PROG} list`"
        )
    return status
