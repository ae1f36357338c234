"""Man pages written from the live argparse parsers, so they cannot drift from ``--help``.

The prose a parser cannot give (what the command is for, files, examples)
is hand-written in ``man/*.in``; every synopsis, description and option list
comes from the same parser objects ``--help`` prints. A template's
``@COMMANDS@`` line is replaced by one section per (sub)command.

Standard library only: the dom0 package builds its page from the policy
parser alone. Run by ``packaging/stage.py`` at package build time.
"""

import argparse
import datetime
import os
import re
from collections.abc import Iterator

#: roff needs these escaped: a backslash, and a period or quote at a line start.
_LEADING_CONTROL = re.compile(r"^([.'])", re.MULTILINE)


def escape(text: str) -> str:
    """``text`` as roff body text: backslashes doubled, hyphens as minus signs where literal."""
    text = text.replace("\\", "\\e")
    text = text.replace("-", "\\-")
    return _LEADING_CONTROL.sub(r"\\&\1", text)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name, in the order ``--help`` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(
    parser: argparse.ArgumentParser, words: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser below ``parser`` (itself first), with the command words that reach it."""
    yield words, parser
    for name, sub in subcommands(parser).items():
        yield from walk(sub, (*words, name))


def _usage(parser: argparse.ArgumentParser) -> str:
    """The synopsis on one line: roff fills it to the reader's width."""
    return " ".join(parser.format_usage().removeprefix("usage: ").split())


def _option_heading(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """``.TP`` heading of one option, as ``--help`` spells it: names bold, value italic."""
    if not action.option_strings:
        return f"\\fI{escape(formatter._metavar_formatter(action, action.dest)(1)[0])}\\fR"
    names = []
    for name in action.option_strings:
        if action.nargs == 0:
            names.append(f"\\fB{escape(name)}\\fR")
        else:
            value = formatter._format_args(action, action.dest.upper())
            names.append(f"\\fB{escape(name)}\\fR \\fI{escape(value)}\\fR")
    return ", ".join(names)


def section(words: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    """One command's section: heading, synopsis, description, positionals and options."""
    formatter = parser._get_formatter()
    lines = [f'.SS "{escape(" ".join(words))}"', escape(_usage(parser))]
    if parser.description:
        lines += [".PP", escape(parser.description)]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            names = ", ".join(f"\\fB{escape(name)}\\fR" for name in action.choices)
            lines += [".PP", f"Commands: {names} (each below)."]
            continue
        help_text = formatter._expand_help(action) if action.help else ""
        lines += [".TP", _option_heading(action, formatter), escape(help_text)]
    if parser.epilog:
        lines += [".PP", escape(parser.epilog)]
    return "\n".join(lines)


def render(
    template: str, parsers: list[tuple[tuple[str, ...], argparse.ArgumentParser]], version: str
) -> str:
    """The page: ``template`` with @VERSION@, @DATE@ and @COMMANDS@ filled in."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    when = (
        datetime.datetime.fromtimestamp(epoch, datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    commands = "\n".join(section(words, parser) for words, parser in parsers)
    page = template.replace("@VERSION@", version).replace("@DATE@", when.strftime("%Y-%m-%d"))
    if page.count("@COMMANDS@\n") != 1:
        raise ValueError("a man page template needs exactly one @COMMANDS@ line")
    return page.replace("@COMMANDS@\n", commands + "\n")
