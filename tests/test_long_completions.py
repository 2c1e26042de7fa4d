"""Long completions end to end: a learner and one sampler train the tiny model for 2 steps with 512 new tokens per
completion, on a local math dataset scored by a weighted list with the `math` reward, evaluated greedy and by
pass@1 over k samples."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from math_set import write_math_set  # noqa: E402

STEPS = 2
MAX_NEW_TOKENS = 512


@pytest.mark.slow
def test_512_token_completions_train_and_evaluate_end_to_end(processes, tmp_path):
    data = write_math_set(tmp_path / "math.jsonl")
    run_dir = tmp_path / "run"
    learner, target = processes.learner(
        run_dir, max_steps=STEPS, task="dataset", task_path=data, eval_fraction=0.25,
        reward="math,digit_fraction", reward_weights="1.0,0.5", max_new_tokens=MAX_NEW_TOKENS,
        eval_every=0, eval_size=4, eval_samples=2, micro_batch_tokens=4096, lease_ttl_s=300,
        # A low temperature keeps the random tiny model from ending most completions after a few dozen tokens.
        temperature=0.3,
    )
    processes.sampler("sampler", target, "--seed", "1")
    learner.wait(timeout=420)
    log = learner.log_path.read_text()
    assert learner.returncode == 0, log[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["groups_refused_reward"] == 0
    assert [e["step"] for e in summary["eval"]] == [0, STEPS]
    for point in summary["eval"]:
        assert point["k"] == 2 and 0.0 <= point["pass1"] <= 1.0 and 0.0 <= point["accuracy"] <= 1.0
    assert summary["eval_samples"] == 2 and summary["final_pass1"] == summary["eval"][-1]["pass1"]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    assert any(r["grad_norm"] > 0 for r in train), "the dense half of the reward gives groups signal"
    # Completions (mean tokens per completion) ran far past the old 16-token default.
    assert max(r["seq_len_mean"] for r in train) > 64
    assert all({"accuracy", "pass1", "k", "n"} <= set(r) for r in evals) and evals[0]["n"] == 4
