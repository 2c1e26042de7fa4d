"""Durable run state, in process: acks follow commits, a resume rebuilds the run exactly, and every crash window
between a checkpoint's files and its database record resolves to one consistent checkpoint.

The learner here is real (tiny model, real sqlite file, real checkpoint files); a "crash" is the learner object
abandoned with only what it had committed, which is what kill -9 leaves (tests/test_faults.py does the real
kill -9 on processes).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from heterorl.common import codec
from heterorl.common.config import from_flat
from heterorl.server import checkpoint as ckpt
from heterorl.server import loop
from heterorl.common.contract import Reason
from heterorl.server.config import LearnerConfig
from heterorl.server.errors import Refused
from heterorl.server.db import DB_NAME, DurabilityError, RunDB, read_only_query
from heterorl.server.learner import Learner, Submission
from heterorl.server.service import build_server
from heterorl.server.store import (
    StoredCompletion,
    StoredGroup,
    decode_group,
    encode_group,
)
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

G = 4
B = 2


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))


def settings_for(run_dir: Path, **overrides) -> dict:
    base = {"port": 0, "run_dir": run_dir, "model": "tiny", "reward": "digit_fraction", "group_size": G, "groups_per_step": B,
                "max_new_tokens": 8, "eval_size": 0, "chunk_bytes": 65536, "lease_ttl_s": 60, "lr": 1e-3, "threads": 1,
                "max_inflight_groups": 64,
                # These tests submit made-up log-probs; the log-prob check (tests/test_trust.py) would hold them aside.
                "verify_first": 0, "verify_fraction": 0.0}
    return {**base, **overrides}


def new_learner(run_dir: Path, **overrides) -> Learner:
    return Learner(from_flat(LearnerConfig, **settings_for(run_dir, **overrides)))


def resumed(run_dir: Path, **overrides) -> Learner:
    return Learner(from_flat(LearnerConfig, **settings_for(run_dir, resume=run_dir, **overrides)))


def crash(learner: Learner) -> None:
    """What kill -9 leaves: the committed database, nothing else (no sampler snapshot, no final checkpoint)."""
    learner.db.close()


def submission(sampler_id: str, lease_id: str, version: int = 1, seed: int = 0) -> Submission:
    comps = [([5 + (seed + i) % 7, 6, 7], [-1.0, -0.5, -2.25 - i], 2, None) for i in range(G)]
    return Submission(sampler_id, lease_id, version, comps)


def train_steps(learner: Learner, n: int) -> None:
    stop = threading.Event()
    for _ in range(n):
        learner.train_once(loop.wait_for_groups(learner, stop))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# The stored form of a group


completion = st.builds(
    StoredCompletion,
    token_ids=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=40),
    logprobs=st.just([]),
    finish_reason=st.sampled_from([1, 2]),
    reward=st.floats(allow_nan=False),
    sampler_reward=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(completion, min_size=1, max_size=16), st.lists(st.integers(0, 2**32 - 1), max_size=64),
       st.data())
def test_group_bytes_round_trip_exactly(completions, prompt, data):
    # Log-probs arrive as float32 on the wire: any float32 value must come back bit for bit.
    float32 = st.floats(width=32, allow_nan=False, max_value=0.0)
    comps = tuple(
        StoredCompletion(c.token_ids, data.draw(st.lists(float32, min_size=len(c.token_ids), max_size=len(c.token_ids))),
                         c.finish_reason, c.reward, c.sampler_reward)
        for c in completions
    )
    group = StoredGroup("L1-x", "S-y", 7, prompt, 3, comps, 1.5)
    blob = encode_group(group)
    back = decode_group(blob, lease_id="L1-x", sampler_id="S-y", prompt_index=7, policy_version=3, accepted_at=1.5)
    assert back == group
    for cut in (0, 5, len(blob) - 1):
        with pytest.raises(ValueError):
            decode_group(blob[:cut], lease_id="L1-x", sampler_id="S-y", prompt_index=7, policy_version=3,
                         accepted_at=1.5)
    with pytest.raises(ValueError):
        decode_group(blob + b"\0", lease_id="L1-x", sampler_id="S-y", prompt_index=7, policy_version=3, accepted_at=1.5)


# ---------------------------------------------------------------------------------------------------------------
# Acknowledgement follows commit


def test_ack_means_committed_and_a_resubmission_is_stored_once(tmp_path):
    run_dir = tmp_path / "run"
    learner = new_learner(run_dir)
    server, port = build_server(learner, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.LearnerStub(channel)
        sid = stub.Register(pb.RegisterRequest(name="t", engine="transformers", device="cpu", max_batch=4)).sampler_id
        assert read_only_query(run_dir, "SELECT sampler_id FROM samplers") == [(sid,)]  # known before its id is handed out
        leases = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=3)).leases
        stored = read_only_query(run_dir, "SELECT lease_id, state FROM leases")
        assert sorted(stored) == sorted((l.lease_id, "outstanding") for l in leases)  # committed before the reply
        comps = [pb.Completion(token_ids=[5, 6], logprobs=[-1.0, -0.5], finish_reason=pb.FINISH_REASON_LENGTH)
                 for _ in range(G)]
        groups = [pb.TrajectoryGroup(sampler_id=sid, lease_id=l.lease_id, policy_version=1, completions=comps)
                  for l in leases]
        for ack in stub.SubmitTrajectories(iter(groups)):
            assert ack.status == pb.ACK_STATUS_ACCEPTED
            # At the moment the ack arrives, another process already sees the group and its lease accepted.
            assert read_only_query(run_dir, "SELECT COUNT(*) FROM groups WHERE lease_id = ?", (ack.lease_id,)) == [(1,)]
            assert read_only_query(run_dir, "SELECT state FROM leases WHERE lease_id = ?", (ack.lease_id,)) == [("accepted",)]
        again = list(stub.SubmitTrajectories(iter(groups[:2] + groups[:1])))
        assert [a.status for a in again] == [pb.ACK_STATUS_DUPLICATE] * 3
        assert read_only_query(run_dir, "SELECT COUNT(*) FROM groups") == [(3,)]
        assert len(learner.pending()) == 3
    finally:
        channel.close()
        server.stop(0)
        learner.close()


def test_concurrent_changes_share_commits(tmp_path):
    db = RunDB.create(tmp_path / DB_NAME, "r", {}, "full")
    tickets: list = []
    lock = threading.Lock()

    def writer(n):
        for i in range(50):
            t = db.record_version(n * 1000 + i + 1, 0, "x")
            with lock:
                tickets.append(t)
            t.wait()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(t.committed for t in tickets)
    assert db.query("SELECT COUNT(*) FROM versions") == [(400,)]
    assert db.commits < 400, "every change paid its own commit: no group commit happened"
    db.close()


def test_a_failed_database_refuses_with_unavailable_and_stops_training(tmp_path):
    learner = new_learner(tmp_path / "run")
    record = learner.register("s", "transformers", "cpu", 4)
    (lease,) = learner.lease(record.sampler_id, 1)
    learner.db.close()  # from here on nothing can be committed
    with pytest.raises(Refused) as info:
        learner.submit(submission(record.sampler_id, lease.lease_id))
    # transient: the sampler keeps the group and retries
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.LEARNER_STOPPING)
    with pytest.raises(DurabilityError):
        learner.publish()


# ---------------------------------------------------------------------------------------------------------------
# Resume


def build_history(run_dir: Path) -> dict:
    """A run with: 2 steps covered by a checkpoint, 1 step after it, 2 accepted-untrained groups, 1 outstanding
    lease; then a crash. Returns what the test needs to know about it."""
    learner = new_learner(run_dir, checkpoint_every=2)
    sid = learner.register("s", "transformers", "cpu", 16).sampler_id
    leases = learner.lease(sid, 9)
    for i, lease in enumerate(leases[:8]):
        assert learner.submit(submission(sid, lease.lease_id, seed=i)) is False
    train_steps(learner, 2)
    learner.metrics.write({"kind": "eval", "step": 2, "version": learner.version, "accuracy": 0.25})
    learner.write_train_state()
    ckpt_weights = {k: v.clone() for k, v in learner.trainer.model.state_dict().items()}
    ckpt_opt = learner.trainer.optimizer.state_dict()
    ckpt_opt = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in ckpt_opt["state"].items()}
    train_steps(learner, 1)  # after the checkpoint: its training dies with the crash
    trained_after = set(json.loads(json.dumps(metrics(run_dir)[-1]["leases"])))
    versions_seen = learner.versions.held()
    crash(learner)
    return {
        "sampler_id": sid, "leases": leases, "weights": ckpt_weights, "optimizer": ckpt_opt,
        "trained_after": trained_after, "newest_version": max(versions_seen), "lease_ids": [l.lease_id for l in leases],
    }


def test_resume_continues_the_same_run_exactly(tmp_path):
    run_dir = tmp_path / "run"
    h = build_history(run_dir)
    run_id = read_only_query(run_dir, "SELECT value FROM run WHERE key = 'run_id'")[0][0]
    learner = resumed(run_dir)
    try:
        assert learner.run_id == run_id and learner.trainer.step == 2
        # Weights and optimizer state: bit for bit those of the checkpoint.
        state = learner.trainer.model.state_dict()
        for name, tensor in h["weights"].items():
            assert torch.equal(state[name], tensor), name
        opt = learner.trainer.optimizer.state_dict()["state"]
        for index, tensors in h["optimizer"].items():
            for name, tensor in tensors.items():
                assert torch.equal(opt[index][name], tensor), (index, name)
        # Versions: the checkpoint's (3) is held, and its weights are published again under a number never used.
        assert learner.versions.held() == [3, h["newest_version"] + 1]
        assert learner.versions.weights_sha256(3) == learner.versions.weights_sha256(h["newest_version"] + 1)
        assert codec.digest(learner.trainer.snapshot()) == learner.versions.weights_sha256(3)
        numbers = [v for (v,) in read_only_query(run_dir, "SELECT version FROM versions ORDER BY version")]
        assert numbers == list(range(1, h["newest_version"] + 2))
        # Pending: the groups trained after the checkpoint first, then the ones never trained, in order.
        pending = [g.lease_id for g in learner.pending()]
        assert pending[:2] == [i for i in h["lease_ids"][4:6]] and set(pending[:2]) == h["trained_after"]
        assert pending[2:] == h["lease_ids"][6:8]
        counts = learner.leases.counts()
        assert counts == {"outstanding": 1, "accepted": 4, "trained": 4, "dropped": 0, "expired": 0, "released": 0}
        assert learner.leases.in_memory().live == 5  # finished leases stay in the database only
        # The sampler is still known, its outstanding lease still good, and a resent group is a duplicate.
        sid = h["sampler_id"]
        (view,) = learner.status().samplers
        assert (view.sampler_id, view.groups_leased, view.groups_accepted) == (sid, 9, 8)
        assert learner.submit(submission(sid, h["lease_ids"][0])) is True
        assert learner.submit(submission(sid, h["lease_ids"][7])) is True
        assert learner.submit(submission(sid, h["lease_ids"][8], version=h["newest_version"])) is False
        # The prompt stream goes on after the last prompt ever leased.
        (fresh,) = learner.lease(sid, 1)
        assert fresh.prompt_index == max(l.prompt_index for l in h["leases"]) + 1
        # metrics.jsonl is cut back to the checkpoint; the cut step is kept aside; a resume record follows.
        records = metrics(run_dir)
        assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
        assert records[-1]["kind"] == "resume" and records[-1]["retrained_groups"] == 2
        cut = [json.loads(l) for l in (run_dir / "metrics.rolledback.jsonl").read_text().splitlines()]
        assert [r["step"] for r in cut if r["kind"] == "train"] == [3]
        assert learner.stats.eval_history == [(2, 0.25)]
        # Training on: each group is trained once in the surviving history.
        train_steps(learner, 2)
        trained = [l for r in metrics(run_dir) if r["kind"] == "train" for l in r["leases"]]
        assert len(trained) == len(set(trained)) == 8
    finally:
        learner.close()


def test_a_crash_before_any_checkpoint_resumes_from_the_starting_weights(tmp_path):
    run_dir = tmp_path / "run"
    learner = new_learner(run_dir, checkpoint_every=0)
    start = {k: v.clone() for k, v in learner.trainer.model.state_dict().items()}
    sid = learner.register("s", "transformers", "cpu", 8).sampler_id
    for i, lease in enumerate(learner.lease(sid, 4)):
        learner.submit(submission(sid, lease.lease_id, seed=i))
    train_steps(learner, 2)
    crash(learner)
    again = resumed(run_dir)
    try:
        assert again.trainer.step == 0 and len(again.pending()) == 4 and again.versions.held() == [1, 4]
        state = again.trainer.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in start.items())
        assert not (run_dir / "metrics.jsonl").read_text().count('"kind": "train"')
    finally:
        again.close()


def test_unfinished_and_unrecorded_checkpoints_are_ignored_and_cleared(tmp_path):
    run_dir = tmp_path / "run"
    learner = new_learner(run_dir)
    sid = learner.register("s", "transformers", "cpu", 8).sampler_id
    for i, lease in enumerate(learner.lease(sid, 4)):
        learner.submit(submission(sid, lease.lease_id, seed=i))
    train_steps(learner, 1)
    learner.write_train_state()  # recorded: step 1
    weights = {k: v.clone() for k, v in learner.trainer.model.state_dict().items()}
    train_steps(learner, 1)
    root = run_dir / ckpt.TRAIN_STATE_DIR
    # Crash inside the next checkpoint write: files written and renamed, but the database never heard of it ...
    ckpt.write_train_state(root, 2, learner.trainer.model, learner.trainer.optimizer, {})
    # ... and an older crash that left a half-written directory.
    (root / "step-00000003.tmp").mkdir()
    (root / "step-00000003.tmp" / "model.safetensors").write_bytes(b"half")
    crash(learner)
    again = resumed(run_dir)
    try:
        assert again.trainer.step == 1
        state = again.trainer.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())
        assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
        assert len(again.pending()) == 2  # step 2's groups are pending again
    finally:
        again.close()


def test_a_damaged_checkpoint_is_refused_not_loaded(tmp_path):
    run_dir = tmp_path / "run"
    learner = new_learner(run_dir)
    sid = learner.register("s", "transformers", "cpu", 8).sampler_id
    for i, lease in enumerate(learner.lease(sid, 2)):
        learner.submit(submission(sid, lease.lease_id, seed=i))
    train_steps(learner, 1)
    path = learner.write_train_state()
    crash(learner)
    weights = next((path / ckpt.DCP_DIR).glob("*.distcp"))  # a data file of the distributed checkpoint
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        resumed(run_dir)


def test_sigterm_style_stop_leaves_a_recorded_checkpoint_of_the_last_step(tmp_path):
    run_dir = tmp_path / "run"
    learner = new_learner(run_dir, checkpoint_every=0)
    sid = learner.register("s", "transformers", "cpu", 8).sampler_id
    stop = threading.Event()
    runner = threading.Thread(target=learner.run, args=(stop,))
    runner.start()
    for i, lease in enumerate(learner.lease(sid, 6)):
        learner.submit(submission(sid, lease.lease_id, seed=i))
    deadline = time.time() + 60
    while learner.trainer.step < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    stop.set()  # what the SIGTERM handler does
    runner.join(timeout=60)
    assert not runner.is_alive()
    learner.close()
    ((step, path),) = read_only_query(run_dir, "SELECT step, path FROM checkpoints")
    assert step == 3 and (run_dir / path / ckpt.DCP_DIR / ".metadata").exists()
    assert (run_dir / "checkpoint" / "model.safetensors").exists()  # the Hugging Face directory stays
    final = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    saved = ckpt.read_weights(run_dir / path)
    assert all(torch.equal(final[k], saved[k]) for k in final if k in saved)
    # The groups of trained steps left the database with that checkpoint; the leases stay as the record.
    assert read_only_query(run_dir, "SELECT COUNT(*) FROM groups") == [(0,)]
    assert read_only_query(run_dir, "SELECT COUNT(*) FROM leases WHERE state = 'trained'") == [(6,)]


# ---------------------------------------------------------------------------------------------------------------
# Directories and settings


def test_run_directories_are_never_mixed_up(tmp_path):
    run_dir = tmp_path / "run"
    new_learner(run_dir).close()
    with pytest.raises(ValueError, match="--resume"):
        new_learner(run_dir)
    with pytest.raises(ValueError, match="no run to resume"):
        resumed(tmp_path / "empty")


def test_resume_settings_keep_what_defines_the_run(tmp_path):
    from heterorl.server.main import parse_config

    run_dir = tmp_path / "run"
    learner = new_learner(run_dir, lr=2e-3)
    learner.close()
    (run_dir / "learner.json").write_text(json.dumps({"port": 51234}))
    config = parse_config(["--resume", str(run_dir), "--lr", "1e-4", "--max-steps", "7"])
    assert config.run.run_dir == run_dir and config.run.model == "tiny" and config.train.group_size == G
    assert config.train.lr == 1e-4 and config.run.max_steps == 7  # may change
    assert config.serve.port == 51234  # the address samplers know
    assert parse_config(["--resume", str(run_dir), "--port", "0"]).serve.port == 0
    for flag, value in (("--group-size", "8"), ("--model", "smollm2-135m"), ("--seed", "3")):
        with pytest.raises(SystemExit):
            parse_config(["--resume", str(run_dir), flag, value])
    with pytest.raises(SystemExit):
        parse_config(["--resume", str(tmp_path / "nothing")])
    # A learner built directly from a config is held to the same rule.
    with pytest.raises(ValueError, match="group_size"):
        Learner(from_flat(LearnerConfig, **{**settings_for(run_dir, resume=run_dir), "group_size": 8}))


def test_resume_existing_continues_a_run_and_starts_a_fresh_one(tmp_path):
    from heterorl.server.main import parse_config

    run_dir = tmp_path / "run"
    fresh = parse_config(["--run-dir", str(run_dir), "--model", "tiny", "--resume-existing"])
    assert fresh.durability.resume is None  # nothing there yet: a new run
    new_learner(run_dir).close()
    again = parse_config(["--run-dir", str(run_dir), "--model", "tiny", "--resume-existing"])
    assert again.durability.resume == run_dir and again.train.group_size == G  # the stored run's settings come back


def test_a_database_of_an_older_schema_is_refused_by_name(tmp_path):
    import sqlite3

    from heterorl.server.resume import plan_run

    run_dir = tmp_path / "run"
    new_learner(run_dir).close()
    conn = sqlite3.connect(run_dir / DB_NAME)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with pytest.raises(ValueError, match="older heterorl"):
        plan_run(from_flat(LearnerConfig, **settings_for(run_dir, resume=run_dir)))
