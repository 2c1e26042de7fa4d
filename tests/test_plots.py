"""`heterorl plot` and `heterorl compare`: PNG charts from metrics.jsonl, and one-line errors for unusable input."""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from heterorl.cli import main as cli_main
from heterorl.tools.plots import CHARTS, OVERVIEW, PlotError, load_run

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_record(step: int, rng: random.Random, lag: int) -> dict:
    staleness = [min(step - 1, rng.randint(0, lag)) for _ in range(2)]
    kl = 10 ** rng.uniform(-4, -1)
    return {
        "kind": "train", "step": step, "version": step + 1, "groups": 2, "reward_mean": min(1.0, 0.1 + step / 40),
        "accuracy": 0.0, "staleness_mean": sum(staleness) / 2, "staleness_max": max(staleness),
        "staleness": staleness, "samplers": ["S-a", "S-b"], "policy_versions": [step + 1 - s for s in staleness],
        "leases": ["L1", "L2"], "prompts": [2 * step, 2 * step + 1], "time": 1.7e9 + step,
        "is_weight_mean": 1.0, "is_weight_var": 0.05 * kl, "clip_frac_low": 0.0, "clip_frac_high": 0.0,
        "kl_k3": kl, "adv_mean": 0.0, "adv_std": 0.3, "adv_zero_frac": 0.1, "seq_len_mean": 8.0,
        "loss": -0.01 * rng.random(), "token_ratio_var": 0.7 * kl, "seq_ratio_var": 0.3 * kl,
        "group_weight_var": 0.05 + 0.01 * rng.random(), "is_weight_max": 1.2, "grad_norm": 0.5,
        "train_seconds": 0.02,
    }


def write_run(run_dir: Path, steps: int = 24, lag: int = 4, seed: int = 0, eval_every: int = 4) -> Path:
    """A run directory with a metrics.jsonl shaped like the learner's (train records, eval records)."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    records = [{"kind": "eval", "step": 0, "version": 1, "accuracy": 0.1, "n": 16, "seconds": 0.1, "time": 1.7e9}]
    for step in range(1, steps + 1):
        records.append(train_record(step, rng, lag))
        if step % eval_every == 0:
            records.append({"kind": "eval", "step": step, "version": step + 1, "accuracy": min(1.0, 0.1 + step / 30),
                            "n": 16, "seconds": 0.1, "time": 1.7e9 + step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def assert_png(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert min_width <= width <= 4000 and min_height <= height <= 3000, (path, width, height)
    assert 5_000 < len(data) < 3_000_000, (path, len(data))
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # checks the chunks' CRCs
    with Image.open(path) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 20, f"{path} looks blank"


def test_plot_writes_every_chart_and_an_overview(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert cli_main(["plot", str(run)]) == 0
    out = run / "plots"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{n}.png" for n in (*CHARTS, OVERVIEW))
    for png in out.iterdir():
        assert_png(png)
    assert_png(out / "overview.png", min_width=1200, min_height=700)
    assert "wrote 7 charts" in capsys.readouterr().out


def test_plot_to_another_directory_and_a_run_without_evals(tmp_path):
    run = write_run(tmp_path / "run", steps=3, eval_every=1000)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if '"eval"' not in line))
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "charts")]) == 0
    for name in (*CHARTS, OVERVIEW):
        assert_png(tmp_path / "charts" / f"{name}.png")


def test_compare_overlays_runs(tmp_path, capsys):
    runs = [write_run(tmp_path / f"run{i}", steps=10 + 8 * i, lag=2 + 6 * i, seed=i) for i in range(3)]
    out = tmp_path / "cmp"
    assert cli_main(["compare", *map(str, runs), "--labels", "lag 2", "lag 8", "lag 14", "--out", str(out)]) == 0
    for name in (*CHARTS, OVERVIEW):
        assert_png(out / f"{name}.png")
    assert "comparing 3 runs" in capsys.readouterr().out
    # Default labels are the directory names; the same name twice is told apart.
    assert cli_main(["compare", str(runs[0]), str(runs[0]), "--out", str(tmp_path / "cmp2")]) == 0
    assert_png(tmp_path / "cmp2" / "overview.png")


def test_compare_with_the_wrong_number_of_labels(tmp_path, capsys):
    runs = [write_run(tmp_path / f"run{i}", seed=i) for i in range(2)]
    assert cli_main(["compare", *map(str, runs), "--labels", "one", "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("heterorl compare: 1 labels for 2 runs") and "\n" not in err


def test_a_record_being_written_is_ignored(tmp_path):
    run = write_run(tmp_path / "run", steps=5)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 6, "loss": 0.1')  # no newline: the learner is mid-write
    loaded = load_run(run)
    assert [r["step"] for r in loaded.train] == [1, 2, 3, 4, 5]
    assert math.isclose(loaded.eval[-1]["accuracy"], 0.1 + 4 / 30)


def _corrupt(tmp_path: Path) -> Path:
    run = write_run(tmp_path / "corrupt", steps=5)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


BAD_RUNS = {
    "missing dir": (lambda tmp: tmp / "nope", "does not exist", "--run-dir"),
    "no metrics": (lambda tmp: (tmp / "empty-dir").mkdir() or tmp / "empty-dir", "has no metrics.jsonl", "pass the"),
    "empty metrics": (lambda tmp: _touch(tmp / "e" / "metrics.jsonl").parent, "is empty", "plot again once"),
    "no records": (lambda tmp: _touch(tmp / "n" / "metrics.jsonl", '{"kind": "other"}\n').parent,
                   "holds no train or eval records", "plot again once"),
    "corrupt line": (_corrupt, "line 3 of", "delete that line"),
    "not objects": (lambda tmp: _touch(tmp / "l" / "metrics.jsonl", "[1, 2]\n").parent, "not a JSON object",
                    "pass the run directory"),
}


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_unusable_metrics_give_one_line_naming_cause_and_fix(tmp_path, capsys, case):
    make, cause, fix = BAD_RUNS[case]
    run = make(tmp_path)
    with pytest.raises(PlotError):
        load_run(run)
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("heterorl plot: ")
    assert cause in err and fix in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    good = write_run(tmp_path / "good")
    assert cli_main(["compare", str(good), str(run), "--out", str(tmp_path / "cmp")]) == 2
    assert cause in capsys.readouterr().err


def test_the_console_command_exits_2_without_a_traceback(tmp_path):
    run = _corrupt(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "heterorl.cli", "plot", str(run)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "line 3 of" in proc.stderr
