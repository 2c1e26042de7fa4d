"""`benchmarks/staleness.py --quick`: the CI-sized grid runs through real daemons and reports every cell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_grid_reports_every_cell_and_the_lag_really_happens(tmp_path):
    out = tmp_path / "staleness-quick"
    done = subprocess.run(
        [sys.executable, "benchmarks/staleness.py", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("loss "))
    table = [line.split() for line in lines[header + 1 : header + 5]]
    assert sorted((row[0], int(row[1])) for row in table) == [("gepo", 0), ("gepo", 8), ("grpo", 0), ("grpo", 8)]
    for row in table:
        assert all(cell != "nan" for cell in row), row
    result = lines[-1]
    assert result.startswith("RESULT ")
    assert {kv.split("=")[0] for kv in result.split()[1:]} == {"gepo_drop8", "grpo_drop8", "gepo_gap"}
    assert out.with_suffix(".png").stat().st_size > 10_000

    report = json.loads(out.with_suffix(".json").read_text())
    for run in report["runs"]:
        staleness = [s for step in run["steps"] for s in step["staleness"]]
        assert run["evals"][0][0] == 0 and len(run["evals"]) >= 2
        if run["lag"] == 8:
            # The sampler held each version until the learner was 8 ahead: the lag shows up in what was trained.
            assert max(staleness) >= 8, run["refresh_lags"]
            assert run["refresh_lags"] and min(run["refresh_lags"]) >= 8
        else:
            assert max(staleness) <= 4
