"""Starting a run in RUN_DIR: fresh, or continued from its database and newest recorded checkpoint.

Every check of a resume lives here and runs once: `plan_run` decides fresh or resumed (a fresh run needs a
directory without a run; a resume needs one with a run, of this heterorl's schema), merges the stored config with
the settings given now and refuses a change of what defines the run; `restore` then rebuilds the learner's state:

- Weights, optimizer and RNG states come from the newest recorded checkpoint (or the run's starting weights when
  none was recorded yet) and must hash to the digest recorded for its version.
- Groups trained after that checkpoint lost that training with the crash: they are pending again and are trained
  again, before groups accepted later. metrics.jsonl is cut back to the checkpoint (the lines cut go to
  metrics.rolledback.jsonl), so each group appears in one train record.
- Accepted groups not yet trained stay pending, in order; dropped ones stay dropped.
- Versions: the checkpoint's version is held again. If the crashed learner had published later numbers, the same
  weights are published under the next unused number too, so no number ever names two different weights and
  samplers holding a lost version see a newer one and resync.
- Leases: only live ones (outstanding, expired, accepted) are loaded; finished ones stay in the database. Their
  clocks stood still while the learner was down (expiry moved by the time since the last committed event), so
  samplers can still deliver. The sampler registry is kept: samplers carry on with their ids.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heterorl.common import codec
from heterorl.common.config import flat_dict, from_flat, replace_flat, settings
from heterorl.server import checkpoint as ckpt
from heterorl.server.config import LearnerConfig
from heterorl.server.db import DB_NAME, RunDB
from heterorl.server.leases import Lease, LeaseState
from heterorl.server.store import decode_group

if TYPE_CHECKING:
    from heterorl.server.learner import Learner

logger = logging.getLogger(__name__)

# Settings that define what the run's stored leases, groups and samplers mean; a resume may not change them.
RUN_IDENTITY = (
    "model", "task", "task_path", "task_options", "reward", "seed", "group_size", "max_new_tokens",
    "temperature", "top_p", "top_k", "stop", "max_prompt_tokens", "reward_weights", "format_pattern",
    "question_column", "answer_column", "id_column", "eval_path", "eval_fraction", "data_format", "data_split",
    "system_prompt",
)
# Settings of the process rather than the run: a resumed learner takes them from its own command line.
# Also how many ranks train: a run written by N ranks resumes on any number.
PER_PROCESS = {"log_level", "log_format", "nproc", "collective_timeout_s"}


@dataclass
class RunPlan:
    """A checked start: the effective config, and the opened database of the run to resume (None: fresh run)."""

    config: LearnerConfig
    db: RunDB | None


def plan_run(requested: LearnerConfig, explicit: set[str] | None = None) -> RunPlan:
    """Check RUN_DIR and, for a resume, merge the stored config with `requested`.

    `explicit` names the settings given on the command line or in the TOML file; they are applied on top of the
    stored config. None means all of `requested` is meant. ValueError for a wrong directory or a forbidden change.
    """
    run_dir, resume = requested.run.run_dir, requested.durability.resume
    if resume is None and requested.durability.resume_existing and (run_dir / DB_NAME).exists():
        requested, resume = replace_flat(requested, resume=run_dir), run_dir
    if resume is None:
        if (run_dir / DB_NAME).exists():
            raise ValueError(f"{run_dir} already holds a run ({DB_NAME}); continue it with --resume "
                             f"{run_dir}, or choose another --run-dir")
        return RunPlan(requested, None)
    if (explicit is None or "run_dir" in explicit) and run_dir.resolve() != resume.resolve():
        raise ValueError(f"--run-dir {run_dir} and --resume {resume} name different runs; give only --resume "
                         f"{resume} to continue that run")
    if not (resume / DB_NAME).exists():
        raise ValueError(f"--resume {resume}: there is no run to resume ({DB_NAME} is missing); start a new run "
                         f"there with --run-dir {resume} instead of --resume")
    db = RunDB.open(resume / DB_NAME)  # refuses a database of another schema, by name
    try:
        config = _merged(db.stored_config(), requested, explicit, resume)
        if config.durability.db_sync != "full":
            db.set_synchronous(config.durability.db_sync)
    except BaseException:
        db.close()
        raise
    return RunPlan(config, db)


def _merged(stored: dict[str, Any], requested: LearnerConfig, explicit: set[str] | None, run_dir: Path
            ) -> LearnerConfig:
    """The stored (flat) config, with the settings given now on top; logging is always this process's own."""
    names = set(settings(LearnerConfig))
    base = from_flat(LearnerConfig, **{k: v for k, v in stored.items() if k in names and k != "resume"})
    given = names if explicit is None else (explicit & names) | PER_PROCESS
    now, was = flat_dict(requested), flat_dict(base)
    changes = {name: now[name] for name in sorted(given - {"resume", "run_dir"})}
    for name in RUN_IDENTITY:
        if name in changes and changes[name] != was.get(name):
            raise ValueError(f"--resume cannot change {name} (the run has {was.get(name)!r}, asked for "
                             f"{changes[name]!r}); leave --{name.replace('_', '-')} out to continue the run "
                             f"as it was, or start a new run with another --run-dir")
    if "port" not in given and base.serve.port == 0:  # the address its samplers know (RUN_DIR/learner.json)
        try:
            changes["port"] = int(json.loads((run_dir / "learner.json").read_text())["port"])
        except (OSError, ValueError, KeyError):
            pass  # never served: any free port will do
    return replace_flat(base, **changes, run_dir=run_dir, resume=run_dir)


def restore(learner: Learner) -> None:
    """Rebuild a resumed learner's state from its database and checkpoint (see the module docstring)."""
    config, db, trainer = learner.config, learner.db, learner.trainer
    began = time.perf_counter()
    first = db.load()
    row = first.checkpoint
    step = row.step if row is not None else 0
    keep = None
    version, digest = 1, first.versions.get(1)
    if row is not None:  # loaded (and verified) before anything in the database changes
        keep = config.run.run_dir / row.path
        trainer.load_state(keep, row.manifest)  # any rank count may have written it; lr and weight decay: now's
        trainer.step = learner.checkpoint_step = row.step
        version, digest = row.version, row.weights_sha256
    snapshot = trainer.snapshot()
    got = codec.digest(snapshot, like=digest)  # in the algorithm the run recorded (legacy sha256 runs too)
    if digest is not None and got != digest:
        raise ckpt.CheckpointError(
            f"the weights of step {step} hash to {got[:16]}..., but version {version} was published as "
            f"{digest[:16]}...; the checkpoint does not belong to this run's database")
    retrained = db.rewind(step).wait()
    state = db.load()
    learner.run_id = state.run_id
    ckpt.remove_others(config.run.run_dir / ckpt.TRAIN_STATE_DIR, keep)  # unfinished or unrecorded directories
    if digest is None:  # the learner died before it recorded its first version
        db.record_version(version, step, got).wait()
    learner.versions.publish(version, snapshot, got)
    if state.newest_version > version:
        version = state.newest_version + 1
        db.record_version(version, step, got).wait()
        learner.versions.publish(version, snapshot, got)

    now = time.time()
    downtime = max(0.0, now - state.last_seen_alive)
    pending = [decode_group(g.data, lease_id=g.lease_id, sampler_id=g.sampler_id, prompt_index=g.prompt_index,
                            policy_version=g.policy_version, accepted_at=g.accepted_at) for g in state.pending]
    prompts = {g.lease_id: g.prompt_token_ids for g in pending}
    task, encode = learner.inputs.task, learner.inputs.encode
    leases = []
    for r in state.live_leases:
        problem = task.train_problem(r.prompt_index)
        waiting = r.state is not LeaseState.ACCEPTED  # may still be submitted, or leased again
        leases.append(Lease(
            lease_id=r.lease_id, serial=r.serial, prompt_index=r.prompt_index, problem=problem,
            prompt_token_ids=encode(problem) if waiting else prompts.get(r.lease_id, []), sampler_id=r.sampler_id,
            issued_at=r.issued_at, expires_at=r.expires_at + downtime if r.state is LeaseState.OUTSTANDING
            else r.expires_at, state=r.state,
        ))
    with learner.lock:
        learner.leases.restore(leases, state.lease_counts, state.next_prompt_index, state.next_serial, now)
        for group in pending:
            learner.store.add(group)
        learner.registry.restore(state.samplers, {sid: (c.leased, c.accepted)
                                                  for sid, c in state.sampler_leases.items()})
        counts = learner.leases.counts()
    rolled_back = rewind_metrics(learner, row.metrics_bytes if row is not None else 0)
    learner.metrics.write({
        "kind": "resume", "step": trainer.step, "version": learner.version,
        "checkpoint": row.path if row is not None else None, "retrained_groups": retrained,
        "pending_groups": len(pending), "leases_outstanding": counts[LeaseState.OUTSTANDING.value],
        "metrics_rolled_back_bytes": rolled_back, "downtime_s": downtime, "time": now,
    })
    logger.info(
        "resumed run %s at step %d from %s (weights %s verified); version %d; %d groups pending (%d trained after "
        "the checkpoint, to train again); %d leases outstanding; %d samplers known; %.2fs", learner.run_id,
        trainer.step, row.path if row is not None else "its starting weights", got[:16], learner.version,
        len(pending), retrained, counts[LeaseState.OUTSTANDING.value], len(learner.registry),
        time.perf_counter() - began)


def rewind_metrics(learner: Learner, keep_bytes: int) -> int:
    """Cut metrics.jsonl back to its size at the checkpoint (moving the rest to metrics.rolledback.jsonl) and
    replay what stays into the run's running figures; returns the bytes moved."""
    path = learner.metrics.path
    data = path.read_bytes() if path.exists() else b""
    if len(data) < keep_bytes:
        logger.warning("%s is shorter than at the checkpoint (%d < %d bytes); keeping it all", path, len(data),
                       keep_bytes)
        keep_bytes = len(data)
    tail = data[keep_bytes:]
    if tail:
        with open(learner.config.run.run_dir / "metrics.rolledback.jsonl", "ab") as fh:
            fh.write(tail if tail.endswith(b"\n") else tail + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "r+b") as fh:
            fh.truncate(keep_bytes)
            os.fsync(fh.fileno())
    learner.stats.replay(data[:keep_bytes].decode("utf-8", errors="replace"))
    return len(tail)
