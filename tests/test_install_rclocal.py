"""The one rc.local block editor: persist's block and the service's block.

Only our lines change, removing them restores the file, a new block goes
before a final ``exit``, and damaged or hand-edited blocks are refused in
one line, never guessed at.
"""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qconnect.core.errors import PersistError, ServiceError
from qconnect.core.install import rclocal
from qconnect.core.install.rclocal import BLOCK_BEGIN, add_block, remove_block
from qconnect.service.install import RC_LOCAL, install, uninstall

SOCKET_A = "qconnect-bind-127.0.0.1-444-\\x40default-444.socket"
SOCKET_B = "qconnect-bind-__1-22-work-22.socket"


def test_missing_rc_local_is_created_with_a_shebang_and_deleted_again() -> None:
    created = rclocal.update(None, [SOCKET_A])
    assert created is not None
    assert created.startswith("#!/bin/sh\n# BEGIN qconnect persist")
    assert rclocal.units_in_block(created) == [SOCKET_A]
    assert rclocal.update(created, []) is None


@pytest.mark.parametrize("block", ["persist", "service"])
def test_block_goes_before_a_final_exit_so_that_it_runs(block: str) -> None:
    text = "#!/bin/sh\necho mine\nexit 0\n"
    if block == "persist":
        updated = rclocal.update(text, [SOCKET_A])
        assert updated is not None and rclocal.update(updated, []) == text
        end = rclocal.END
    else:
        updated = add_block(text)
        assert add_block(updated) == updated and remove_block(updated) == text
        end = rclocal.BLOCK_END
    lines = updated.splitlines()
    assert lines[:2] == ["#!/bin/sh", "echo mine"]
    assert lines[-2:] == [end, "exit 0"]


def test_service_block_edit_touches_only_its_own_lines() -> None:
    user = "#!/bin/sh\n# my things\nmount /rw/extra\n"
    edited = add_block(user)
    assert edited.startswith(user) and add_block(edited) == edited
    assert remove_block(edited) == user
    assert remove_block(add_block("#!/bin/sh\necho no newline")) == "#!/bin/sh\necho no newline\n"


def test_block_is_replaced_in_place_and_user_lines_after_it_are_kept() -> None:
    text = rclocal.update("#!/bin/sh\necho one\n", [SOCKET_A])
    assert text is not None
    text += "echo added later by the user\n"
    both = rclocal.update(text, [SOCKET_A, SOCKET_B])
    assert both is not None
    assert rclocal.units_in_block(both) == sorted([SOCKET_A, SOCKET_B])
    assert both.endswith("# END qconnect persist\necho added later by the user\n")
    assert rclocal.update(both, []) == "#!/bin/sh\necho one\necho added later by the user\n"


def test_a_missing_final_newline_is_restored_exactly() -> None:
    text = "#!/bin/sh\necho no newline"
    updated = rclocal.update(text, [SOCKET_A])
    assert updated is not None and "echo no newline\n# BEGIN" in updated
    assert rclocal.update(updated, []) == text


def test_same_units_give_the_same_text() -> None:
    once = rclocal.update("#!/bin/sh\n", [SOCKET_B, SOCKET_A])
    assert rclocal.update(once, [SOCKET_A, SOCKET_B]) == once


def test_unit_names_are_shell_quoted() -> None:
    text = rclocal.update(None, [SOCKET_A])
    assert text is not None
    assert f"start '{SOCKET_A}' ||" in text


@pytest.mark.parametrize(
    "broken",
    [
        "#!/bin/sh\n# BEGIN qconnect persist\nsystemctl start x\n",
        "#!/bin/sh\n# END qconnect persist\n",
        "# BEGIN qconnect persist\n# END qconnect persist\n# BEGIN qconnect persist\n"
        "# END qconnect persist\n",
        "# END qconnect persist\n# BEGIN qconnect persist\n",
    ],
)
def test_a_broken_persist_block_is_refused_not_guessed_at(broken: str) -> None:
    with pytest.raises(PersistError, match="broken qconnect block"):
        rclocal.update(broken, [SOCKET_A])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"{BLOCK_BEGIN}\nx\n",
            f"rc.local has '{BLOCK_BEGIN}' without its end line; edit it by hand",
        ),
        (
            "# END qconnect service\n",
            f"rc.local has a damaged qconnect block (0 '{BLOCK_BEGIN}' and 1 "
            "'# END qconnect service' lines); edit it by hand",
        ),
    ],
)
def test_a_damaged_service_block_is_refused_not_guessed_at(text: str, message: str) -> None:
    with pytest.raises(ServiceError) as raised:
        add_block(text)
    assert str(raised.value) == message


def test_service_uninstall_refuses_a_damaged_block_before_removing_anything(
    tmp_path: Path,
) -> None:
    install(tmp_path, "socket")
    rc_local = tmp_path / RC_LOCAL
    rc_local.write_text(rc_local.read_text() + "# END qconnect service\n")
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    with pytest.raises(ServiceError, match="damaged qconnect block"):
        uninstall(tmp_path)
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


_USER_LINES = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20).filter(
        lambda line: "qconnect persist" not in line
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(_USER_LINES, st.booleans(), st.lists(st.sampled_from([SOCKET_A, SOCKET_B]), min_size=1))
def test_adding_then_removing_the_block_restores_any_file(
    lines: list[str], final_newline: bool, units: list[str]
) -> None:
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    updated = rclocal.update(text, units)
    assert updated is not None
    assert sorted(set(rclocal.units_in_block(updated))) == sorted(set(units))
    assert rclocal.update(updated, []) == text


# --- a block the user edited by hand (issue 9, defect 8) ---------------------------------

_BLOCK_LINE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.builds(
        lambda words: "systemctl --no-block start " + words,
        st.text(alphabet="'\"\\|&;# ab.socket\x1b\t", max_size=30),
    ),
).map(lambda line: line.replace("\n", " ").replace("\r", " "))


@settings(max_examples=300, deadline=None)
@given(st.lists(_BLOCK_LINE, max_size=6), st.text(alphabet=" (abc)\x1b", max_size=12))
def test_any_hand_edited_block_is_read_or_refused_in_one_line(body: list[str], flag: str) -> None:
    """Whatever sits between the markers: an answer, or one PersistError line; no traceback."""
    text = "#!/bin/sh\n" + "\n".join([rclocal.BEGIN + flag, *body, rclocal.END]) + "\n"
    for edit in (
        lambda: rclocal.units_in_block(text, "/rw/config/rc.local"),
        lambda: rclocal.update(text, [SOCKET_A], "/rw/config/rc.local"),
        lambda: rclocal.update(text, [], "/rw/config/rc.local"),
    ):
        try:
            edit()
        except PersistError as error:
            message = str(error)
            assert "\n" not in message and "\x1b" not in message, message
            assert message.startswith("/rw/config/rc.local"), message


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("systemctl --no-block start 'unclosed.socket || echo x", "no closing quotation"),
        ("systemctl --no-block start a.socket", "expected 'systemctl --no-block start UNIT"),
        ("systemctl --no-block start \x1b[2J.socket ||", "expected"),
    ],
)
def test_a_start_line_it_cannot_read_names_the_file_and_line(line: str, reason: str) -> None:
    text = f"#!/bin/sh\necho mine\n{rclocal.BEGIN}\n# a comment\n{line}\n{rclocal.END}\n"
    with pytest.raises(PersistError) as raised:
        rclocal.units_in_block(text, "/q/rw/config/rc.local")
    message = str(raised.value)
    assert message.startswith("/q/rw/config/rc.local:5: cannot read qconnect's line ")
    assert reason in message and "\x1b" not in message
