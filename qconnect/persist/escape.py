"""systemd's unit name escaping, as ``systemd-escape`` does it (no ``--path``).

A unit name may only hold ASCII letters, digits and ``:_.-\\`` (``@`` only
as the instance separator). systemd writes ``/`` as ``-`` and every other
byte outside ``[A-Za-z0-9:_.]`` (and a leading ``.``) as ``\\xNN`` in lower
case hex; ``-`` and ``\\`` are escaped too, so unescaping is exact. Pure.
"""

import string

# The bytes systemd keeps as they are inside an escaped name
# (VALID_CHARS of src/basic/unit-name.c minus the two escaped on purpose).
_KEPT = frozenset((string.ascii_letters + string.digits + ":_.").encode())

# UNIT_NAME_MAX in systemd: a name, suffix included, is at most 255 bytes.
UNIT_NAME_MAX = 255

_UNIT_NAME_CHARS = frozenset(string.ascii_letters + string.digits + ":-_.\\")


def escape(text: str) -> str:
    """Return ``text`` escaped as ``systemd-escape TEXT`` prints it."""
    out: list[str] = []
    for index, byte in enumerate(text.encode()):
        if byte == ord("/"):
            out.append("-")
        elif byte in _KEPT and not (index == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unescape(name: str) -> str:
    """Reverse :func:`escape` (``systemd-escape --unescape``); raise ValueError if malformed."""
    out = bytearray()
    index = 0
    while index < len(name):
        char = name[index]
        if char == "-":
            out.append(ord("/"))
            index += 1
        elif char == "\\":
            digits = name[index + 2 : index + 4]
            if name[index + 1 : index + 2] != "x" or len(digits) != 2:
                raise ValueError(f"bad escape in unit name {name!r}")
            try:
                out.append(int(digits, 16))
            except ValueError:
                raise ValueError(f"bad escape in unit name {name!r}") from None
            index += 4
        else:
            out.extend(char.encode())
            index += 1
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ValueError(f"unit name {name!r} does not unescape to UTF-8") from None


def is_valid_unit_name(name: str) -> bool:
    """Whether systemd would accept ``name`` (``PREFIX[@INSTANCE].SUFFIX``) as a unit name."""
    if len(name.encode()) > UNIT_NAME_MAX or "." not in name:
        return False
    stem, _dot, suffix = name.rpartition(".")
    if not stem or not suffix or not suffix.isalpha():
        return False
    prefix, _at, instance = stem.partition("@")
    if not prefix or "@" in instance:
        return False
    return all(char in _UNIT_NAME_CHARS for char in prefix + instance)
