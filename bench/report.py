"""The benchmark's summary: figures per chain, ratios to the original and to direct, goals.

Pure: a results dict in, text and a goals dict out (the JSON is written by
``bench.__main__``).
"""

from typing import Any

#: Figure key -> (column title, format, higher is better).
FIGURES: dict[str, tuple[str, str, bool]] = {
    "up_mb_s": ("up MB/s", "{:.0f}", True),
    "down_mb_s": ("down MB/s", "{:.0f}", True),
    "p50_ms": ("p50 ms", "{:.2f}", False),
    "p99_ms": ("p99 ms", "{:.2f}", False),
    "burst_s": ("burst s", "{:.2f}", False),
    "idle_kib": ("idle KiB", "{:.0f}", False),
    "per_conn_kib": ("KiB/conn", "{:.0f}", False),
}

# The goals, as ratios in the same run (issue 6).
THROUGHPUT_VS_ORIGINAL = 1.5  # qconnect default at least this many times the original's
LATENCY_VS_ORIGINAL = 0.8  # qconnect default's p50 at most this fraction of the original's
BURST_SECONDS = 10.0  # 1,000 connections opened at once, all served within this
BUILTIN_TOLERANCE = 0.10  # qconnect default within 10% of the built-in


def summary_row(chain: dict[str, Any]) -> dict[str, float | None]:
    """The table's figures for one chain (None where it could not be measured)."""
    burst = chain.get("burst") or {}
    complete = burst and burst.get("served") == burst.get("count")
    return {
        "up_mb_s": chain.get("up_mb_s"),
        "down_mb_s": chain.get("down_mb_s"),
        "p50_ms": chain.get("p50_ms"),
        "p99_ms": chain.get("p99_ms"),
        "burst_s": burst.get("seconds") if complete else None,
        "idle_kib": chain.get("idle_kib"),
        "per_conn_kib": chain.get("per_conn_kib"),
    }


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def ratios(summary: dict[str, dict[str, float | None]], base: str) -> dict[str, dict[str, Any]]:
    """Every chain's figures divided by chain ``base``'s (None where either is missing)."""
    reference = summary.get(base, {})
    return {
        name: {key: ratio(row[key], reference.get(key)) for key in FIGURES}
        for name, row in summary.items()
    }


def goals(summary: dict[str, dict[str, float | None]], results: dict[str, Any]) -> dict[str, Any]:
    """Issue 6's goals for qconnect default, each with its figures and whether it holds."""
    ours = summary.get("default", {})
    original = summary.get("original", {})
    builtin = summary.get("builtin", {})
    checks: dict[str, Any] = {}

    def check(name: str, value: float | None, limit: float, at_least: bool) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        checks[name] = {"value": value, "limit": limit, "at_least": at_least, "met": met}

    for key in ("up_mb_s", "down_mb_s"):
        check(f"{key} vs original", ratio(ours.get(key), original.get(key)), 1.5, True)
        check(
            f"{key} vs builtin",
            ratio(ours.get(key), builtin.get(key)),
            1 - BUILTIN_TOLERANCE,
            True,
        )
    check("p50 vs original", ratio(ours.get("p50_ms"), original.get("p50_ms")), 0.8, False)
    check(
        "p50 vs builtin",
        ratio(ours.get("p50_ms"), builtin.get("p50_ms")),
        1 + BUILTIN_TOLERANCE,
        False,
    )
    burst = results["chains"].get("default", {}).get("burst") or {}
    served_all = burst.get("served") == burst.get("count")
    check("burst seconds", burst.get("seconds") if served_all else None, BURST_SECONDS, False)
    return checks


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: dict[str, Any]) -> str:
    """The text printed at the end of a run (and pasted into the README)."""
    summary = results["summary"]
    names = list(summary)
    machine = results["machine"]
    arguments = results["arguments"]
    lines = [
        f"machine: {machine['cpus']} cores, {machine['cpu_model']}, kernel {machine['kernel']}, "
        f"Python {machine['python']}, {machine['socat']}",
        f"transfers {arguments['size_mib']} MiB each way; latency over {arguments['calls']} "
        f"sequential connections; burst of {arguments['burst']} at once; memory with "
        f"{arguments['held']} connections open",
        f"loopback qrexec: {results.get('loopback', 'in-process')} (every chain alike)",
        "",
    ]
    width = 12
    header = f"{'chain':<10}" + "".join(f"{FIGURES[key][0]:>{width}}" for key in FIGURES)
    for title, rows in (
        ("figures", None),
        ("ratio to original", results["ratios_vs_original"]),
        ("ratio to direct", results["ratios_vs_direct"]),
    ):
        lines.append(f"{title}:")
        lines.append(header)
        for name in names:
            if rows is None:
                cells = [_cell(summary[name][key], FIGURES[key][1]) for key in FIGURES]
            else:
                cells = [_ratio_cell(rows[name][key]) for key in FIGURES]
            lines.append(f"{name:<10}" + "".join(f"{cell:>{width}}" for cell in cells))
        lines.append("")
    notes = []
    for name, chain in results["chains"].items():
        burst = chain.get("burst")
        if burst and burst.get("no_channel"):
            notes.append(
                f"{name}: {burst['no_channel']} calls of the burst refused by dom0 for lack of "
                "a data port"
            )
        if burst and burst.get("served") != burst.get("count"):
            notes.append(
                f"{name}: burst served {burst['served']} of {burst['count']} "
                f"({burst['failed']} failed, {burst['unfinished']} unfinished after "
                f"{burst['seconds']:.0f} s)"
            )
        for error in chain.get("errors", []):
            notes.append(f"{name}: {error}")
    if notes:
        lines += ["notes:", *(f"  {note}" for note in notes), ""]
    lines.append("goals (qconnect default):")
    for name, check in results["goals"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
        sign = ">=" if check["at_least"] else "<="
        value = "-" if check["value"] is None else f"{check['value']:.2f}"
        lines.append(f"  {name:<22} {value:>8} (goal {sign} {check['limit']:g}): {verdict}")
    return "\n".join(lines)
