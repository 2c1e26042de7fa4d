"""The training loop: wait for B groups -> screen -> step -> publish -> evaluate / checkpoint.

`run` is the whole loop, top to bottom; the functions after it are its steps. Training never waits for a
particular sampler, only for enough groups from anyone. Everything that must survive a crash is committed to the
run database (through `LeaseBook` for leases) before anyone is told about it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from heterorl.common import codec
from heterorl.common.config import to_dict
from heterorl.common.progress import Progress, activity
from heterorl.server import checkpoint as ckpt
from heterorl.server import evaluate as evaluation
from heterorl.server.commits import DurabilityError, Ticket
from heterorl.server.db import CheckpointRow
from heterorl.server.leases import LeaseState
from heterorl.server.store import StoredGroup

if TYPE_CHECKING:
    from heterorl.server.learner import Learner

logger = logging.getLogger(__name__)


def run(learner: Learner, stop: threading.Event) -> dict:
    """Train until max_steps (or stop); evaluate first, every eval_every steps and last; return the summary."""
    config, trainer, stats = learner.config, learner.trainer, learner.stats
    started = time.time()
    steps = Progress("training", config.run.max_steps or None, "steps", log=logger, initial=trainer.step, every_s=60)
    (config.run.run_dir / "config.json").write_text(json.dumps(to_dict(config, flat=True), indent=2))
    if config.eval.eval_size and not (stats.eval_history and stats.eval_history[-1][0] == trainer.step):
        evaluate(learner)  # a resumed run has evaluated this step already
    while not stop.is_set():
        if learner.db.failed is not None:
            raise DurabilityError(f"the run database failed: {learner.db.failed}")
        if config.run.max_steps and trainer.step >= config.run.max_steps:
            break
        batch = wait_for_groups(learner, stop)
        batch = screen(learner, batch)
        if not batch:
            continue
        record = train_step(learner, batch)  # publishes the new version
        logger.info("step %d: loss %.4f reward %.3f staleness %.1f (max %d) grad %.3f %.1fs", record["step"],
                    record["loss"], record["reward_mean"], record["staleness_mean"], record["staleness_max"],
                    record["grad_norm"], record["train_seconds"])
        steps.set(trainer.step)  # a bar on a terminal; in a log a line a minute at most, with the time left
        if config.eval.eval_every and trainer.step % config.eval.eval_every == 0 and config.eval.eval_size:
            evaluate(learner)
        if config.durability.checkpoint_every and trainer.step % config.durability.checkpoint_every == 0:
            write_train_state(learner)
    steps.close()
    finished = not stop.is_set()  # a stop request skips the final evaluation so that stopping is prompt
    if finished and config.eval.eval_size and stats.eval_history[-1][0] != trainer.step:
        evaluate(learner)
    write_train_state(learner)  # at the end, and on SIGTERM: `--resume` continues from here
    # A sharded model is gathered whole (fp32) onto rank 0 first; on one rank the model writes its own weights.
    whole = trainer.snapshot(torch.float32) if trainer.ranks is not None else None
    exported = ckpt.export_model(config.run.run_dir, trainer.model, learner.inputs.tokenizer, whole)
    return write_summary(learner, started, exported)


def wait_for_groups(learner: Learner, stop: threading.Event) -> list[StoredGroup]:
    """Block until B fresh-enough groups are stored (or stop); stale ones are dropped and counted."""
    batch: list[StoredGroup] = []
    drops: list[Ticket | None] = []
    needed, max_staleness = learner.config.train.groups_per_step, learner.config.train.max_staleness
    with learner.lock:
        while len(batch) < needed and not stop.is_set():
            if not learner.store:
                learner.groups_ready.wait(timeout=0.5)
                learner.leases.expire_overdue(time.time())
                continue
            for group in learner.store.take(needed - len(batch)):
                if max_staleness is not None and learner.version - group.policy_version > max_staleness:
                    drops.append(learner.leases.finish([group.lease_id], trained=False, step=learner.trainer.step))
                else:
                    batch.append(group)
        if stop.is_set():  # give unfinished work back so the accounting stays exact
            learner.store.put_back(batch)
            batch = []
    for ticket in drops:  # committed outside the lock
        ticket.wait()
    return batch


def screen(learner: Learner, batch: list[StoredGroup]) -> list[StoredGroup]:
    """Recompute the log-probs of a share of the groups (trust.py); keep quarantined samplers' groups aside.

    Runs in the training thread, outside the lock: a check is one no-grad forward of the claimed version.
    """
    trust = learner.trust
    caught = set()  # groups whose own check failed are never trained, quarantine or not
    # By version, so the verifier loads each version's weights once per batch, not once per alternation.
    for group in sorted(batch, key=lambda g: g.policy_version):
        if not trust.quarantined(group.sampler_id) and trust.wants_check(group):
            tensors = learner.versions.tensors(group.policy_version)
            if tensors is not None:  # versions no longer held cannot be checked
                learner.verifier.load(group.policy_version, tensors)
                diff = learner.verifier.mean_abs_diff(group)
                if trust.mismatch(diff):
                    caught.add(group.lease_id)
                if trust.record(group.sampler_id, diff):
                    logger.warning("sampler %s quarantined: its log-probs differ from version %d's by %.3f nats "
                                   "per token", group.sampler_id, group.policy_version, diff)
    kept, aside = [], []
    for group in batch:
        setaside = group.lease_id in caught or trust.quarantined(group.sampler_id)
        (aside if setaside else kept).append(group)
    if aside:
        with learner.lock:
            for group in aside:
                trust.of(group.sampler_id).held_aside += 1
            ticket = learner.leases.finish([g.lease_id for g in aside], trained=False, step=learner.trainer.step)
        ticket.wait()
    return kept


def train_step(learner: Learner, batch: list[StoredGroup]) -> dict:
    """One optimizer step on `batch`, its leases finished as trained, and the new weights published."""
    version_before = learner.version
    staleness = [version_before - g.policy_version for g in batch]
    rewards = [c.reward for g in batch for c in g.completions]
    metrics = learner.trainer.train_step(batch)
    # The new weights are gathered before anything of the step is recorded: on several ranks the gather is the
    # step's last collective, and a rank that fails it must leave no trained leases behind without their version.
    started = time.perf_counter()
    snapshot = learner.trainer.snapshot()
    with learner.lock:
        # Committed with the version published next (publish waits for it); until a checkpoint covers this
        # step, a resume trains these groups again.
        learner.leases.finish([g.lease_id for g in batch], trained=True, step=learner.trainer.step)
        learner.stats.add_step(staleness, sum(rewards) / len(rewards))
    publish(learner, snapshot, started)
    record = {
        "kind": "train",
        "step": learner.trainer.step,
        "version": learner.version,
        "groups": len(batch),
        "reward_mean": learner.stats.last_reward_mean,
        "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
        "staleness_mean": sum(staleness) / len(staleness),
        "staleness_max": max(staleness),
        "staleness": staleness,
        "samplers": [g.sampler_id for g in batch],
        "policy_versions": [g.policy_version for g in batch],
        "leases": [g.lease_id for g in batch],
        "prompts": [g.prompt_index for g in batch],
        "time": time.time(),
        **metrics,
    }
    learner.metrics.write(record)
    learner.prometheus.trained(record)
    learner.reports.write(record)
    return record


def publish(learner: Learner, snapshot: dict[str, torch.Tensor] | None = None, started: float | None = None) -> None:
    """Make the trainer's current weights (or their `snapshot`, gathered since `started`) the next version, and
    pre-encode the delta samplers will want."""
    version = learner.versions.newest + 1
    started = time.perf_counter() if started is None else started
    snapshot = learner.trainer.snapshot() if snapshot is None else snapshot
    digest = codec.digest(snapshot)
    # Recorded before any sampler can see it, so that a resumed run never gives this number other weights.
    learner.db.record_version(version, learner.trainer.step, digest).wait()
    delta = learner.versions.publish(version, snapshot, digest)
    size = f", delta from v{version - 1} {len(delta.data) / 2**20:.1f} MiB" if delta else ""
    logger.info("published version %d in %.2fs%s", version, time.perf_counter() - started, size)
    learner.prometheus.published(time.perf_counter() - started, len(delta.data) if delta else 0)


def evaluate(learner: Learner) -> float:
    """Greedy held-out accuracy, and pass@1 over --eval-samples samples (heterorl/server/evaluate.py); a reward
    that fails on an answer counts it wrong (counted in the scorer)."""
    config, inputs, step = learner.config, learner.inputs, learner.trainer.step
    model = learner.trainer.model
    if learner.trainer.ranks is not None:  # sharded: rank 0 evaluates the newest version on its plain copy
        learner.verifier.load(learner.version, learner.versions.tensors(learner.version))
        model = learner.verifier.model
    settings = evaluation.EvalSettings(
        max_new_tokens=config.eval_tokens, samples=config.eval.eval_samples, temperature=config.sampling.temperature,
        top_k=config.sampling.top_k, top_p=config.sampling.top_p, stop=tuple(config.sampling.stop),
        batch_size=config.eval.eval_batch_size, seed=config.run.seed)
    result = evaluation.evaluate_policy(model, inputs.eval_problems, inputs.encode, inputs.decode,
                                        learner.scorer.correct, settings, inputs.pad_id,
                                        evaluation.model_device(model, learner.trainer))
    learner.stats.eval_history.append((step, result.accuracy))
    record = evaluation.record(result, step, learner.version)
    learner.metrics.write(record)
    learner.prometheus.evaluated(record)
    learner.reports.write(record)
    pass1 = f", pass@1 {result.pass1:.3f} (k={result.k})" if result.pass1 is not None else ""
    logger.info("eval step %d: held-out accuracy %.3f%s (n=%d, %.1fs)", step, result.accuracy, pass1, result.n,
                result.seconds)
    return result.accuracy


def write_train_state(learner: Learner) -> Path | None:
    """A resumable checkpoint of the current step, recorded in the database; None if it already exists."""
    step, run_dir = learner.trainer.step, learner.config.run.run_dir
    if step == learner.checkpoint_step:
        return None
    started = time.perf_counter()
    version = learner.version
    digest = learner.versions.weights_sha256(version)
    shown = activity(f"checkpoint of step {step}", log=logger)  # still writing: a line every 15 s in a log
    path, manifest = learner.trainer.save_state(  # with several ranks, each writes its shards
        run_dir / ckpt.TRAIN_STATE_DIR, step, {"run_id": learner.run_id, "version": version, "weights_sha256": digest})
    shown.close()
    metrics_bytes = learner.metrics.path.stat().st_size if learner.metrics.path.exists() else 0
    learner.save_samplers()
    released = learner.db.record_checkpoint(CheckpointRow(
        step, version, digest, str(path.relative_to(run_dir)), metrics_bytes, manifest, time.time())).wait()
    learner.checkpoint_step = step
    ckpt.remove_others(run_dir / ckpt.TRAIN_STATE_DIR, keep=path)
    learner.prometheus.checkpointed(time.perf_counter() - started)
    logger.info("checkpoint of step %d (version %d) written in %.2fs; %d trained groups released from the database",
                step, version, time.perf_counter() - started, released)
    return path


def write_summary(learner: Learner, started: float, exported: Path) -> dict:
    with learner.lock:
        counts = learner.leases.counts()
        accepted = learner.registry.total_accepted()
        pending = len(learner.store)
    stats = learner.stats
    history = stats.eval_history
    summary = {
        "run_id": learner.run_id,
        "task": learner.config.run.task,
        "loss": learner.config.loss.loss,
        "steps": learner.trainer.step,
        "versions_published": learner.version,
        "groups_accepted": accepted,
        "groups_trained": counts[LeaseState.TRAINED.value],
        "groups_pending": pending,
        "groups_dropped_stale": counts[LeaseState.DROPPED.value],
        "groups_refused_reward": learner.scorer.counts.refused,
        "leases_expired": counts[LeaseState.EXPIRED.value] + counts[LeaseState.RELEASED.value],
        "leases_outstanding": counts[LeaseState.OUTSTANDING.value],
        "staleness_mean": stats.staleness_mean,
        "staleness_max": stats.staleness_max,
        "base_accuracy": history[0][1] if history else math.nan,
        "final_accuracy": history[-1][1] if history else math.nan,
        **evaluation.summary_fields(history, learner.metrics.path),  # "eval": per evaluation, with pass@1
        "eval_size": len(learner.inputs.eval_problems),
        "wall_seconds": time.time() - started,
        "metrics": str(learner.metrics.path),
        "checkpoint": str(exported),
    }
    (learner.config.run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
