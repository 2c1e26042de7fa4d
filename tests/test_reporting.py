"""`--report-to`: every number of metrics.jsonl reaches TensorBoard event files (read back with tensorboard's own
reader), per step; W&B needs its package and says which extra to install when it is missing."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest

from heterorl.common.config import ConfigError, from_flat
from heterorl.server import loop
from heterorl.server.config import LearnerConfig
from heterorl.server.learner import Learner, Submission
from heterorl.server.reporting import Reports, scalars

G, B = 4, 2


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))


def _learner(run_dir: Path, **overrides) -> Learner:
    settings = {"port": 0, "run_dir": run_dir, "model": "tiny", "reward": "digit_fraction", "group_size": G,
                "groups_per_step": B, "max_new_tokens": 8, "eval_size": 4, "chunk_bytes": 65536, "lr": 1e-3,
                "threads": 1, "verify_first": 0, "verify_fraction": 0.0, **overrides}
    return Learner(from_flat(LearnerConfig, **settings))


def _train_one_step(learner: Learner) -> dict:
    sampler = learner.register("reporter", "transformers", "cpu", B)
    for i, lease in enumerate(learner.lease(sampler.sampler_id, B)):
        comps = [([5 + (i + j) % 7, 6, 7], [-1.0, -0.5, -2.0 - j], 2, None) for j in range(G)]
        learner.submit(Submission(sampler.sampler_id, lease.lease_id, 1, comps))
    return learner.train_once(loop.wait_for_groups(learner, threading.Event()))


def test_tensorboard_events_hold_every_number_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    learner = _learner(run_dir, report_to=["tensorboard"])
    try:
        learner.evaluate()
        record = _train_one_step(learner)
        learner.evaluate()
    finally:
        learner.close()  # flushes the event file

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:  # every number of every line, at its step
        for tag, value in scalars(line).items():
            assert tag in tags, f"{tag} missing from the event file"
            at_step = [e.value for e in events.Scalars(tag) if e.step == line["step"]]
            assert at_step and at_step[-1] == pytest.approx(value, rel=1e-6, nan_ok=True), tag
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1] and loss[0].value == pytest.approx(record["loss"], rel=1e-6)
    accuracy = events.Scalars("eval/accuracy")
    assert [e.step for e in accuracy] == [0, 1]
    assert [e.value for e in accuracy] == pytest.approx([r["accuracy"] for r in lines if r["kind"] == "eval"])
    assert "train/staleness" not in tags and "train/samplers" not in tags  # lists are not scalars


def test_no_targets_writes_no_event_files(tmp_path):
    run_dir = tmp_path / "run"
    learner = _learner(run_dir, report_to=["none"], eval_size=0)
    try:
        _train_one_step(learner)
    finally:
        learner.close()
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "wandb").exists()


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="unknown target"):
        from_flat(LearnerConfig, report_to=["tensorbored"])
    with pytest.raises(ConfigError, match="cannot be combined"):
        from_flat(LearnerConfig, report_to=["none", "tensorboard"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_its_package_names_the_extra(tmp_path):
    with pytest.raises(ValueError, match=r"heterorl\[report\]"):
        Reports.open(["wandb"], tmp_path, "run-1", {})


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (extra 'report')")
def test_wandb_logs_offline_under_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reports = Reports.open(["wandb"], tmp_path, "run-1", {"lr": 1e-3})
    reports.write({"kind": "train", "step": 1, "loss": 0.5, "staleness": [0, 1], "time": 1.0})
    reports.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run directory under RUN_DIR/wandb"
