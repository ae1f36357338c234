"""qrexec-client-vm's command line, read exactly as its getopt_long does.

``[--use-stdin-socket] [--buffer-size=N] TARGET SERVICE[+ARG] [LOCAL_PROGRAM ARGS...]``:
the options table, the usage text, and the checks the C program makes
before it sends anything (qubes-core-qrexec, agent/qrexec-client-vm.c).
Pure apart from ``--use-stdin-socket``'s look at fd 0, which the real
program also makes while it parses.
"""

import errno
import os
import socket
from dataclasses import dataclass, field

PROG = "qrexec-client-vm"

USAGE = f"""\
usage: {PROG} [options] target_vmname program_ident [local_program [local program arguments]]
Options:
  -h, --help - print this message
  --buffer-size=BUFFER_SIZE - minimum vchan buffer size (default: 64k)
  -t, --filter-escape-chars-stdout - filter non-ASCII and control characters on stdout
  -T, --filter-escape-chars-stderr - filter non-ASCII and control characters on stderr
  --no-filter-escape-chars-stdout - opposite to --filter-escape-chars-stdout
  --no-filter-escape-chars-stderr - opposite to --filter-escape-chars-stderr
  --agent-socket=PATH - path to connect to (ignored by the loopback)
  -p PREFIX-DATA, --prefix-data=PREFIX-DATA - send the given data before the provided stdin
  --use-stdin-socket - use fd 0 (which must be socket) for both stdin and stdout
  -s SOURCE-QUBE, --source-qube=SOURCE-QUBE - source of a relayed call (ignored by the loopback)
"""

# getopt_long's table in qrexec-client-vm.c: long name -> (short key, takes a value).
_LONG_OPTIONS = {
    "buffer-size": ("b", True),
    "filter-escape-chars-stdout": ("t", False),
    "filter-escape-chars-stderr": ("T", False),
    "no-filter-escape-chars-stdout": ("no-t", False),
    "no-filter-escape-chars-stderr": ("no-T", False),
    "agent-socket": ("a", True),
    "prefix-data": ("p", True),
    "use-stdin-socket": ("use-stdin-socket", False),
    "source-qube": ("s", True),
    "help": ("h", False),
}
_SHORT_OPTIONS = {"t": False, "T": False, "a": True, "p": True, "s": True, "h": False}

# The largest --buffer-size qrexec-client-vm accepts (it must fit a C int).
_INT_MAX = 2**31 - 1

# How long, after the service side has ended, the relay of its last bytes to
# the caller may take before the call ends anyway (a caller that does not read


class UsageError(Exception):
    """A command line qrexec-client-vm refuses; ``exit_code`` and whether to print usage."""

    def __init__(self, message: str, exit_code: int = 2, *, show_usage: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.show_usage = show_usage


@dataclass
class Options:
    """The parsed command line."""

    target: str = ""
    service: str = ""
    local_program: list[str] = field(default_factory=list)
    use_stdin_socket: bool = False
    buffer_size: int = 0
    prefix_data: bytes = b""
    help: bool = False


def _parse_buffer_size(text: str) -> int:
    """strtoul(text, 0) as qrexec-client-vm checks it: a leading digit, no junk, <= INT_MAX."""
    if not text[:1].isdigit() or not text[:1].isascii():
        raise UsageError("Bad buffer size: does not begin with a number", 1, show_usage=False)
    digits, base = text, 10
    if text[:2].lower() == "0x":
        digits, base = text[2:], 16
    elif text.startswith("0") and len(text) > 1:
        digits, base = text[1:], 8
    try:
        value = int(digits, base) if digits.isascii() and digits.isalnum() else None
    except ValueError:
        value = None
    if value is None:
        raise UsageError("Bad buffer size: trailing junk", 1, show_usage=False)
    if value > _INT_MAX:
        raise UsageError("strtoul: Numerical result out of range", 1, show_usage=False)
    return value


def _check_stdin_socket() -> None:
    try:
        kind = _socket_type(0)
    except OSError as error:
        if error.errno == errno.ENOTSOCK:
            raise UsageError(
                "--use-stdin-socket passed, but stdin not a socket", show_usage=False
            ) from None
        raise UsageError(
            f"getsockopt(0, SOL_SOCKET, SO_TYPE): {error.strerror}", show_usage=False
        ) from None
    if kind != socket.SOCK_STREAM:
        raise UsageError(
            f"stdin was a socket of type {kind}, not SOCK_STREAM ({int(socket.SOCK_STREAM)})",
            show_usage=False,
        )


def _socket_type(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)


def usage(*, stdin_socket_option: bool = True) -> str:
    """The usage text; an older client's has no --use-stdin-socket line."""
    if stdin_socket_option:
        return USAGE
    return "".join(line for line in USAGE.splitlines(True) if "--use-stdin-socket" not in line)


def parse_command_line(argv: list[str], *, stdin_socket_option: bool = True) -> Options:
    """Parse like getopt_long with "+" (options end at the first non-option word).

    ``stdin_socket_option=False`` plays a qrexec-client-vm from before
    ``--use-stdin-socket`` existed: the option is unknown.
    """
    options = Options()
    long_options = dict(_LONG_OPTIONS)
    if not stdin_socket_option:
        del long_options["use-stdin-socket"]
    index = 0

    def apply(key: str, value: str | None) -> None:
        if key == "b":
            assert value is not None
            options.buffer_size = _parse_buffer_size(value)
        elif key == "p":
            if options.prefix_data:
                raise UsageError("--prefix-data can only be used once")
            options.prefix_data = os.fsencode(value or "")
        elif key == "use-stdin-socket":
            if options.use_stdin_socket:
                raise UsageError("--use-stdin-socket passed twice", show_usage=False)
            _check_stdin_socket()
            options.use_stdin_socket = True
        elif key == "h":
            options.help = True
        # -t/-T and their negations (escape filtering), -a and -s are accepted
        # and have no effect in the loopback (see the README).

    while index < len(argv):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            matches = [long for long in long_options if long.startswith(name)]
            if name in long_options:
                matches = [name]
            if len(matches) != 1:
                problem = "ambiguous" if matches else "unrecognized"
                raise UsageError(f"{PROG}: {problem} option '--{name}'")
            key, takes_value = long_options[matches[0]]
            if takes_value and not equals:
                index += 1
                if index >= len(argv):
                    raise UsageError(f"{PROG}: option '--{matches[0]}' requires an argument")
                value = argv[index]
            elif not takes_value and equals:
                raise UsageError(f"{PROG}: option '--{matches[0]}' doesn't allow an argument")
            apply(key, value if takes_value else None)
            index += 1
            continue
        if word.startswith("-") and word != "-":
            position = 1
            while position < len(word):
                letter = word[position]
                if letter not in _SHORT_OPTIONS:
                    raise UsageError(f"{PROG}: invalid option -- '{letter}'")
                if _SHORT_OPTIONS[letter]:
                    value = word[position + 1 :]
                    if not value:
                        index += 1
                        if index >= len(argv):
                            raise UsageError(f"{PROG}: option requires an argument -- '{letter}'")
                        value = argv[index]
                    apply(letter, value)
                    break
                apply(letter, None)
                position += 1
            index += 1
            continue
        break
    positional = argv[index:]
    if options.help:
        return options
    if len(positional) < 2:
        raise UsageError("")
    options.target, options.service = positional[0], positional[1]
    options.local_program = positional[2:]
    if options.local_program and options.use_stdin_socket:
        raise UsageError("cannot spawn a local process with --use-stdin-socket")
    return options
