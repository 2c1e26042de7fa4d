"""The whole ring with real processes on loopback: a learner and two samplers train the tiny model."""

from __future__ import annotations

import json
import time
from collections import Counter

import grpc
import pytest
from safetensors.torch import load_file

from heterorl.cli import fetch_status
from heterorl.common.model import resolve_model

STEPS = 12


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_learner_and_two_samplers_train_end_to_end(processes, tmp_path, tiny_cache):
    run_dir = tmp_path / "run"
    learner, target = processes.learner(run_dir, max_steps=STEPS)
    processes.sampler("sampler-a", target, "--seed", "1", "--max-batch", "1")
    processes.sampler("sampler-b", target, "--seed", "2", "--max-batch", "1")

    deadline = time.time() + 300
    while learner.poll() is None:
        assert time.time() < deadline, f"learner did not finish:\n{learner.log_path.read_text()[-3000:]}"
        try:
            status = fetch_status(target, timeout=2)
        except grpc.RpcError:
            time.sleep(0.2)
            continue
        # Exactly-once accounting holds at every moment, not just at the end.
        assert status.groups_trained + status.groups_pending + status.groups_dropped_stale <= sum(
            s.groups_accepted for s in status.samplers
        )
        time.sleep(0.3)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["versions_published"] == STEPS + 1  # version 1 is the starting point
    # Every accepted group is accounted for exactly once: trained, pending, or dropped.
    assert summary["groups_accepted"] == (
        summary["groups_trained"] + summary["groups_pending"] + summary["groups_dropped_stale"]
    )
    assert summary["groups_trained"] == 2 * STEPS

    records = _read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["version"] for r in train] == list(range(2, STEPS + 2))
    assert len(evals) >= 2 and evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    leases = Counter(lease for r in train for lease in r["leases"])
    prompts = Counter(p for r in train for p in r["prompts"])
    assert max(leases.values()) == 1, "a lease was trained twice"
    assert max(prompts.values()) == 1, "a prompt was trained twice"
    for r in train:
        assert all(s >= 0 for s in r["staleness"])
        for key in ("loss", "is_weight_mean", "is_weight_var", "is_weight_max", "clip_frac_low",
                    "clip_frac_high", "kl_k3", "grad_norm"):
            assert r[key] == r[key], f"{key} is NaN at step {r['step']}"
    assert any(r["grad_norm"] > 0 for r in train), "no step moved the weights"
    # Both samplers contributed, and each moved past the first version while the run went on.
    by_sampler: dict[str, list[int]] = {}
    for r in train:
        for sampler_id, version in zip(r["samplers"], r["policy_versions"], strict=True):
            by_sampler.setdefault(sampler_id, []).append(version)
    assert len(by_sampler) == 2, f"groups came from {sorted(by_sampler)}"
    for sampler_id, versions in by_sampler.items():
        assert max(versions) > 1, f"{sampler_id} only ever generated with version 1"
    # Late steps train on fresh groups: samplers keep up with the newest version.
    assert min(r["staleness_max"] for r in train[-3:]) <= 4  # flow control keeps about 3 steps in flight

    # The saved checkpoint differs from the starting weights.
    start = load_file(str(resolve_model("tiny", cache=tiny_cache) / "model.safetensors"))
    end = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    changed = [k for k in start if k in end and not (start[k].float() == end[k].float()).all()]
    assert changed, "training did not change any weight"


@pytest.mark.parametrize("outage_s", [3.0])
def test_sampler_waits_for_a_late_learner(processes, tmp_path, outage_s):
    """A sampler started before its learner keeps retrying, then registers and delivers groups."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.settimeout(120)
        port = s.getsockname()[1]
        target = f"127.0.0.1:{port}"
        sampler = processes.sampler("early", target, "--max-groups", "2", "--retry-max-s", "1")
        conn, _ = s.accept()  # the sampler is trying to reach its learner; nothing here speaks gRPC
        conn.close()
    time.sleep(outage_s)
    assert sampler.poll() is None, "the sampler gave up on a learner that was not up yet"
    run_dir = tmp_path / "late"
    learner, _ = processes.learner(run_dir, port=port, max_steps=0, eval_size=0)
    sampler.wait(timeout=180)
    assert sampler.returncode == 0, sampler.log_path.read_text()[-3000:]
    status = fetch_status(target)
    assert [(s.name, s.groups_accepted >= 2) for s in status.samplers] == [("early", True)]


def test_sampler_survives_the_learner_going_away(processes, tmp_path):
    """Kill -9 the learner under a working sampler; a new learner on the same address gets its groups."""
    first_dir = tmp_path / "first"
    learner, target = processes.learner(first_dir, max_steps=0, eval_size=0)
    port = int(target.rsplit(":", 1)[1])
    sampler = processes.sampler("survivor", target, "--retry-max-s", "1")
    deadline = time.time() + 120
    while True:
        first = fetch_status(target)
        if any(s.groups_accepted for s in first.samplers):
            break
        assert time.time() < deadline, sampler.log_path.read_text()[-2000:]
        time.sleep(0.3)
    learner.kill()
    learner.wait()
    time.sleep(2.0)  # the sampler now sees UNAVAILABLE and keeps retrying
    assert sampler.poll() is None, "the sampler died with its learner"
    second, _ = processes.learner(tmp_path / "second", port=port, max_steps=0, eval_size=0)
    deadline = time.time() + 120
    while True:
        status = fetch_status(target)
        if any(s.groups_accepted for s in status.samplers):
            break
        assert time.time() < deadline, sampler.log_path.read_text()[-3000:]
        time.sleep(0.3)
    assert status.run_id != first.run_id == json.loads((first_dir / "learner.json").read_text())["run_id"]
    # The same sampler process came back: it called the new learner with its old id, was refused with the reason
    # UNKNOWN_SAMPLER (counted by the new learner), registered again and delivered under a new id.
    assert sampler.poll() is None
    assert status.rejections["unknown_sampler"] >= 1
    [old_id] = [s.sampler_id for s in first.samplers]
    assert [s.name for s in status.samplers] == ["survivor"] and status.samplers[0].sampler_id != old_id


@pytest.mark.slow
def test_default_model_trains_over_grpc(processes, tmp_path, monkeypatch):
    """The real default model (SmolLM2-135M) through the same ring: three steps, deltas after the anchor."""
    from heterorl.common.model import cache_root

    # The user's cache, which `make test` prepares (prepare-model), whatever an earlier module left in the
    # environment: converting the default model again into the tiny cache cost 20 s.
    monkeypatch.delenv("HETERORL_CACHE", raising=False)
    processes.env["HETERORL_CACHE"] = str(cache_root())
    run_dir = tmp_path / "real"
    learner, target = processes.learner(
        run_dir, timeout=300, model="smollm2-135m", reward="last_number", max_steps=3, group_size=4,
        groups_per_step=2, max_new_tokens=8, eval_size=8, eval_every=0, threads=2, lr=2e-6,
    )
    sampler = processes.sampler("real", target, "--max-batch", "2")
    learner.wait(timeout=900)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["groups_trained"] == 6
    log = sampler.log_path.read_text()
    assert "(anchor," in log and "(delta from v" in log, log[-2000:]
