"""`heterorl demo`, the README's first command, end to end on the tiny model, and how it places its samplers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from heterorl.cli import _spawn
from tests.conftest import REPO


def test_spawned_sampler_runs_at_the_niceness_asked_for(tmp_path):
    """The demo lowers its samplers' priority so that the learner's step goes first on shared cores."""
    child = _spawn("probe", [sys.executable, "-c", "import os, time; print(os.nice(0), flush=True); time.sleep(0.2)"],
                   tmp_path / "probe.log", nice=7)
    assert child.proc.wait(timeout=30) == 0
    assert int(child.log_path.read_text().strip()) == os.nice(0) + 7


@pytest.mark.slow
def test_demo_trains_and_ends_with_what_was_learned(tmp_path, tiny_cache):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "HETERORL_CACHE": str(tiny_cache)}
    out = subprocess.run(
        [sys.executable, "-m", "heterorl.cli", "demo", "--model", "tiny", "--steps", "3", "--eval-every", "3",
         "--eval-size", "8", "--sampler-engine", "transformers", "--run-dir", str(run_dir), "--",
         "--reward", "digit_fraction", "--group-size", "4", "--groups-per-step", "2", "--max-new-tokens", "8",
         "--lr", "1e-3", "--chunk-bytes", "65536"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "=== what was learned" in out.stdout
    assert "held-out accuracy (8 problems, greedy)" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["groups_trained"] == 6
    # No terminal: progress comes as plain lines, not carriage-return redraws.
    assert "\r" not in out.stdout and "/3 | version" in out.stdout
    for i in (1, 2):
        assert "registered" in (run_dir / f"sampler-{i}.log").read_text().lower()
