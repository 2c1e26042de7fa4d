"""Faults with real processes and kill -9: samplers killed mid-stream, the learner killed at random points and
resumed. Nothing is mocked: learners and samplers are `heterorl-learner`/`heterorl-sampler` processes on loopback,
and the test's own `RecordingSampler` is a sampler loop (real engine, real client, real protocol) that writes
down every group the learner acknowledged, which is the ground truth for "no acknowledged group was lost".

`benchmarks/faults.py` runs the same faults many more times and prints the figures.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import Processes, tiny_learner_args
from safetensors.torch import load_file

from heterorl.cli import fetch_status
from heterorl.common import codec
from heterorl.common.model import resolve_model
from heterorl.common.weights import WeightsCorrupt
from heterorl.node.client import LearnerClient, RetryPolicy, Stopped, is_transient
from heterorl.node.engine import SamplingSettings, TransformersEngine
from heterorl.server.checkpoint import TRAIN_STATE_DIR, read_weights
from heterorl.server.db import read_only_query
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

FAST_RETRY = RetryPolicy(initial_s=0.1, max_s=0.5)


# ---------------------------------------------------------------------------------------------------------------
# A sampler that keeps the books


@dataclass
class Load:
    at: float
    base_version: int
    version: int
    bytes: int


class RecordingSampler:
    """heterorl-sampler's loop, run from the test in a thread, writing down every acknowledgement.

    Like the real sampler it holds unacknowledged groups in an outbox and sends them again after an outage, and
    it resyncs weights whenever the learner reports a newer version. It also resends an acknowledged group on
    purpose every `resend_every` rounds: that must be acknowledged DUPLICATE and stored once.
    """

    def __init__(self, target: str, model_dir: Path, seed: int = 0, batch: int = 2, resend_every: int = 4):
        self.target, self.model_dir, self.seed, self.batch, self.resend_every = target, model_dir, seed, batch, resend_every
        self.stop = threading.Event()
        self.client = LearnerClient(target, FAST_RETRY, stop=self.stop)
        self.sampler_id = ""
        self.acked: dict[str, int] = {}        # lease id -> status of its first acknowledgement
        self.ack_times: list[float] = []
        self.duplicate_acks = 0                # acknowledgements of groups acknowledged before
        self.refusals: list[str] = []          # non-transient refusals (none expected)
        self.loads: list[Load] = []
        self.weights_retries = 0
        self.ready = threading.Event()
        self.engine: TransformersEngine | None = None
        self._thread = threading.Thread(target=self._run, name="recording-sampler", daemon=True)

    def start(self) -> RecordingSampler:
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=60)
        self.client.close()

    def _send(self, outbox: list[pb.TrajectoryGroup], sent: list[pb.TrajectoryGroup]) -> int:
        try:
            acks, failure = self.client.submit(list(outbox)), None
        except grpc.RpcError as err:
            acks, failure = err.acks, err  # type: ignore[attr-defined]
        now = time.time()
        by_lease = {g.lease_id: g for g in outbox}
        for ack in acks:
            if ack.lease_id in self.acked:
                self.duplicate_acks += 1
                if ack.status != pb.ACK_STATUS_DUPLICATE:
                    self.refusals.append(f"lease {ack.lease_id} acknowledged ACCEPTED twice")
            else:
                self.acked[ack.lease_id] = ack.status
                self.ack_times.append(now)
                sent.append(by_lease[ack.lease_id])
        done = {a.lease_id for a in acks}
        outbox[:] = [g for g in outbox if g.lease_id not in done]
        if failure is not None:
            raise failure
        return max((a.current_version for a in acks), default=0)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        try:
            reply = self.client.register("recorder", "transformers", "cpu", self.batch, "test")
        except Stopped:
            return
        self.sampler_id, run = reply.sampler_id, reply.run
        engine = self.engine = TransformersEngine(self.model_dir, seed=self.seed)
        sampling = SamplingSettings.from_proto(run.sampling)
        latest = reply.current_version
        outbox: list[pb.TrajectoryGroup] = []
        sent: list[pb.TrajectoryGroup] = []
        rounds = 0
        self.ready.set()
        while not self.stop.is_set():
            try:
                if outbox:
                    latest = max(latest, self._send(outbox, sent))
                if engine.version == 0 or latest > engine.version:
                    got = self.client.fetch_weights(self.sampler_id, have_version=engine.version)
                    engine.load_weights(got.encoding, got.payload, got.version, got.base_version, got.weights_sha256)
                    self.loads.append(Load(time.time(), got.base_version, got.version, got.bytes_received))
                    latest = max(latest, got.version)
                leases = self.client.lease(self.sampler_id, self.batch)
                latest = max(latest, leases.current_version)
                if not leases.leases:
                    self.stop.wait(0.2)
                    continue
                groups = engine.generate([list(l.prompt_token_ids) for l in leases.leases], run.group_size, sampling)
                for lease, completions in zip(leases.leases, groups):
                    outbox.append(pb.TrajectoryGroup(
                        sampler_id=self.sampler_id, lease_id=lease.lease_id, policy_version=engine.version,
                        completions=[pb.Completion(token_ids=c.token_ids, logprobs=c.logprobs,
                                                   finish_reason=c.finish_reason) for c in completions],
                    ))
                rounds += 1
                if sent and rounds % self.resend_every == 0:
                    outbox.append(rng.choice(sent))
                latest = max(latest, self._send(outbox, sent))
            except grpc.RpcError as err:
                if not is_transient(err):
                    self.refusals.append(f"{err.code().name}: {err.details()}")
                    if outbox:
                        outbox.pop(0)
                self.stop.wait(0.2)
            except WeightsCorrupt:
                self.weights_retries += 1  # e.g. a download resumed across a restart found a different payload
            except Stopped:
                break


# ---------------------------------------------------------------------------------------------------------------
# Learner processes and what they leave on disk


def start_learner(processes: Processes, run_dir: Path, name: str, timeout: float = 120, **overrides):
    """A learner process; waits until it serves (its own learner.json, not a dead predecessor's)."""
    address = run_dir / "learner.json"
    if address.exists():
        address.unlink()
    proc = processes.start(name, "heterorl.server.main", tiny_learner_args(run_dir, **overrides))
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{proc.log_path.read_text()[-3000:]}")
        assert time.time() < deadline, f"{name} did not come up in time"
        try:
            info = json.loads(address.read_text())
            if info["pid"] == proc.pid:
                return proc, f"127.0.0.1:{info['port']}", info
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)


def lease_states(run_dir: Path) -> dict[str, str]:
    return dict(read_only_query(run_dir, "SELECT lease_id, state FROM leases"))


def committed_checkpoint(run_dir: Path) -> tuple[int, int, Path] | None:
    row = read_only_query(run_dir, "SELECT step, version, path FROM checkpoints ORDER BY step DESC LIMIT 1")
    return (row[0][0], row[0][1], run_dir / row[0][2]) if row else None


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(l) for l in lines if l.strip()) if r["kind"] == "train"]


def status(target: str, timeout: float = 60) -> pb.StatusReply:
    """The learner's status, asked again while the (loaded) machine answers slowly."""
    deadline = time.time() + timeout
    while True:
        try:
            return fetch_status(target, timeout=5)
        except grpc.RpcError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def wait_for_step(target: str, step: int, proc, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.log_path.read_text()[-3000:]
        assert time.time() < deadline, f"no step {step} in time:\n{proc.log_path.read_text()[-3000:]}"
        try:
            now = fetch_status(target, timeout=2).step
            if now >= step:
                return now
        except grpc.RpcError:
            pass
        time.sleep(0.1)


def kill_in_checkpoint_write(proc, run_dir: Path, timeout: float = 60) -> str:
    """kill -9 the learner as soon as a checkpoint write shows on disk; returns what was seen then."""
    root = run_dir / TRAIN_STATE_DIR
    before = set(os.listdir(root)) if root.exists() else set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            names = set(os.listdir(root))
        except FileNotFoundError:
            names = set()
        fresh = sorted(names - before)
        if fresh:
            proc.kill()
            return ",".join(fresh)
        time.sleep(0.0005)
    raise AssertionError("no checkpoint was written in time")


def kill_in_weight_stream(proc, target: str, sampler_id: str) -> tuple[int, int]:
    """Open a full-weights download, take its first chunk, kill -9 the learner; returns (bytes got, total)."""
    with grpc.insecure_channel(target) as channel:
        stream = pb_grpc.LearnerStub(channel).FetchWeights(pb.FetchWeightsRequest(sampler_id=sampler_id), timeout=30)
        first = next(stream)
        proc.kill()
        got = len(first.data)
        try:
            for chunk in stream:
                got += len(chunk.data)
        except grpc.RpcError:
            pass
        return got, first.total_bytes


def bf16_of(path: Path) -> dict[str, torch.Tensor]:
    """The bf16 cast of a train-state checkpoint's fp32 weights."""
    return {k: v.to(torch.bfloat16) for k, v in read_weights(path).items()}


def served_weights_equal(client: LearnerClient, sampler_id: str, version: int, engine: TransformersEngine,
                         checkpoint_weights: dict[str, torch.Tensor]) -> bool:
    """Download `version` whole and compare it, bit for bit, with the bf16 cast of the checkpoint's fp32 weights."""
    got = client.fetch_weights(sampler_id, have_version=0, want_version=version)
    tensors = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in engine.params.items()}
    codec.apply_(memoryview(got.payload), tensors)
    assert codec.digest(tensors) == got.weights_sha256
    common = [k for k in tensors if k in checkpoint_weights]
    assert len(common) >= len(tensors) - 1, (sorted(tensors), sorted(checkpoint_weights))  # tied weights named once
    return all(torch.equal(tensors[k].view(torch.int16), checkpoint_weights[k].view(torch.int16)) for k in common)


# ---------------------------------------------------------------------------------------------------------------
# Invariants every fault must keep


def check_books(run_dir: Path, recorder: RecordingSampler | None = None) -> dict:
    """Zero acknowledged groups lost, zero trained twice, and exact accounting: returns the counts."""
    states = lease_states(run_dir)
    train = train_records(run_dir)
    trained_leases = Counter(l for r in train for l in r["leases"])
    trained_prompts = Counter(p for r in train for p in r["prompts"])
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), "steps are not one history"
    assert not [l for l, n in trained_leases.items() if n > 1], "a group was trained twice"
    assert not [p for p, n in trained_prompts.items() if n > 1], "a prompt was trained twice"
    # The database and metrics.jsonl tell the same history.
    assert set(trained_leases) == {l for l, s in states.items() if s == "trained"}
    lost = []
    if recorder is not None:
        lost = [l for l in recorder.acked if states.get(l) not in ("accepted", "trained", "dropped")]
        assert not lost, f"{len(lost)} acknowledged groups are gone: {lost[:5]}"
    # Every stored group is whole (no partial group can be trained) and belongs to an accepted lease.
    groups = read_only_query(run_dir, "SELECT g.lease_id, l.state FROM groups g JOIN leases l USING (lease_id)")
    assert all(state in ("accepted", "trained", "dropped") for _, state in groups)
    assert all(r["groups"] == len(r["leases"]) for r in train)
    return {"trained": len(trained_leases), "states": Counter(states.values()), "lost": len(lost),
            "double": sum(n - 1 for n in trained_leases.values()) + sum(n - 1 for n in trained_prompts.values())}


# ---------------------------------------------------------------------------------------------------------------
# Tests


def kill_samplers(processes: Processes, target: str, count: int, rng: random.Random, tag: str = "victim") -> list[float]:
    """Start `count` samplers at once and kill -9 each at a random moment once it works (it has loaded weights,
    so it holds leases, generates and streams groups); returns how long each lived after its first load."""
    victims = [processes.sampler(f"{tag}-{i}", target, "--max-batch", "4", "--seed", str(100 + i)) for i in range(count)]
    lived = []
    for victim in victims:
        deadline = time.time() + 180
        while True:  # it has loaded weights once its heartbeat reports a version
            found = {s.name: s for s in status(target).samplers}.get(victim.log_path.stem)
            if found is not None and found.version > 0:
                break
            assert time.time() < deadline and victim.poll() is None, victim.log_path.read_text()[-2000:]
            time.sleep(0.05)
        started = time.time()
        time.sleep(rng.uniform(0.0, 1.5))
        # Then at the first moment it holds leases it has not delivered: it is generating or streaming them.
        deadline = time.time() + 60
        while True:
            found = {s.name: s for s in status(target).samplers}.get(victim.log_path.stem)
            if found is not None and found.groups_leased > found.groups_accepted:
                break
            assert time.time() < deadline, "the victim never held a lease"
            time.sleep(0.01)
        victim.kill()
        victim.wait()
        lived.append(time.time() - started)
    return lived


def run_sampler_kills(processes: Processes, run_dir: Path, count: int, seed: int) -> dict:
    """Kill -9 `count` samplers at random points under a steady one; check that their leases expired, were leased
    again and that nothing was lost or trained twice. Shared with benchmarks/faults.py."""
    learner, target, _ = start_learner(processes, run_dir, "learner", eval_size=0, lease_ttl_s=2, checkpoint_every=4)
    processes.sampler("steady", target, "--max-batch", "1", "--seed", "1")
    lived = kill_samplers(processes, target, count, random.Random(seed))
    # The steady sampler alone carries on; the victims' leases run out and are leased to it.
    step = wait_for_step(target, status(target).step + 3, learner)
    deadline = time.time() + 60
    while not read_only_query(run_dir, "SELECT 1 FROM leases WHERE state = 'released'"):
        assert time.time() < deadline, "no lease of a killed sampler expired and was leased again"
        time.sleep(0.2)
    wait_for_step(target, step + 2, learner)
    learner.terminate()
    learner.wait(timeout=120)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    books = check_books(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["groups_accepted"] == summary["groups_trained"] + summary["groups_pending"] + summary["groups_dropped_stale"]
    # Every released lease had its prompt leased again under a new id (and check_books: trained at most once).
    expired = read_only_query(run_dir, "SELECT lease_id, prompt_index FROM leases WHERE state = 'released'")
    for lease_id, prompt in expired:
        again = read_only_query(run_dir, "SELECT lease_id FROM leases WHERE prompt_index = ? AND lease_id != ?", (prompt, lease_id))
        assert again, f"the prompt of expired lease {lease_id} was never leased again"
    return {"books": books, "expired": len(expired), "lived": lived}


def test_samplers_killed_mid_stream_their_leases_expire_and_are_leased_again(processes, tmp_path):
    out = run_sampler_kills(processes, tmp_path / "run", count=2, seed=11)
    assert out["expired"] > 0 and out["books"]["lost"] == 0 and out["books"]["double"] == 0


@pytest.mark.slow
def test_many_samplers_killed_mid_stream(processes, tmp_path):
    out = run_sampler_kills(processes, tmp_path / "run", count=6, seed=12)
    assert out["expired"] > 0 and out["books"]["lost"] == 0 and out["books"]["double"] == 0


def run_learner_kills(processes: Processes, run_dir: Path, model_dir: Path, modes: list[str], seed: int,
                      report=None) -> dict:
    """Kill -9 the learner once per mode, resume it each time, then check every invariant. Shared with
    benchmarks/faults.py. Modes: "random" (some time into training), "checkpoint" (as a checkpoint is being
    written), "stream" (in the middle of a weight download: the model's anchor must span more chunks than gRPC
    buffers, see `wide_model`). The learner and every sampler run the model in `model_dir`."""
    rng = random.Random(seed)
    common = {"checkpoint_every": 2, "eval_size": 0, "lease_ttl_s": 30, "keep_versions": 64, "model": str(model_dir)}
    learner, target, info = start_learner(processes, run_dir, "learner-0", **common)
    port, run_id = info["port"], info["run_id"]
    real = processes.sampler("real", target, "--max-batch", "2", "--retry-max-s", "1", "--seed", str(seed))
    recorder = RecordingSampler(target, model_dir, seed=seed).start()
    assert recorder.ready.wait(120), "the recording sampler did not register"
    results = []
    try:
        for i, mode in enumerate(modes):
            wait_for_step(target, (status(target).step if i else 0) + 4, learner)
            accepted_real = {s.name: s.groups_accepted for s in status(target).samplers}.get("real", 0)
            if i == 0:
                deadline = time.time() + 120
                while not (ids := [s.sampler_id for s in status(target).samplers if s.name == "real"]):
                    assert time.time() < deadline and real.poll() is None, real.log_path.read_text()[-3000:]
                    time.sleep(0.2)
                (real_id,) = ids
            seen = ""
            if mode == "checkpoint":
                seen = kill_in_checkpoint_write(learner, run_dir)
            elif mode == "stream":
                got, total = kill_in_weight_stream(learner, target, recorder.sampler_id)
                seen = f"{got}/{total} bytes"
            else:
                time.sleep(rng.uniform(0.0, 1.5))
                learner.kill()
            killed_at = time.time()
            learner.wait()
            killed_step = max((r["step"] for r in train_records(run_dir)), default=0)
            ckpt = committed_checkpoint(run_dir)
            # Read now: the resumed learner soon writes a newer checkpoint and deletes this one.
            ckpt_weights = bf16_of(ckpt[2]) if ckpt else None
            pending_before = {l for l, s in lease_states(run_dir).items() if s == "accepted"}
            learner, target, info = start_learner(processes, run_dir, f"learner-{i + 1}", resume=run_dir, port=port,
                                                  **common)
            serving_s = time.time() - killed_at
            assert info["run_id"] == run_id and info["port"] == port
            records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
            resume = [r for r in records if r["kind"] == "resume"][-1]
            assert resume["step"] == (ckpt[0] if ckpt else 0) and resume["time"] > killed_at
            acked_before = len(recorder.acked)
            loads_before = len(recorder.loads)
            deadline = time.time() + 120
            while len(recorder.acked) == acked_before or len(recorder.loads) == loads_before:
                assert time.time() < deadline, learner.log_path.read_text()[-3000:]
                time.sleep(0.05)
            first_ack_s = recorder.ack_times[acked_before] - killed_at
            resync = recorder.loads[loads_before]
            # The resumed weights are the checkpoint's, bit for bit (here: the version served from them).
            exact = None
            if ckpt is not None:
                exact = served_weights_equal(recorder.client, recorder.sampler_id, resume["version"], recorder.engine,
                                             ckpt_weights)
                assert exact, f"after kill {i} ({mode}) the served weights differ from the checkpoint"
            results.append({
                "mode": mode, "step": killed_step, "seen": seen, "checkpoint_step": ckpt[0] if ckpt else 0,
                "retrained": resume["retrained_groups"], "pending": resume["pending_groups"],
                "serving_s": serving_s, "first_ack_s": first_ack_s, "resync_bytes": resync.bytes,
                "resync": f"delta v{resync.base_version}->v{resync.version}" if resync.base_version else
                          f"anchor v{resync.version}",
                "exact": exact, "pending_before": pending_before, "real_accepted_before": accepted_real,
            })
            if report is not None:
                report(results[-1])
        # The real sampler came back on its own, with the same id, and delivered again.
        deadline = time.time() + 120
        while {s.name: s.groups_accepted for s in status(target).samplers}.get("real", 0) <= \
                results[-1]["real_accepted_before"]:
            assert time.time() < deadline and real.poll() is None, real.log_path.read_text()[-3000:]
            time.sleep(0.2)
        # ... under the id it registered with first: it never had to register again.
        assert [s.sampler_id for s in status(target).samplers if s.name == "real"] == [real_id]
        # Last: kill once more, stop the samplers, resume with nothing left to train and compare the weights in
        # fp32, bit for bit, with the checkpoint it resumed from.
        learner.kill()
        learner.wait()
    finally:
        recorder.close()
        if real.poll() is None:
            real.terminate()
            real.wait(timeout=30)
    ckpt = committed_checkpoint(run_dir)
    assert ckpt is not None
    learner, _, _ = start_learner(processes, run_dir, "learner-final", resume=run_dir, port=port,
                                  **{**common, "max_steps": ckpt[0]})
    learner.wait(timeout=120)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    saved = read_weights(ckpt[2])
    final = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    common_names = [k for k in final if k in saved]
    assert common_names and all(torch.equal(final[k], saved[k]) for k in common_names), "fp32 weights differ"
    books = check_books(run_dir, recorder)
    states = lease_states(run_dir)
    # Groups pending at a kill stay pending and are trained after the resume (the newest may still wait).
    for r in results:
        kept = {l: states.get(l) for l in r["pending_before"]}
        assert set(kept.values()) <= {"trained", "accepted"}, kept
    for r in results[:-1]:
        if r["pending_before"]:
            assert any(states[l] == "trained" for l in r["pending_before"]), f"pending at {r['mode']} never trained"
    assert recorder.duplicate_acks > 0 and not recorder.refusals, recorder.refusals[:5]
    versions = [v for (v,) in read_only_query(run_dir, "SELECT version FROM versions ORDER BY version")]
    assert versions == sorted(set(versions))
    return {"kills": results, "books": books, "acked": len(recorder.acked), "duplicates": recorder.duplicate_acks}


def test_learner_killed_and_resumed_loses_nothing_and_trains_nothing_twice(processes, tmp_path, tiny_cache):
    out = run_learner_kills(processes, tmp_path / "run", resolve_model("tiny", cache=tiny_cache),
                            modes=["random", "checkpoint"], seed=5)
    assert out["books"]["lost"] == 0 and out["books"]["double"] == 0
    assert any(k["retrained"] > 0 or k["pending"] > 0 for k in out["kills"])


def wide_model(tiny_cache: Path, target: Path) -> Path:
    """The tiny model with wider layers (3.4M parameters): its anchor spans ~75 chunks, more than gRPC buffers,
    so a learner killed during a download really cuts it mid-stream."""
    from test_transfer import _wide_model_dir

    return _wide_model_dir(resolve_model("tiny", cache=tiny_cache), target)


@pytest.mark.slow
def test_learner_killed_many_times_at_every_kind_of_point(processes, tmp_path, tiny_cache):
    out = run_learner_kills(processes, tmp_path / "run", wide_model(tiny_cache, tmp_path / "wide"),
                            modes=["stream", "random", "checkpoint", "random", "stream", "checkpoint"], seed=9)
    assert out["books"]["lost"] == 0 and out["books"]["double"] == 0
    assert len(out["kills"]) == 6
    streams = [k for k in out["kills"] if k["mode"] == "stream"]
    assert any(int(k["seen"].split("/")[0]) < int(k["seen"].split("/")[1].split()[0]) for k in streams), \
        "no weight download was cut mid-stream by the kill"
