"""The learner's state and its training loop: prompts out, groups in, one optimizer step per B groups.

`Learner` holds everything a run owns (model and optimizer, leases, accepted groups, published versions,
the sampler registry) and is driven from two sides: gRPC handlers call `register`, `lease`, `submit`, ...
under one lock, while `run` trains in the main thread whenever B groups are waiting. Training never waits for
a particular sampler; it waits only for enough groups from anyone.

Durability: the working state lives in memory, and every change that must survive a crash (a registration,
issued leases, an accepted group, a finished step, a published version number) is committed to the run database
(`heterorl.server.db`) before anyone is told about it; train-state checkpoints (`heterorl.server.checkpoint`)
hold the weights and optimizer every `checkpoint_every` steps and at the end. `Learner(config)` with
`config.resume` set rebuilds the run from both: see `_resume` for what happens to each piece.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from heterorl.common import codec
from heterorl.common import model as model_lib
from heterorl.common.config import to_dict
from heterorl.common.tasks import Problem, get_reward, make_task
from heterorl.server import checkpoint as ckpt
from heterorl.server.config import LearnerConfig
from heterorl.server.db import DB_NAME, CheckpointRow, DurabilityError, LeaseRow, RunDB, Ticket
from heterorl.server.leases import Lease, LeaseBook, LeaseError, LeaseState
from heterorl.server.store import StoredCompletion, StoredGroup, TrajectoryStore, decode_group
from heterorl.server.trainer import Trainer, TrainerConfig
from heterorl.server.trust import TrustBook, Verifier
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
    rejections: dict[str, int] = field(default_factory=dict)  # groups_rejected by reason (service.py names them)
    principal: str = ""  # the credential it registered with (auth.py); its id answers to that credential only


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
        self.db_path = config.run_dir / DB_NAME
        self._check_run_dir()  # before the model loads, so a wrong directory is refused at once
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
        self.trust = TrustBook(config.trust_config())
        self._verifier: Verifier | None = None
        self.samplers: dict[str, SamplerRecord] = {}
        self.lock = threading.Lock()
        self.groups_ready = threading.Condition(self.lock)
        self.metrics = MetricsLog(config.run_dir / "metrics.jsonl")
        self.staleness_seen: list[int] = []
        self.last_reward_mean = float("nan")
        self.eval_history: list[tuple[int, float]] = []
        self.accepting: dict[str, Ticket] = {}  # lease id -> commit of its group, until that commit is waited for
        self.checkpoint_step = -1  # step of the newest recorded train-state checkpoint (-1: none)
        self.train_state_dir = config.run_dir / ckpt.TRAIN_STATE_DIR
        if config.resume is not None:
            self.db = RunDB.open(self.db_path, config.db_sync)
            try:
                self._resume()
            except BaseException:
                self.db.close()
                raise
        else:
            self.db = RunDB.create(self.db_path, self.run_id, to_dict(config), config.db_sync)
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
        snapshot = self.trainer.snapshot()
        digest = codec.digest(snapshot)
        # Recorded before any sampler can see it, so that a resumed run never gives this number other weights.
        self.db.record_version(version, self.trainer.step, digest).wait()
        delta = self.versions.publish(version, snapshot, digest)
        size = f", delta from v{version - 1} {len(delta.data) / 2**20:.1f} MiB" if delta else ""
        self.log(f"published version {version} in {time.perf_counter() - started:.2f}s{size}")

    # ---- what the gRPC service calls (each takes the lock) -------------------------------------------------

    def register(self, name: str, engine: str, device: str, max_batch: int, principal: str = "") -> SamplerRecord:
        now = time.time()
        record = SamplerRecord(
            sampler_id=f"S-{uuid.uuid4().hex[:16]}",
            name=name,
            engine=engine,
            device=device,
            max_batch=max_batch,
            registered_at=now,
            last_seen=now,
            principal=principal,  # committed with the record: a resumed learner still knows whose id this is
        )
        with self.lock:
            self.samplers[record.sampler_id] = record
            ticket = self.db.add_sampler(record.sampler_id, dataclasses.asdict(record))
        self._committed(ticket)  # the id is handed out only once a restarted learner would still know it
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
            ticket = None
            if leases:
                ticket = self.db.issue_leases(
                    [LeaseRow(l.lease_id, l.prompt_index, l.sampler_id, l.issued_at, l.expires_at, "outstanding")
                     for l in leases],
                    reissued=[l.reissue_of for l in leases if l.reissue_of is not None],
                )
        self._committed(ticket)  # a lease reaches its sampler only once committed
        return leases

    def submit(self, submission: Submission) -> bool:
        """Store a validated group; returns True if it was a duplicate of an acknowledged one.

        Returns only once the group is committed to the run database, since the caller acknowledges it then;
        a duplicate arriving while the first copy's commit is still under way waits for that commit as well.
        """
        record = self.sampler(submission.sampler_id)
        with self.lock:
            lease, duplicate = self.leases.check_submittable(submission.lease_id, submission.sampler_id)
            if duplicate:
                ticket = self.accepting.get(lease.lease_id)
            else:
                completions = []
                for tokens, logprobs, finish, claimed in submission.completions:
                    reward = float(self.reward_fn(self.decode(tokens), lease.problem.answer))
                    if claimed is not None and abs(claimed - reward) > 1e-6:
                        record.reward_disagreements += 1
                    completions.append(StoredCompletion(tokens, logprobs, finish, reward, claimed))
                group = StoredGroup(
                    lease_id=lease.lease_id,
                    sampler_id=submission.sampler_id,
                    prompt_index=lease.prompt_index,
                    prompt_token_ids=lease.prompt_token_ids,
                    policy_version=submission.policy_version,
                    completions=tuple(completions),
                    accepted_at=time.time(),
                )
                self.store.add(group)
                self.leases.accept(lease)
                record.groups_accepted += 1
                record.version = max(record.version, submission.policy_version)
                # Queued under the lock, so it commits before the step that trains the group is recorded.
                ticket = self.accepting[lease.lease_id] = self.db.accept_group(group)
                self.groups_ready.notify_all()
        self._committed(ticket)
        if not duplicate:
            with self.lock:
                self.accepting.pop(lease.lease_id, None)
        return duplicate

    def count_rejection(self, sampler_id: str, reason: str = "invalid") -> bool:
        """Count a refused request against a registered sampler; False if no such sampler."""
        with self.lock:
            record = self.samplers.get(sampler_id)
            if record is not None:
                record.groups_rejected += 1
                # Replaced, not mutated: `status()` hands the dict out, to be read after the lock is released.
                record.rejections = {**record.rejections, reason: record.rejections.get(reason, 0) + 1}
            return record is not None

    def heartbeat(self, sampler_id: str, version: int) -> None:
        record = self.sampler(sampler_id)
        with self.lock:
            record.version = version

    def _trust_view(self, sampler_id: str) -> dict:
        t = self.trust.samplers.get(sampler_id)
        if t is None:
            return {"quarantined": False, "logprob_checked": 0, "logprob_mismatched": 0, "logprob_mean_diff": 0.0}
        return {"quarantined": t.quarantined, "logprob_checked": t.verified, "logprob_mismatched": t.mismatched,
                "logprob_mean_diff": t.mean_diff}

    def status(self) -> dict:
        now = time.time()
        with self.lock:
            counts = self.leases.counts()
            samplers = [
                {
                    **{k: v for k, v in vars(r).items() if k not in ("registered_at", "last_seen")},
                    "last_seen_s_ago": now - r.last_seen,
                    "alive": now - r.last_seen < SAMPLER_ALIVE_S,
                    **self._trust_view(r.sampler_id),
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
        drops: list[Ticket] = []
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
                        drops.append(self.db.finish_leases([group.lease_id], "dropped", self.trainer.step))
                    else:
                        batch.append(group)
            if stop.is_set():  # give unfinished work back so the accounting stays exact
                self.store.put_back(batch)
                batch = []
        for ticket in drops:  # committed outside the lock
            ticket.wait()
        return batch

    @property
    def verifier(self) -> Verifier:
        """Built on the first check: its own copy of the model, so it costs nothing until a group is checked."""
        if self._verifier is None:
            c = self.config
            self._verifier = Verifier(self.trainer.model, self.pad_id, c.temperature, c.top_k, c.top_p)
        return self._verifier

    def _screen(self, batch: list[StoredGroup]) -> list[StoredGroup]:
        """Recompute the log-probs of a share of the groups (see trust.py); keep quarantined samplers' groups aside.

        Runs in the training thread, outside the lock: a check is one no-grad forward of the claimed version.
        """
        caught_leases = set()  # groups whose own check failed are never trained, quarantine or not
        # By version, so the verifier loads each version's weights once per batch, not once per alternation.
        for group in sorted(batch, key=lambda g: g.policy_version):
            if not self.trust.quarantined(group.sampler_id) and self.trust.wants_check(group):
                tensors = self.versions.tensors(group.policy_version)
                if tensors is not None:  # versions no longer held cannot be checked
                    self.verifier.load(group.policy_version, tensors)
                    diff = self.verifier.mean_abs_diff(group)
                    if self.trust.mismatch(diff):
                        caught_leases.add(group.lease_id)
                    if self.trust.record(group.sampler_id, diff):
                        self.log(f"sampler {group.sampler_id} quarantined: its log-probs differ from version "
                                 f"{group.policy_version}'s by {diff:.3f} nats per token")
        kept, aside = [], []
        for group in batch:
            setaside = group.lease_id in caught_leases or self.trust.quarantined(group.sampler_id)
            (aside if setaside else kept).append(group)
        if aside:
            with self.lock:
                for group in aside:
                    self.leases.finish(group.lease_id, trained=False)
                    self.trust.of(group.sampler_id).held_aside += 1
                ticket = self.db.finish_leases([g.lease_id for g in aside], "dropped", self.trainer.step)
            ticket.wait()
        return kept

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
            # Committed with the version published next (publish waits for it); until a checkpoint covers this
            # step, a resume trains these groups again.
            self.db.finish_leases([g.lease_id for g in batch], "trained", self.trainer.step)
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
        if self.config.eval_size and not (self.eval_history and self.eval_history[-1][0] == self.trainer.step):
            self.evaluate()  # a resumed run has evaluated this step already
        while not stop.is_set():
            if self.db.failed is not None:
                raise DurabilityError(f"the run database failed: {self.db.failed}")
            if self.config.max_steps and self.trainer.step >= self.config.max_steps:
                break
            batch = self._screen(self._wait_for_groups(stop))
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
            if self.config.checkpoint_every and self.trainer.step % self.config.checkpoint_every == 0:
                self.write_train_state()
        finished = not stop.is_set()  # a stop request skips the final evaluation so that stopping is prompt
        if finished and self.config.eval_size and self.eval_history[-1][0] != self.trainer.step:
            self.evaluate()
        self.write_train_state()  # at the end, and on SIGTERM: `--resume` continues from here
        checkpoint = self.save_checkpoint()
        return self.write_summary(started, checkpoint)

    def save_checkpoint(self) -> Path:
        """The trained weights as a Hugging Face directory, usable as `--model` of a later run.

        The previous directory is moved aside before the new one takes its name, so a crash leaves one of them.
        """
        final = self.config.run_dir / "checkpoint"
        tmp = self.config.run_dir / "checkpoint.tmp"
        old = self.config.run_dir / "checkpoint.old"
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists():  # left by a crash between the two renames below
            if final.exists():
                shutil.rmtree(old)
            else:
                old.rename(final)
        self.trainer.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ---- durability ----------------------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        """A fresh run needs a directory without a run in it; a resume needs one with a run."""
        config = self.config
        if config.resume is not None:
            if Path(config.resume).resolve() != config.run_dir.resolve():
                raise ValueError(f"resume {config.resume} and run_dir {config.run_dir} name different directories")
            if not self.db_path.exists():
                raise ValueError(f"--resume {config.resume}: there is no run to resume ({DB_NAME} is missing)")
        elif self.db_path.exists():
            raise ValueError(
                f"{config.run_dir} already holds a run ({DB_NAME}); continue it with --resume {config.run_dir}, "
                "or choose another --run-dir"
            )

    def _committed(self, ticket: Ticket | None) -> None:
        """Wait for a queued change to commit; if the database failed, refuse with UNAVAILABLE (samplers keep
        the work and retry, and the learner stops: a restart resumes from what was committed)."""
        if ticket is None:
            return
        try:
            ticket.wait()
        except DurabilityError as err:
            raise LeaseError("UNAVAILABLE", f"the learner cannot store its state and is stopping: {err}") from None

    def _sampler_records(self) -> dict[str, dict]:
        with self.lock:
            return {sid: dataclasses.asdict(r) for sid, r in self.samplers.items()}

    def write_train_state(self) -> Path | None:
        """A resumable checkpoint of the current step, recorded in the database; None if it already exists."""
        step = self.trainer.step
        if step == self.checkpoint_step:
            return None
        started = time.perf_counter()
        version = self.version
        digest = self.versions.weights_sha256(version)
        path, manifest = ckpt.write_train_state(
            self.train_state_dir, step, self.trainer.model, self.trainer.optimizer,
            {"run_id": self.run_id, "version": version, "weights_sha256": digest},
        )
        metrics_bytes = self.metrics.path.stat().st_size if self.metrics.path.exists() else 0
        self.db.save_samplers(self._sampler_records())
        released = self.db.record_checkpoint(
            CheckpointRow(step, version, digest, str(path.relative_to(self.config.run_dir)), metrics_bytes, manifest,
                          time.time())
        ).wait()
        self.checkpoint_step = step
        ckpt.remove_others(self.train_state_dir, keep=path)
        self.log(f"checkpoint of step {step} (version {version}) written in {time.perf_counter() - started:.2f}s; "
                 f"{released} trained groups released from the database")
        return path

    def close(self) -> None:
        """Save the samplers' counters and close the run database; call after the gRPC server has stopped."""
        if self.db.failed is None:
            try:
                self.db.save_samplers(self._sampler_records()).wait()
            except DurabilityError:
                pass
        self.db.close()

    def _resume(self) -> None:
        """Continue the run in RUN_DIR from its database and its newest recorded checkpoint.

        - Weights, optimizer and RNG states come from that checkpoint (or from the run's starting weights when
          none was recorded yet) and must hash to the digest recorded for its version.
        - Groups trained after the checkpoint lost that training with the crash: they are pending again and
          are trained again, before groups accepted later. metrics.jsonl is cut back to the checkpoint (the
          lines cut go to metrics.rolledback.jsonl), so each group appears in one train record.
        - Accepted groups not yet trained stay pending, in order; dropped ones stay dropped.
        - Versions: the checkpoint's version is held again. If the crashed learner had published later
          numbers, the same weights are published under the next unused number too, so no number ever names
          two different weights and samplers holding a lost version see a newer one and resync (an anchor; a
          sampler at the checkpoint's version gets a delta of unchanged tensors).
        - Leases keep their ids and owners; their clocks stood still while the learner was down (expiry moved
          by the time since the last committed event), so samplers can still deliver. The sampler registry is
          kept: samplers carry on with their ids and their resent outboxes are accepted.
        """
        config, db = self.config, self.db
        began = time.perf_counter()
        first = db.load()
        ckpt.check_same_run(first.config, config)
        row = first.checkpoint
        step = row.step if row is not None else 0
        keep = None
        version, digest = 1, first.versions.get(1)
        if row is not None:  # loaded (and verified) before anything in the database changes
            keep = config.run_dir / row.path
            ckpt.read_train_state(keep, row.manifest, self.trainer.model, self.trainer.optimizer)
            for group in self.trainer.optimizer.param_groups:  # a resume may change these two
                group["lr"], group["weight_decay"] = config.lr, config.weight_decay
            self.trainer.step = self.checkpoint_step = row.step
            version, digest = row.version, row.weights_sha256
        snapshot = self.trainer.snapshot()
        got = codec.digest(snapshot)
        if digest is not None and got != digest:
            raise ckpt.CheckpointError(
                f"the weights of step {step} hash to {got[:16]}..., but version {version} was published as "
                f"{digest[:16]}...; the checkpoint does not belong to this run's database"
            )
        retrained = db.rewind(step).wait()
        state = db.load()
        self.run_id = state.run_id
        ckpt.remove_others(self.train_state_dir, keep)  # unfinished or unrecorded checkpoint directories
        if digest is None:  # the learner died before it recorded its first version
            db.record_version(version, step, got).wait()
        self.versions.publish(version, snapshot, got)
        if state.newest_version > version:
            version = state.newest_version + 1
            db.record_version(version, step, got).wait()
            self.versions.publish(version, snapshot, got)

        now = time.time()
        downtime = max(0.0, now - state.last_seen_alive)
        pending = [
            decode_group(g.data, lease_id=g.lease_id, sampler_id=g.sampler_id, prompt_index=g.prompt_index,
                         policy_version=g.policy_version, accepted_at=g.accepted_at)
            for g in state.pending
        ]
        prompts = {g.lease_id: g.prompt_token_ids for g in pending}
        leases = []
        for r in state.leases:
            problem = self.task.train_problem(r.prompt_index)
            outstanding = r.state == "outstanding"
            leases.append(Lease(
                lease_id=r.lease_id, prompt_index=r.prompt_index, problem=problem,
                # only leases that may still be leased, submitted or trained need their prompt tokens
                prompt_token_ids=self.encode(problem) if outstanding else prompts.get(r.lease_id, []),
                sampler_id=r.sampler_id, issued_at=r.issued_at,
                expires_at=r.expires_at + downtime if outstanding else r.expires_at,
                state=LeaseState(r.state), reissued=r.state == "expired",
            ))
        with self.lock:
            self.leases.restore(leases, now)
            for group in pending:
                self.store.add(group)
            fields = {f.name for f in dataclasses.fields(SamplerRecord)}
            for sampler_id, stored in state.samplers.items():
                record = SamplerRecord(**{k: v for k, v in stored.items() if k in fields})
                record.groups_leased = record.groups_accepted = 0  # recounted from the leases, exactly
                self.samplers[sampler_id] = record
            for lease in self.leases.leases.values():
                record = self.samplers.get(lease.sampler_id)
                if record is not None:
                    record.groups_leased += 1
                    record.groups_accepted += lease.state in (LeaseState.ACCEPTED, LeaseState.TRAINED,
                                                              LeaseState.DROPPED)
            counts = self.leases.counts()
        rolled_back = self._rewind_metrics(row.metrics_bytes if row is not None else 0)
        self.metrics.write({
            "kind": "resume", "step": self.trainer.step, "version": self.version,
            "checkpoint": row.path if row is not None else None, "retrained_groups": retrained,
            "pending_groups": len(pending), "leases_outstanding": counts[LeaseState.OUTSTANDING.value],
            "metrics_rolled_back_bytes": rolled_back, "downtime_s": downtime, "time": now,
        })
        self.log(
            f"resumed run {self.run_id} at step {self.trainer.step} from "
            f"{row.path if row is not None else 'its starting weights'} (weights {got[:16]} verified); version "
            f"{self.version}; {len(pending)} groups pending ({retrained} trained after the checkpoint, to train "
            f"again); {counts[LeaseState.OUTSTANDING.value]} leases outstanding; {len(self.samplers)} samplers known; "
            f"{time.perf_counter() - began:.2f}s"
        )

    def _rewind_metrics(self, keep_bytes: int) -> int:
        """Cut metrics.jsonl back to its size at the checkpoint (moving the rest to metrics.rolledback.jsonl) and
        reload the evaluation and staleness history from what stays; returns the bytes moved."""
        path = self.metrics.path
        data = path.read_bytes() if path.exists() else b""
        if len(data) < keep_bytes:
            self.log(f"{path} is shorter than at the checkpoint ({len(data)} < {keep_bytes} bytes); keeping it all")
            keep_bytes = len(data)
        tail = data[keep_bytes:]
        if tail:
            with open(self.config.run_dir / "metrics.rolledback.jsonl", "ab") as fh:
                fh.write(tail if tail.endswith(b"\n") else tail + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            with open(path, "r+b") as fh:
                fh.truncate(keep_bytes)
                os.fsync(fh.fileno())
        for line in data[:keep_bytes].decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "eval":
                self.eval_history.append((record["step"], record["accuracy"]))
            elif record.get("kind") == "train":
                self.staleness_seen.extend(record["staleness"])
                self.last_reward_mean = record["reward_mean"]
        return len(tail)

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
