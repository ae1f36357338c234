"""``qconnect demo``'s client part runs end to end and leaves nothing behind."""

import re
import subprocess
import sys


def test_demo_fetches_a_page_shows_a_refusal_lists_and_stops() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qconnect.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  200 OK\n  <h1>Hello from mytcp-service</h1>" in out
    assert re.search(r"-> mytcp-service:22 \(.*\): refused by dom0 policy", out)
    assert "qconnect policy allow untrusted --port 22 --target mytcp-service" in out
    listed = re.search(
        r"\$ qconnect loopback run \$LOOPBACK untrusted -- qconnect list\n(.*?)\n\n", out, re.S
    )
    assert listed and "handoff" in listed.group(1)
    assert "no running bindings" in out
    assert re.search(r"removed /\S+", out)
