"""A dom0 for the policy tool's tests: a policy directory, the qubes, and the tool run on them."""

import json
from pathlib import Path

import pytest

from qconnect.cli import main
from qconnect.demo import DEFAULT_POLICY, SAMPLE_QUBES


class Dom0:
    """A policy directory and qubes description, and a way to run the tool on them."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.policy_dir = root / "etc" / "qubes" / "policy.d"
        self.policy_dir.mkdir(parents=True)
        (root / "etc" / "qubes-rpc" / "policy").mkdir(parents=True)
        (self.policy_dir / "90-default.policy").write_text(DEFAULT_POLICY)
        self.qubes = root / "qubes.json"
        self.qubes.write_text(json.dumps({"domains": SAMPLE_QUBES}))
        self.capsys = capsys

    @property
    def ours(self) -> Path:
        return self.policy_dir / "30-qconnect.policy"

    def run(self, *words: str, qubes: bool = True) -> tuple[int, str, str]:
        options = ["--policy-dir", str(self.policy_dir)]
        if qubes:
            options += ["--qubes", str(self.qubes)]
        self.capsys.readouterr()
        try:
            status = main(["policy", *words, *options])
        except SystemExit as exit_:  # argparse's refusal of a wrong command line
            status = exit_.code if isinstance(exit_.code, int) else 1
        captured = self.capsys.readouterr()
        return status, captured.out, captured.err

    def snapshot(self) -> dict[str, bytes]:
        return {
            str(path.relative_to(self.root)): path.read_bytes()
            for path in sorted(self.root.rglob("*"))
            if path.is_file()
        }
