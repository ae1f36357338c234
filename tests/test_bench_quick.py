"""``python -m bench --quick`` runs every chain end to end and writes complete, well-formed JSON.

Figures are never asserted (they depend on the machine): only that each chain
was measured, that every transfer and echo came back intact (the bench raises
or records an error otherwise) and that the report holds together.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.chains import CHAINS
from bench.report import FIGURES

PROJECT = Path(__file__).resolve().parent.parent


def test_quick_bench_measures_every_chain_and_writes_complete_json(tmp_path: Path) -> None:
    output = tmp_path / "chains.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results["chains"]) == set(CHAINS)
    assert results["loopback"] == "fork-server"  # every chain through the same fork-server
    for key in ("cpus", "cpu_model", "kernel", "python"):
        assert results["machine"][key], key
    for name, chain in results["chains"].items():
        assert not chain.get("errors"), (name, chain.get("errors"))
        assert len(chain["latency_ms"]) == results["arguments"]["calls"], name
        burst = chain["burst"]
        assert burst["served"] == burst["count"] == results["arguments"]["burst"], (name, burst)
        row = results["summary"][name]
        for key in FIGURES:
            if name == "direct" and key in ("idle_kib", "per_conn_kib"):
                continue  # nothing of ours runs on the direct path
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), (name, key)
        assert results["ratios_vs_original"][name]["p50_ms"] is not None
        assert results["ratios_vs_direct"][name]["up_mb_s"] is not None
    assert results["ratios_vs_original"]["original"]["up_mb_s"] == 1.0
    for name, check in results["goals"].items():  # each goal measured, its verdict its figures'
        value, limit = check["value"], check["limit"]
        assert isinstance(value, int | float) and math.isfinite(value), (name, check)
        assert check["met"] is (value >= limit if check["at_least"] else value <= limit), name
    assert "ratio to original:" in result.stdout and "goals (qconnect default):" in result.stdout
