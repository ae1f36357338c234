"""What a refusal on the command line looks like, for the tests of every command.

argparse prints its usage block (a ``usage:`` line, wrapped onto indented
lines when long) before its one error line; our own refusals are one line.
"""


def refusal_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` after argparse's usage block, if it printed one."""
    lines = stderr.splitlines()
    if lines and lines[0].startswith("usage: "):
        lines = lines[1:]
        while lines and lines[0].startswith(" "):
            lines = lines[1:]
    return lines


def assert_one_refusal(code: int, stderr: str, expected_code: int, *named: str) -> str:
    """Exit ``expected_code``, one error line (after any usage) naming each of ``named``."""
    assert "Traceback" not in stderr, stderr
    assert code == expected_code, (code, stderr)
    lines = refusal_lines(stderr)
    assert len(lines) == 1, stderr
    assert ": error: " in lines[0], stderr
    for text in named:
        assert text in lines[0], (text, stderr)
    return lines[0]
