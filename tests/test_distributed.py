"""The learner on several ranks (torch.distributed, gloo, 2 CPU processes under torchrun, tiny model).

- One step on 2 ranks gives the weights, loss and gradient norm of the same step on 1 rank.
- A 2-rank learner trains with a real sampler; its checkpoint resumes on 1 rank and on 2, and a 1-rank checkpoint
  on 2, each continuing with the same weights.
- kill -9 of rank 1 mid-step, and a hung rank 1, each stop the learner within the collective timeout with a
  message that says so; `--resume` then loses no acknowledged group and trains none twice.

Run as a script (`python -m torch.distributed.run ... tests/test_distributed.py step OUT BUDGET`) it is the worker
of the first test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from heterorl.common.model import load_causal_lm, resolve_model
from heterorl.server.config import LossSection
from heterorl.server.distributed import free_port, plan_shares, rank_device
from heterorl.server.store import StoredCompletion, StoredGroup
from heterorl.server.trainer import Trainer, TrainerConfig

REPO = Path(__file__).resolve().parent.parent
G = 4
TIMEOUT_S = 15  # --collective-timeout-s of the fault tests


def synthetic_batch() -> list[StoredGroup]:
    """Five groups (odd: the ranks get 3 and 2) of uneven prompt and completion lengths, from a fixed seed."""
    gen = torch.Generator().manual_seed(7)
    groups = []
    for g in range(5):
        prompt = torch.randint(3, 90, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen).tolist()
        comps = []
        for _ in range(G):
            n = int(torch.randint(1, 9, (1,), generator=gen))
            tokens = torch.randint(3, 90, (n,), generator=gen).tolist()
            logprobs = (-0.1 - 4 * torch.rand(n, generator=gen)).tolist()
            reward = float(torch.randint(0, 5, (1,), generator=gen)) / 4
            comps.append(StoredCompletion(tokens, logprobs, 1, reward, None))
        groups.append(StoredGroup(f"L{g}", "S", g, prompt, 1, tuple(comps), 0.0))
    return groups


def make_trainer(ranks=None, micro_batch_tokens: int = 0) -> Trainer:
    """The tiny model's trainer, with AdamW's eps at 1 and lr 1: the first step is then lr * g / (|g| + 1), about
    the gradient itself. (At eps 1e-8 a first step is lr * g / (|g| + eps), which turns 1e-10 rounding
    differences of near-zero gradients into weight differences of lr size: the weights would not compare the
    gradients but their rounding.)"""
    torch.manual_seed(0)
    model = load_causal_lm(resolve_model("tiny"))
    config = TrainerConfig(lr=1.0, weight_decay=0.01, max_grad_norm=0.01, temperature=0.7,
                           loss=LossSection().loss_config(), device="cpu", compute_dtype="fp32",
                           micro_batch_tokens=micro_batch_tokens)
    trainer = Trainer(model, 0, config, ranks=ranks)
    for group in trainer.optimizer.param_groups:
        group["eps"] = 1.0
    return trainer


def worker_step(out: Path, micro_batch_tokens: int) -> int:
    """Under torchrun: one step on the synthetic batch; rank 0 saves the fp32 weights and the metrics."""
    from heterorl.server import distributed

    ranks = distributed.start("cpu", 60)
    trainer = make_trainer(ranks, micro_batch_tokens)
    if not ranks.leader:
        return distributed.follow(trainer, ranks)
    metrics = trainer.train_step(synthetic_batch())
    weights = trainer.snapshot(torch.float32)
    torch.save({"weights": weights, "metrics": metrics}, out)
    distributed.finish(ranks)
    return 0


def worker_stalled_follower(out: Path) -> int:
    """Under torchrun: rank 1 stops itself between two commands (SIGSTOP, as a hung process); rank 0 sends a
    command and writes down what happened and how long it took."""
    from heterorl.server import distributed

    ranks = distributed.start("cpu", 3)
    if ranks.leader:
        ranks.announce("hello")
    else:
        ranks.receive()
        os.kill(os.getpid(), signal.SIGSTOP)
        return 0
    time.sleep(0.5)
    started = time.monotonic()
    try:
        ranks.announce("step", list(range(1000)))
        outcome = "sent"
    except distributed.RankFailure as err:
        outcome = str(err)
    out.with_suffix(".tmp").write_text(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started}))
    out.with_suffix(".tmp").replace(out)
    os._exit(0)  # the stopped follower is killed by the test


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args]


# ---------------------------------------------------------------------------------------------------------------
# Without processes


def test_shares_are_whole_groups_balanced_and_equal_in_count():
    groups = synthetic_batch()
    shares = plan_shares(groups, 2, 0)
    assert [len(s) for s in shares] == [1, 1]
    flat = sorted(i for s in shares for mb in s for i in mb)
    assert flat == list(range(5))  # every group once, none split
    # A budget of about one group per micro-batch: the rank with fewer groups is padded with empty micro-batches.
    shares = plan_shares(groups, 2, 1)
    assert len(shares[0]) == len(shares[1]) == 3
    assert sorted(len(mb) for s in shares for mb in s) == [0, 1, 1, 1, 1, 1]
    # More ranks than groups: the idle ranks still run one (empty) micro-batch.
    assert plan_shares(groups[:1], 3, 0) == [[[0]], [[]], [[]]]


def test_rank_devices():
    assert rank_device("cpu", 1) == "cpu"
    with pytest.raises(ValueError, match="names one GPU"):
        rank_device("cuda:1", 0)
    if not torch.cuda.is_available():
        assert rank_device("auto", 1) == "cpu"
        with pytest.raises(ValueError, match="no CUDA"):
            rank_device("cuda", 0)


def test_a_checkpoint_of_the_earlier_format_loads_on_one_rank_and_is_refused_by_name_on_several(tmp_path,
                                                                                                 tiny_cache,
                                                                                                 monkeypatch):
    from safetensors.torch import save_model

    from heterorl.server import checkpoint as ckpt
    from heterorl.server.distributed import Ranks

    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    trainer = make_trainer()
    trainer.train_step(synthetic_batch())
    path = tmp_path / "step-00000001"  # what the single-process learner wrote before distributed checkpoints
    path.mkdir()
    save_model(trainer.model, str(path / "model.safetensors"))
    torch.save(trainer.optimizer.state_dict(), path / "optimizer.pt")
    torch.save(ckpt.rng_state(), path / "rng.pt")
    (path / "meta.json").write_text(json.dumps({"step": 1}))
    manifest = {f.name: {"bytes": f.stat().st_size, "crc32": ckpt._crc32(f)} for f in path.iterdir()}
    fresh = make_trainer()
    assert ckpt.read_train_state(path, manifest, fresh.model, fresh.optimizer)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), trainer.model.parameters()))
    state, weights = trainer.model.state_dict(), ckpt.read_weights(path)  # tied weights once, by either name
    assert len(weights) == len(state) - 1 and all(torch.equal(t, state[k]) for k, t in weights.items())
    two = Ranks(rank=0, world=2, device="cpu", timeout_s=60, commands=None)  # refused before anything is sent
    with pytest.raises(ckpt.CheckpointError, match="single-process format .* resume it once on one rank"):
        ckpt.read_train_state(path, manifest, fresh.model, fresh.optimizer, two)


# ---------------------------------------------------------------------------------------------------------------
# One step, 2 ranks vs 1


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0, 1], ids=["whole-batch", "one-group-micro-batches"])
def test_a_step_on_two_ranks_equals_the_step_on_one(tmp_path, tiny_cache, budget, monkeypatch):
    env = {**os.environ, "HETERORL_CACHE": str(tiny_cache)}
    out = tmp_path / "two.pt"
    done = subprocess.run(torchrun(str(Path(__file__)), "step", str(out), str(budget)), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = torch.load(out, weights_only=False)

    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    one_trainer = make_trainer()
    before = one_trainer.snapshot(torch.float32)
    one_metrics = one_trainer.train_step(synthetic_batch())
    one = one_trainer.snapshot(torch.float32)
    assert one.keys() == two["weights"].keys()
    moved = max(float((one[k] - before[k] * (1 - 0.01)).abs().max()) for k in one)  # beyond the weight decay
    diff = max(float((one[k] - two["weights"][k]).abs().max()) for k in one)
    print(f"max abs weight difference 1 vs 2 ranks (budget {budget}): {diff:.3g} (the gradient step moved "
          f"weights by up to {moved:.3g})")
    assert moved > 1e-5
    assert diff <= 1e-4 * moved
    # The loss and the global gradient norm (before clipping; clipping is active here) agree too: a gradient
    # averaged over ranks instead of summed, or clipped by a local norm, would show here (Adam's first step
    # is blind to a uniform scale).
    assert one_metrics["grad_norm"] > 0.01  # so the step was clipped
    assert two["metrics"]["grad_norm"] == pytest.approx(one_metrics["grad_norm"], rel=1e-5)
    assert two["metrics"]["loss"] == pytest.approx(one_metrics["loss"], rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Real processes: learners under torchrun, samplers


@pytest.mark.slow
def test_a_rank_hung_between_commands_does_not_hold_rank_0(tmp_path):
    """A gloo broadcast returns only once every receiver has taken it: rank 0's sending of a command to a rank
    that hangs between commands must give up within the collective timeout (3 s here), not wait for ever."""
    out = tmp_path / "outcome.json"
    proc = subprocess.Popen(torchrun(str(Path(__file__)), "stalled-follower", str(out)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not out.exists():
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode()[-3000:])
            assert time.time() < deadline, "rank 0 did not give up within 120 s"
            time.sleep(0.2)
    finally:
        for pid in rank_pids(proc).values():  # torchrun's workers live in sessions of their own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    result = json.loads(out.read_text())
    print(f"rank 0 gave up sending to a stopped rank after {result['seconds']:.1f}s: {result['outcome'][:120]}")
    assert result["outcome"].startswith("sending 'step' to the other ranks failed after"), result
    assert "--collective-timeout-s 3" in result["outcome"]
    assert 2.5 < result["seconds"] < 20


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the processes torchrun started (read from /proc: their RANK variable)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != launcher.pid:
                continue
            env = dict(item.split("=", 1) for item in Path(f"/proc/{entry}/environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry)
    return found


def start_ranks(processes, run_dir: Path, name: str, nproc_flag: bool = False, timeout: float = 240, **overrides):
    """A 2-rank learner (torchrun, or `--nproc 2`); waits until rank 0 serves. Returns (launcher, target, info)."""
    from conftest import tiny_learner_args

    address = run_dir / "learner.json"
    if address.exists():
        address.unlink()
    args = tiny_learner_args(run_dir, **{"collective_timeout_s": TIMEOUT_S, **overrides})
    if nproc_flag:
        proc = processes.start(name, "heterorl.server.main", [*args, "--nproc", "2"])
    else:
        proc = processes.start(name, "torch.distributed.run", torchrun("-m", "heterorl.server", *args)[3:])
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{proc.log_path.read_text()[-4000:]}")
        assert time.time() < deadline, f"{name} did not come up in time:\n{proc.log_path.read_text()[-3000:]}"
        try:
            info = json.loads(address.read_text())
            return proc, f"127.0.0.1:{info['port']}", info
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)


def finished(proc, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"did not finish in {timeout}s:\n{proc.log_path.read_text()[-4000:]}") from None


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if r["kind"] == "train"]


STEPS = 5


@pytest.fixture(scope="module")
def two_rank_run(tiny_cache, tmp_path_factory):
    """A 2-rank learner (started with `--nproc 2`) that trains STEPS steps of 3 groups with a real sampler."""
    from conftest import Processes

    base = tmp_path_factory.mktemp("two-ranks")
    logs = base / "logs"
    logs.mkdir()
    procs = Processes(tiny_cache, logs)
    run_dir = base / "run"
    try:
        learner, target, _ = start_ranks(procs, run_dir, "learner", nproc_flag=True, max_steps=STEPS,
                                         groups_per_step=3, checkpoint_every=2, eval_every=0)
        procs.sampler("sampler", target, "--seed", "1", "--max-batch", "2")
        assert finished(learner, 400) == 0, learner.log_path.read_text()[-4000:]
    finally:
        procs.stop_all()
    return run_dir, learner.log_path.read_text()


@pytest.mark.slow
def test_two_ranks_train_with_a_real_sampler(two_rank_run):
    from heterorl.common import codec
    from heterorl.common.weights import weight_tensors
    from heterorl.server.checkpoint import read_weights
    from heterorl.server.db import read_only_query
    from safetensors.torch import load_file

    run_dir, log = two_rank_run
    assert "2 ranks" in log and "rank 1: stopping after" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["versions_published"] == STEPS + 1
    assert summary["groups_trained"] == 3 * STEPS
    assert summary["groups_accepted"] == (summary["groups_trained"] + summary["groups_pending"]
                                          + summary["groups_dropped_stale"])
    train = train_records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    leases = [lease for r in train for lease in r["leases"]]
    assert len(leases) == len(set(leases)) == 3 * STEPS
    assert all(r["grad_norm"] > 0 and r["loss"] == r["loss"] for r in train)
    assert max(r["policy_versions"][-1] for r in train) > 1  # the sampler followed the published versions
    # The gathered weights: the exported fp32 model is the final checkpoint's, and the last published version
    # (what samplers got) hashes as the bf16 cast of those weights.
    ((path, version),) = read_only_query(run_dir, "SELECT path, version FROM checkpoints ORDER BY step DESC LIMIT 1")
    saved = read_weights(run_dir / path)
    exported = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(exported[k], saved[k]) for k in exported)
    ((digest,),) = read_only_query(run_dir, f"SELECT weights_sha256 FROM versions WHERE version = {version}")
    names = weight_tensors(load_causal_lm(resolve_model("tiny")))  # what a version holds: tied weights once
    assert codec.digest({k: saved[k].to(torch.bfloat16) for k in names}, like=digest) == digest


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_and_on_two(two_rank_run, tmp_path, processes, tiny_cache,
                                                          monkeypatch):
    """From the same 2-rank checkpoint with the same pending groups, one more step on 1 rank and on 2 ranks gives
    the same weights; the 1-rank checkpoint written then resumes on 2 ranks to the same weights exactly."""
    from test_durability import crash, submission

    from heterorl.common.config import from_flat
    from heterorl.server import loop
    from heterorl.server.checkpoint import read_weights
    from heterorl.server.config import LearnerConfig
    from heterorl.server.db import read_only_query
    from heterorl.server.learner import Learner
    from heterorl.server.resume import plan_run

    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    src, _ = two_rank_run
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(src, one)
    # Made-up log-probs below: no trust checks. The CLI resumes give the test's flags, B among them: the run's.
    # Uniform leases, room for them: the 3 leases below are granted whatever the scheduler measured before.
    quiet = {"verify_first": 0, "verify_fraction": 0.0, "eval_size": 0, "groups_per_step": 3,
             "lease_policy": "uniform", "max_inflight_groups": 100}

    def resumed(run_dir: Path) -> Learner:
        given = {"run_dir": run_dir, "resume": run_dir, "port": 0, **quiet}
        return Learner(plan_run(from_flat(LearnerConfig, **given), explicit=set(given)))

    # 2 -> 1: the weights load (restore checks them against the digest recorded for the version) and the AdamW
    # state is there; then 3 made-up groups are accepted and the learner "crashes" before training them.
    learner = resumed(one)
    assert learner.trainer.step == STEPS
    state = learner.trainer.optimizer.state_dict()["state"]
    assert state and all(int(s["step"]) == STEPS for s in state.values())
    sid = learner.register("s", "transformers", "cpu", 8).sampler_id
    leases = learner.lease(sid, 3)
    assert len(leases) == 3
    for i, lease in enumerate(leases):
        assert learner.submit(submission(sid, lease.lease_id, version=learner.version, seed=i)) is False  # stored
    pending = len(learner.pending())
    crash(learner)
    shutil.copytree(one, two)

    # One more step on 1 rank ...
    learner = resumed(one)
    learner.train_once(loop.wait_for_groups(learner, threading.Event()))
    one_weights = learner.trainer.snapshot(torch.float32)
    one_norm = train_records(one)[-1]["grad_norm"]
    written = learner.write_train_state()
    learner.close()
    assert written is not None
    # ... and the same step on 2 ranks.
    proc, _, _ = start_ranks(processes, two, "two", resume=two, max_steps=STEPS + 1, **quiet)
    assert finished(proc, 300) == 0, proc.log_path.read_text()[-4000:]
    ((path,),) = read_only_query(two, "SELECT path FROM checkpoints ORDER BY step DESC LIMIT 1")
    two_weights = read_weights(two / path)
    diff = max(float((one_weights[k] - two_weights[k]).abs().max()) for k in one_weights)
    print(f"after resuming a 2-rank checkpoint: 1 vs 2 ranks max abs weight difference {diff:.3g} "
          f"({pending} groups were pending)")
    assert diff <= 1e-6
    assert train_records(two)[-1]["grad_norm"] == pytest.approx(one_norm, rel=1e-5)
    assert train_records(two)[-1]["leases"] == train_records(one)[-1]["leases"]

    # 1 -> 2: the 1-rank checkpoint of that step resumes on 2 ranks to the same weights, bit for bit.
    shutil.rmtree(two)
    shutil.copytree(one, two)
    proc, _, _ = start_ranks(processes, two, "two-again", resume=two, max_steps=STEPS + 1, **quiet)
    assert finished(proc, 300) == 0, proc.log_path.read_text()[-4000:]
    resumed_record = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()][-1]
    assert resumed_record["kind"] == "resume" and resumed_record["step"] == STEPS + 1
    from safetensors.torch import load_file

    exported = load_file(str(two / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(exported[k], one_weights[k]) for k in exported)


@pytest.mark.slow
def test_a_dead_or_hung_rank_stops_the_learner_and_resume_loses_nothing(processes, tmp_path, tiny_cache):
    from test_faults import RecordingSampler, check_books, committed_checkpoint, status, wait_for_step

    run_dir = tmp_path / "run"
    common = {"checkpoint_every": 2, "eval_size": 0, "lease_ttl_s": 30, "keep_versions": 64}
    learner, target, info = start_ranks(processes, run_dir, "learner-0", **common)
    port = info["port"]
    recorder = RecordingSampler(target, resolve_model("tiny", cache=tiny_cache), seed=3).start()
    assert recorder.ready.wait(120), "the recording sampler did not register"
    try:
        for phase, (name, signals) in enumerate([("kill -9", [signal.SIGSTOP, signal.SIGKILL]),
                                                  ("hang", [signal.SIGSTOP])]):
            wait_for_step(target, status(target).step + 3, learner, timeout=240)
            pids = rank_pids(learner)
            assert sorted(pids) == [0, 1], pids
            # Rank 1 stops between two commands; rank 0 starts the next step and waits in its first collective
            # (the groups keep coming); then rank 1 is killed, or left hanging.
            os.kill(pids[1], signal.SIGSTOP)
            now = status(target)
            deadline = time.time() + 180
            while True:  # until the groups of the next step have arrived: rank 0 then starts it within 0.5 s
                arrived = sum(s.groups_accepted for s in now.samplers) - now.groups_trained - now.groups_dropped_stale
                if arrived >= 2:
                    break
                # A rank that hangs between steps is only noticed at the next collective, so the step must begin.
                assert time.time() < deadline, f"the groups of the next step did not arrive ({name})"
                time.sleep(0.1)
                now = status(target)
            time.sleep(1.5)
            assert status(target).step == now.step, "a step finished without rank 1"
            for sig in signals[1:]:
                os.kill(pids[1], sig)
            began = time.time()
            # Rank 0 itself gives up. It may first wait for fresh groups or drop some (a loaded machine), which is
            # no collective; the bound that matters is the failing collective's own time, read from its log line.
            while True:
                try:
                    os.kill(pids[0], 0)
                except ProcessLookupError:
                    break
                assert time.time() - began < 240, f"rank 0 still runs ({name}):\n" + \
                    learner.log_path.read_text()[-3000:]
                time.sleep(0.2)
            stopped_s = time.time() - began
            if name == "hang":
                os.kill(pids[1], signal.SIGKILL)  # the launcher would, after its grace period
            assert finished(learner, 120) != 0
            log = learner.log_path.read_text()
            # Which collective failed depends on where rank 1 was stopped (sending the step command, the step, the
            # gather that publishes it, a checkpoint write); each names itself in the one line.
            failed = re.search(r"stopping: .+ failed after ([\d.]+)s on rank 0 of 2: ", log)
            assert failed, log[-3000:]
            assert "died or did not answer within --collective-timeout-s" in log, log[-3000:]
            inside_s = float(failed.group(1))
            print(f"{name}: rank 0 stopped {stopped_s:.1f}s after the fault, {inside_s:.1f}s after its collective "
                  f"began (collective timeout {TIMEOUT_S}s)")
            assert inside_s < TIMEOUT_S + 15, "the collective outlived --collective-timeout-s"
            if name == "kill -9":
                assert inside_s < 10  # a dead peer's socket fails the collective at once
            check_books(run_dir, recorder)
            # After the last fault, train 4 steps past the checkpoint and stop, so the books are final.
            end = {"max_steps": committed_checkpoint(run_dir)[0] + 4} if phase == 1 else {}
            learner, target, _ = start_ranks(processes, run_dir, f"learner-{phase + 1}", resume=run_dir, port=port,
                                             **common, **end)
        assert finished(learner, 300) == 0, learner.log_path.read_text()[-3000:]
    finally:
        recorder.close()
    books = check_books(run_dir, recorder)
    assert books["lost"] == 0 and books["double"] == 0
    assert len(recorder.acked) > 0 and books["trained"] == 2 * end["max_steps"]


if __name__ == "__main__":
    if sys.argv[1] == "step":
        sys.exit(worker_step(Path(sys.argv[2]), int(sys.argv[3])))
    if sys.argv[1] == "stalled-follower":
        sys.exit(worker_stalled_follower(Path(sys.argv[2])))
    raise SystemExit(f"unknown worker {sys.argv[1]!r}")
