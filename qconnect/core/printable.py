"""Make text from outside safe to print on a terminal or write into a log line.

Text that another qube, another local user or a hand-edited file controls may
carry terminal escape sequences (``\\x1b[2J``), carriage returns that overwrite
what came before on the same line, or newlines that forge a second log line.
Every value from outside goes through :func:`printable` before it reaches a
terminal, a log file or the journal's MESSAGE, so one line stays one line and
shows exactly what was received.
"""

# Backslash is escaped too, so an escaped line can be read back without doubt:
# a literal ``\x1b`` sent by a peer prints as ``\\x1b``, never as ESC's escape.
_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str | bytes) -> str:
    """Return ``text`` with every non-printable character escaped, on one line.

    Bytes are decoded as UTF-8 with invalid bytes kept as ``\\xNN``; printable
    non-ASCII letters (a qube's log in French, a path in Greek) stay as they are.
    Control characters, including C1 controls and Unicode line separators, become
    ``\\n``, ``\\t``, ``\\r``, ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="surrogateescape")
    out: list[str] = []
    for char in text:
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif char.isprintable() and char != "\x7f":
            out.append(char)
        else:
            code = ord(char)
            if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by surrogateescape
                out.append(f"\\x{code - 0xDC00:02x}")
            elif code <= 0xFF:
                out.append(f"\\x{code:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)
