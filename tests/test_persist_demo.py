"""The demo's permanent-binding steps: real commands on untrusted's image, undone at the end."""

import io
from pathlib import Path

from qconnect.demo import Machine
from qconnect.demo.persist_steps import QUBES_RC_LOCAL, persist_steps
from tests.persist_tree import snapshot


def test_demo_writes_shows_lists_and_removes_the_binding(tmp_path: Path) -> None:
    out = io.StringIO()
    machine = Machine(tmp_path, out)
    add, remove = persist_steps()
    add.run(machine)
    shown = out.getvalue()
    assert "$ qconnect persist add 444:@default:444 --persistence rw-only" in shown
    exec_start = "ExecStart=/usr/bin/qrexec-client-vm --use-stdin-socket -- @default "
    assert exec_start + "qubes.ConnectTCP+444\n" in shown
    assert "ListenStream=127.0.0.1:444" in shown
    assert "systemctl --no-block start 'qconnect-bind-127.0.0.1-444-\\x40default-444.socket'" in (
        shown
    )
    assert "is already persisted so; no file changed" in shown
    assert "127.0.0.1:444:@default:444  per-connection  system  rc.local" in shown
    assert "(exit status" not in shown
    untrusted = tmp_path / "untrusted"
    remove.run(machine)
    assert (untrusted / "rw/config/rc.local").read_text() == QUBES_RC_LOCAL
    assert out.getvalue().endswith(QUBES_RC_LOCAL)
    assert not any(path.is_file() for path in (untrusted / "usr").rglob("*"))
    assert "usr/local/lib/systemd" not in " ".join(snapshot(untrusted))
