"""Text from the command line reaches ``service install``'s units only as text.

``service install`` records its command line (a ``--root`` path may hold any
byte) in the header comment of two root units and a tmpfiles.d file. systemd
ends a line at CR, LF and NUL, so before the fix a root such as
``/img\\r[Service]\\rExecStartPre=/bin/touch /pwned\\r#`` added a directive of
the caller's choosing to both units.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qconnect.core.errors import ServiceError
from qconnect.persist.unitfile import directives
from qconnect.service.install import Layout, render_tmpfiles, render_units

BENIGN = render_units("qconnect service install --socket", " --root /img")
HOSTILE_ROOT = " --root '/img\r[Service]\rExecStartPre=/bin/touch /pwned\r#'"


def _lines_systemd_sees(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line]


def test_a_carriage_return_in_the_root_adds_no_directive() -> None:
    units = render_units("qconnect service install --socket" + HOSTILE_ROOT, HOSTILE_ROOT)
    for name, text in units.items():
        assert directives(text) == directives(BENIGN[name])
        assert "\r" not in text


@given(command=st.text(), root_option=st.text())
def test_any_command_line_leaves_exactly_the_template_directives(
    command: str, root_option: str
) -> None:
    for layout in Layout:
        units = render_units(command, root_option, layout=layout)
        expected = render_units("qconnect service install", " --root /img", layout=layout)
        for name, text in units.items():
            assert directives(text) == directives(expected[name])
            header = text.split("\n", 2)[:2]
            assert all(line.isprintable() for line in header)
    tmpfiles = render_tmpfiles(command, root_option)
    benign = render_tmpfiles("qconnect service install", " --root /img")
    assert [line for line in _lines_systemd_sees(tmpfiles) if not line.startswith("#")] == [
        line for line in _lines_systemd_sees(benign) if not line.startswith("#")
    ]


@pytest.mark.parametrize("python", ["/usr/bin/python3\n", "/opt/py\rthon", "/usr/bin/py\x00"])
def test_an_interpreter_path_with_a_line_end_is_refused(python: str) -> None:
    with pytest.raises(ServiceError, match="not printable ASCII"):
        render_units("qconnect service install", python=python)
