"""The learner's state and its training loop: prompts out, groups in, one optimizer step per B groups.

`Learner` holds everything a run owns (model and optimizer, leases, accepted groups, published versions,
the sampler registry) and is driven from two sides: gRPC handlers call `register`, `lease`, `submit`, ...
under one lock, while `run` trains in the main thread whenever B groups are waiting. Training never waits for
a particular sampler; it waits only for enough groups from anyone.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from heterorl.common import model as model_lib
from heterorl.common.config import to_dict
from heterorl.common.tasks import Problem, get_reward, make_task
from heterorl.server.config import LearnerConfig
from heterorl.server.leases import Lease, LeaseBook, LeaseError, LeaseState
from heterorl.server.store import StoredCompletion, StoredGroup, TrajectoryStore
from heterorl.server.trainer import Trainer, TrainerConfig
from heterorl.server.versions import VersionStore

SAMPLER_ALIVE_S = 60.0
MODEL_FILE_LIMIT = 32 << 20  # architecture/tokenizer files shipped to samplers; weights never go this way
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


@dataclass
class SamplerRecord:
    sampler_id: str
    name: str
    engine: str
    device: str
    max_batch: int
    registered_at: float
    last_seen: float
    version: int = 0
    groups_leased: int = 0
    groups_accepted: int = 0
    groups_rejected: int = 0
    reward_disagreements: int = 0


@dataclass(frozen=True)
class Submission:
    """A validated TrajectoryGroup, in the learner's own types."""

    sampler_id: str
    lease_id: str
    policy_version: int
    completions: list[tuple[list[int], list[float], int, float | None]]  # tokens, logprobs, finish, reward


@dataclass
class MetricsLog:
    """Append-only JSON lines; each line is flushed so a crash loses at most the line being written."""

    path: Path
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


class Learner:
    def __init__(self, config: LearnerConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.run_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        config.run_dir.mkdir(parents=True, exist_ok=True)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)

        self.model_dir = model_lib.resolve_model(config.model)
        self.tokenizer = model_lib.load_tokenizer(self.model_dir)
        model = model_lib.load_causal_lm(self.model_dir, dtype=torch.float32)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.pad_id = self._pad_id()
        self.model_files = self._read_model_files()

        self.task = make_task(config.task, **{"seed": config.seed, **config.task_kwargs()})
        self.reward_name = config.reward or self.task.default_reward
        self.reward_fn = get_reward(self.reward_name)
        held_out = self.task.eval_problems()
        if config.eval_size > len(held_out):
            log(f"eval_size {config.eval_size} > {len(held_out)} held-out problems of the task; using all of them")
        self.eval_problems = held_out[: config.eval_size]
        # Samplers may rebuild the task to score their own completions only if its questions verify themselves.
        probe = self.task.train_problem(0).question
        self.sampler_task_options = (
            json.dumps(self.task.options()) if self.task.local_reference(probe) is not None else ""
        )

        self.trainer = Trainer(
            model,
            pad_id=self.pad_id,
            config=TrainerConfig(
                lr=config.lr,
                weight_decay=config.weight_decay,
                max_grad_norm=config.max_grad_norm,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                loss=config.loss_config(),
            ),
        )
        self.leases = LeaseBook(problem_at=self.task.train_problem, encode=self.encode, ttl_s=config.lease_ttl_s)
        self.store = TrajectoryStore()
        self.versions = VersionStore(keep=config.keep_versions, chunk_bytes=config.chunk_bytes)
        self.samplers: dict[str, SamplerRecord] = {}
        self.lock = threading.Lock()
        self.groups_ready = threading.Condition(self.lock)
        self.metrics = MetricsLog(config.run_dir / "metrics.jsonl")
        self.staleness_seen: list[int] = []
        self.last_reward_mean = float("nan")
        self.eval_history: list[tuple[int, float]] = []
        self.publish()  # version 1: the weights the run starts from

    # ---- helpers -------------------------------------------------------------------------------------------

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def _read_model_files(self) -> dict[str, bytes]:
        files = {}
        for path in sorted(self.model_dir.iterdir()):
            if not path.is_file() or path.suffix in WEIGHT_SUFFIXES or path.name.startswith("."):
                continue
            if path.stat().st_size > MODEL_FILE_LIMIT:
                continue
            files[path.name] = path.read_bytes()
        if "config.json" not in files:
            raise ValueError(f"model directory {self.model_dir} has no config.json")
        return files

    def encode(self, problem: Problem) -> list[int]:
        return model_lib.encode_prompt(self.tokenizer, problem.question)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def version(self) -> int:
        return self.versions.newest

    def publish(self) -> None:
        """Make the trainer's current weights the next version (and pre-encode the delta samplers will want)."""
        version = self.versions.newest + 1
        started = time.perf_counter()
        delta = self.versions.publish(version, self.trainer.snapshot())
        size = f", delta from v{version - 1} {len(delta.data) / 2**20:.1f} MiB" if delta else ""
        self.log(f"published version {version} in {time.perf_counter() - started:.2f}s{size}")

    # ---- what the gRPC service calls (each takes the lock) -------------------------------------------------

    def register(self, name: str, engine: str, device: str, max_batch: int) -> SamplerRecord:
        now = time.time()
        record = SamplerRecord(
            sampler_id=f"S-{uuid.uuid4().hex[:16]}",
            name=name,
            engine=engine,
            device=device,
            max_batch=max_batch,
            registered_at=now,
            last_seen=now,
        )
        with self.lock:
            self.samplers[record.sampler_id] = record
        self.log(f"sampler {record.sampler_id} registered: {name} ({engine} on {device})")
        return record

    def sampler(self, sampler_id: str) -> SamplerRecord:
        """The record of a registered sampler, touched as seen now; LeaseError NOT_FOUND otherwise."""
        with self.lock:
            record = self.samplers.get(sampler_id)
            if record is None:
                raise LeaseError("NOT_FOUND", f"unknown sampler id {sampler_id!r}: Register first")
            record.last_seen = time.time()
            return record

    def lease(self, sampler_id: str, max_groups: int) -> list[Lease]:
        """Up to max_groups new leases, fewer when enough work is already in flight (flow control)."""
        record = self.sampler(sampler_id)
        with self.lock:
            now = time.time()
            self.leases.expire_overdue(now)
            room = self.config.inflight_limit - self.leases.outstanding() - len(self.store)
            n = max(0, min(max_groups, record.max_batch, room))
            leases = self.leases.issue(sampler_id, n, now) if n else []
            record.groups_leased += len(leases)
            return leases

    def submit(self, submission: Submission) -> bool:
        """Store a validated group; returns True if it was a duplicate of an acknowledged one."""
        record = self.sampler(submission.sampler_id)
        with self.lock:
            lease, duplicate = self.leases.check_submittable(submission.lease_id, submission.sampler_id)
            if duplicate:
                return True
            completions = []
            for tokens, logprobs, finish, claimed in submission.completions:
                reward = float(self.reward_fn(self.decode(tokens), lease.problem.answer))
                if claimed is not None and abs(claimed - reward) > 1e-6:
                    record.reward_disagreements += 1
                completions.append(StoredCompletion(tokens, logprobs, finish, reward, claimed))
            self.store.add(
                StoredGroup(
                    lease_id=lease.lease_id,
                    sampler_id=submission.sampler_id,
                    prompt_index=lease.prompt_index,
                    prompt_token_ids=lease.prompt_token_ids,
                    policy_version=submission.policy_version,
                    completions=tuple(completions),
                    accepted_at=time.time(),
                )
            )
            self.leases.accept(lease)
            record.groups_accepted += 1
            record.version = max(record.version, submission.policy_version)
            self.groups_ready.notify_all()
            return False

    def count_rejection(self, sampler_id: str) -> None:
        with self.lock:
            record = self.samplers.get(sampler_id)
            if record is not None:
                record.groups_rejected += 1

    def heartbeat(self, sampler_id: str, version: int) -> None:
        record = self.sampler(sampler_id)
        with self.lock:
            record.version = version

    def status(self) -> dict:
        now = time.time()
        with self.lock:
            counts = self.leases.counts()
            samplers = [
                {
                    **{k: v for k, v in vars(r).items() if k not in ("registered_at", "last_seen")},
                    "last_seen_s_ago": now - r.last_seen,
                    "alive": now - r.last_seen < SAMPLER_ALIVE_S,
                }
                for r in self.samplers.values()
            ]
            return {
                "run_id": self.run_id,
                "version": self.version,
                "step": self.trainer.step,
                "groups_trained": counts[LeaseState.TRAINED.value],
                "groups_pending": len(self.store),
                "leases_outstanding": counts[LeaseState.OUTSTANDING.value],
                "leases_expired": counts[LeaseState.EXPIRED.value],
                "groups_dropped_stale": counts[LeaseState.DROPPED.value],
                "samplers": samplers,
                "uptime_s": now - self.started,
                "last_reward_mean": self.last_reward_mean,
                "last_eval_accuracy": self.eval_history[-1][1] if self.eval_history else -1.0,
                "task": self.config.task,
                "loss": self.config.loss,
            }

    # ---- the training loop ---------------------------------------------------------------------------------

    def _wait_for_groups(self, stop: threading.Event) -> list[StoredGroup]:
        """Block until B fresh-enough groups are stored (or stop); stale ones are dropped and counted."""
        batch: list[StoredGroup] = []
        needed = self.config.groups_per_step
        with self.lock:
            while len(batch) < needed and not stop.is_set():
                if not self.store:
                    self.groups_ready.wait(timeout=0.5)
                    self.leases.expire_overdue(time.time())
                    continue
                for group in self.store.take(needed - len(batch)):
                    staleness = self.version - group.policy_version
                    if self.config.max_staleness is not None and staleness > self.config.max_staleness:
                        self.leases.finish(group.lease_id, trained=False)
                    else:
                        batch.append(group)
            if stop.is_set():  # give unfinished work back so the accounting stays exact
                self.store.put_back(batch)
                return []
        return batch

    def evaluate(self) -> float:
        started = time.perf_counter()
        accuracy = self.trainer.evaluate(
            self.eval_problems, self.encode, self.decode, self.reward_fn, self.config.eval_tokens
        )
        self.eval_history.append((self.trainer.step, accuracy))
        self.metrics.write(
            {
                "kind": "eval",
                "step": self.trainer.step,
                "version": self.version,
                "accuracy": accuracy,
                "n": len(self.eval_problems),
                "seconds": time.perf_counter() - started,
                "time": time.time(),
            }
        )
        self.log(f"eval step {self.trainer.step}: held-out accuracy {accuracy:.3f} (n={len(self.eval_problems)})")
        return accuracy

    def train_once(self, batch: list[StoredGroup]) -> dict:
        version_before = self.version
        staleness = [version_before - g.policy_version for g in batch]
        rewards = [c.reward for g in batch for c in g.completions]
        metrics = self.trainer.train_step(batch)
        with self.lock:
            for group in batch:
                self.leases.finish(group.lease_id, trained=True)
            self.staleness_seen.extend(staleness)
            self.last_reward_mean = sum(rewards) / len(rewards)
        self.publish()
        record = {
            "kind": "train",
            "step": self.trainer.step,
            "version": self.version,
            "groups": len(batch),
            "reward_mean": self.last_reward_mean,
            "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
            "staleness_mean": statistics.fmean(staleness),
            "staleness_max": max(staleness),
            "staleness": staleness,
            "samplers": [g.sampler_id for g in batch],
            "policy_versions": [g.policy_version for g in batch],
            "leases": [g.lease_id for g in batch],
            "prompts": [g.prompt_index for g in batch],
            "time": time.time(),
            **metrics,
        }
        self.metrics.write(record)
        return record

    def run(self, stop: threading.Event) -> dict:
        """Train until max_steps (or stop); evaluate first, every eval_every steps and last; return a summary."""
        started = time.time()
        (self.config.run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
        if self.config.eval_size:
            self.evaluate()
        while not stop.is_set():
            if self.config.max_steps and self.trainer.step >= self.config.max_steps:
                break
            batch = self._wait_for_groups(stop)
            if not batch:
                continue
            rec = self.train_once(batch)
            self.log(
                f"step {rec['step']}: loss {rec['loss']:.4f} reward {rec['reward_mean']:.3f} "
                f"staleness {rec['staleness_mean']:.1f} (max {rec['staleness_max']}) "
                f"grad {rec['grad_norm']:.3f} {rec['train_seconds']:.1f}s"
            )
            if self.config.eval_every and self.trainer.step % self.config.eval_every == 0 and self.config.eval_size:
                self.evaluate()
        finished = not stop.is_set()  # a stop request skips the final evaluation so that stopping is prompt
        if finished and self.config.eval_size and self.eval_history[-1][0] != self.trainer.step:
            self.evaluate()
        checkpoint = self.save_checkpoint()
        return self.write_summary(started, checkpoint)

    def save_checkpoint(self) -> Path:
        """The trained weights as a Hugging Face directory, usable as `--model` of a later run."""
        final = self.config.run_dir / "checkpoint"
        tmp = self.config.run_dir / "checkpoint.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.trainer.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    def write_summary(self, started: float, checkpoint: Path) -> dict:
        with self.lock:
            counts = self.leases.counts()
            staleness = list(self.staleness_seen)
            accepted = sum(r.groups_accepted for r in self.samplers.values())
        summary = {
            "run_id": self.run_id,
            "task": self.config.task,
            "loss": self.config.loss,
            "steps": self.trainer.step,
            "versions_published": self.version,
            "groups_accepted": accepted,
            "groups_trained": counts[LeaseState.TRAINED.value],
            "groups_pending": len(self.store),
            "groups_dropped_stale": counts[LeaseState.DROPPED.value],
            "leases_expired": counts[LeaseState.EXPIRED.value],
            "leases_outstanding": counts[LeaseState.OUTSTANDING.value],
            "staleness_mean": statistics.fmean(staleness) if staleness else 0.0,
            "staleness_max": max(staleness) if staleness else 0,
            "eval": [{"step": s, "accuracy": a} for s, a in self.eval_history],
            "base_accuracy": self.eval_history[0][1] if self.eval_history else math.nan,
            "final_accuracy": self.eval_history[-1][1] if self.eval_history else math.nan,
            "eval_size": len(self.eval_problems),
            "wall_seconds": time.time() - started,
            "metrics": str(self.metrics.path),
            "checkpoint": str(checkpoint),
        }
        (self.config.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
