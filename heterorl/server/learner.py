"""The learner: one run's state, driven by the gRPC service on one side and the training loop on the other.

`Learner` is a thin facade over the modules that do the work, with the API the service uses:

    bootstrap.py  model, tokenizer, task, reward name, the files samplers need
    resume.py     fresh run or resumed run: every check, and rebuilding the state from the database
    ingest.py     leasing prompts; taking a group (lease check -> re-score outside the lock -> store)
    rewards.py    the run's reward, contained (user code may raise, hang or crash)
    leases.py     lease states, one vocabulary in memory and database, one path for every change
    registry.py   registered samplers and the typed status
    loop.py       the training loop: wait for B groups -> screen -> step -> publish -> evaluate/checkpoint

gRPC handlers call `register`, `lease`, `submit`, ... concurrently; `run` trains in the main thread. One lock
guards the in-memory state; the run database (db.py) is written in commit order and every answer that promises
something follows the commit that keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

from heterorl.common.config import to_dict
from heterorl.server import bootstrap, loop, resume
from heterorl.server.commits import DurabilityError
from heterorl.server.config import LearnerConfig
from heterorl.server.db import DB_NAME, RunDB
from heterorl.server.distributed import Ranks
from heterorl.server.ingest import Ingest, Submission, committed
from heterorl.server.leases import Lease, LeaseBook, LeaseState
from heterorl.server.metrics import LearnerMetrics
from heterorl.server.registry import LearnerStatus, Registry, SamplerRecord
from heterorl.server.reporting import Reports
from heterorl.server.rewards import Scorer
from heterorl.server.scheduling import Scheduler, SchedulingConfig
from heterorl.server.stats import MetricsLog, RunStats
from heterorl.server.store import StoredGroup, TrajectoryStore
from heterorl.server.trainer import Trainer, TrainerConfig
from heterorl.server.trust import TrustBook, Verifier
from heterorl.server.versions import VersionStore

__all__ = ["Learner", "Submission", "SamplerRecord"]

logger = logging.getLogger(__name__)


def trainer_config(config: LearnerConfig) -> TrainerConfig:
    """The trainer's settings out of the run's (every rank of a learner on several processes builds the same)."""
    return TrainerConfig(
        lr=config.train.lr, weight_decay=config.train.weight_decay, max_grad_norm=config.train.max_grad_norm,
        temperature=config.sampling.temperature, top_k=config.sampling.top_k, top_p=config.sampling.top_p,
        loss=config.loss.loss_config(), device=config.train.device, compute_dtype=config.train.compute_dtype,
        grad_checkpointing=config.train.grad_checkpointing, micro_batch_tokens=config.train.micro_batch_tokens,
    )


class Learner:
    def __init__(self, config: LearnerConfig | resume.RunPlan, ranks: Ranks | None = None):
        """`ranks`: this is rank 0 of a learner on several processes (heterorl.server.distributed)."""
        plan = config if isinstance(config, resume.RunPlan) else resume.plan_run(config)
        try:
            self._build(plan, ranks)
        except BaseException:
            db, scorer = getattr(self, "db", plan.db), getattr(self, "scorer", None)
            if db is not None:
                db.close()
            if scorer is not None:
                scorer.close()
            for telemetry in (getattr(self, "reports", None), getattr(self, "prometheus", None)):
                if telemetry is not None:
                    telemetry.close()
            raise

    def _build(self, plan: resume.RunPlan, ranks: Ranks | None) -> None:
        config = self.config = plan.config
        self.run_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        config.run.run_dir.mkdir(parents=True, exist_ok=True)
        self.inputs = bootstrap.load(config)
        self.scorer = Scorer(self.inputs.reward_name, config.run.reward_timeout_s)
        self.trainer = Trainer(self.inputs.model, self.inputs.pad_id, trainer_config(config), ranks=ranks)
        self.versions = VersionStore(keep=config.serve.keep_versions, chunk_bytes=config.serve.chunk_bytes)
        self.trust = TrustBook(config.trust.trust_config())
        self._verifier: Verifier | None = None
        self.db = plan.db or RunDB.create(config.run.run_dir / DB_NAME, self.run_id, to_dict(config, flat=True),
                                          config.durability.db_sync)
        self.lock = threading.Lock()
        self.groups_ready = threading.Condition(self.lock)
        self.leases = LeaseBook(problem_at=self.inputs.task.train_problem, encode=self.inputs.encode,
                                ttl_s=config.serve.lease_ttl_s, journal=self.db,
                                max_prompt_tokens=config.sampling.max_prompt_tokens)
        self.store = TrajectoryStore()
        self.registry = Registry()
        self.stats = RunStats()
        self.metrics = MetricsLog(config.run.run_dir / "metrics.jsonl")
        self.prometheus = LearnerMetrics(self)  # served on --metrics-port (heterorl/server/metrics.py)
        self.reports = Reports.open(config.report.report_to, config.run.run_dir, self.run_id,
                                    to_dict(config, flat=True))  # --report-to (heterorl/server/reporting.py)
        self.checkpoint_step = -1  # step of the newest recorded train-state checkpoint (-1: none)
        self.ingest = Ingest(self.lock, self.groups_ready, self.registry, self.leases, self.store, self.scorer,
                             self.inputs.decode, config.inflight_limit, newest=lambda: self.versions.newest,
                             scheduler=Scheduler(SchedulingConfig.from_serve(config.serve, config.inflight_limit)))
        if plan.db is not None:
            resume.restore(self)
        else:
            self.publish()  # version 1: the weights the run starts from
        self.metrics_port = 0  # where Prometheus metrics are served (0: not served)
        if config.report.metrics_port:
            self.metrics_port = self.prometheus.serve(config.report.metrics_host, config.report.metrics_port)

    # ---- what the service reads ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.versions.newest

    @property
    def vocab_size(self) -> int:
        return self.inputs.vocab_size

    @property
    def reward_name(self) -> str:
        return self.inputs.reward_name

    @property
    def sampler_task_options(self) -> str:
        return self.inputs.sampler_task_options

    @property
    def model_files(self) -> dict[str, bytes]:
        return self.inputs.model_files

    @property
    def verifier(self) -> Verifier:
        """Built on the first check: its own copy of the model, so it costs nothing until a group is checked."""
        if self._verifier is None:
            c = self.config.sampling
            self._verifier = Verifier(self.trainer.reference_model(), self.inputs.pad_id, c.temperature, c.top_k,
                                      c.top_p)
        return self._verifier

    # ---- what the service calls ------------------------------------------------------------------------------

    def register(self, name: str, engine: str, device: str, max_batch: int, principal: str = "") -> SamplerRecord:
        with self.lock:
            record = self.registry.new(name, engine, device, max_batch, principal)
            # committed with its principal: a resumed learner still knows whose id this is
            ticket = self.db.add_sampler(record.sampler_id, dataclasses.asdict(record))
        committed(ticket)  # the id is handed out only once a restarted learner would still know it
        logger.info("sampler %s registered: %s (%s on %s)", record.sampler_id, name, engine, device)
        return record

    def sampler(self, sampler_id: str) -> SamplerRecord:
        """The record of a registered sampler, touched as seen now; Refused(UNKNOWN_SAMPLER) otherwise."""
        with self.lock:
            return self.registry.touch(sampler_id)

    def lease(self, sampler_id: str, max_groups: int) -> list[Lease]:
        return self.ingest.lease(sampler_id, max_groups)

    def submit(self, submission: Submission) -> bool:
        return self.ingest.submit(submission)

    def count_rejection(self, sampler_id: str, reason) -> bool:
        """Count a refused request against a registered sampler; False if no such sampler."""
        with self.lock:
            return self.registry.count_rejection(sampler_id, reason)

    def heartbeat(self, sampler_id: str, version: int) -> None:
        with self.lock:
            self.registry.touch(sampler_id).version = version

    def status(self) -> LearnerStatus:
        now = time.time()
        with self.lock:
            counts = self.leases.counts()
            return LearnerStatus(
                run_id=self.run_id,
                version=self.version,
                step=self.trainer.step,
                groups_trained=counts[LeaseState.TRAINED.value],
                groups_pending=len(self.store),
                leases_outstanding=counts[LeaseState.OUTSTANDING.value],
                leases_expired=counts[LeaseState.EXPIRED.value] + counts[LeaseState.RELEASED.value],
                groups_dropped_stale=counts[LeaseState.DROPPED.value],
                samplers=self.registry.views(self.trust.samplers, now),
                uptime_s=now - self.started,
                last_reward_mean=self.stats.last_reward_mean,
                last_eval_accuracy=self.stats.last_eval_accuracy,
                task=self.config.run.task,
                loss=self.config.loss.loss,
                reward_disagreements=self.registry.total_disagreements(),
                groups_refused_reward=self.scorer.counts.refused,
            )

    # ---- public views for tools and tests ----------------------------------------------------------------------

    def lease_state(self, lease_id: str) -> LeaseState | None:
        """The state of any lease of this run (live ones from memory, finished ones from the database)."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is not None:
                return lease.state
        found = self.db.lease_owner_and_state(lease_id)
        return found[1] if found is not None else None

    def pending(self) -> tuple[StoredGroup, ...]:
        """The accepted groups waiting to be trained, in the order they will be trained."""
        with self.lock:
            return self.store.snapshot()

    # ---- the training side (loop.py) -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> dict:
        return loop.run(self, stop)

    def publish(self) -> None:
        loop.publish(self)

    def train_once(self, batch: list[StoredGroup]) -> dict:
        return loop.train_step(self, batch)

    def evaluate(self) -> float:
        return loop.evaluate(self)

    def write_train_state(self):
        return loop.write_train_state(self)

    def save_samplers(self) -> None:
        """Queue the samplers' counters to the database (committed with the next change)."""
        with self.lock:
            records = self.registry.records()
        self.db.save_samplers(records)

    def close(self) -> None:
        """Save the samplers' counters, close the run database and the reward workers; after the server stops."""
        if self.db.failed is None:
            with self.lock:
                records = self.registry.records()
            try:
                self.db.save_samplers(records).wait()
            except DurabilityError:
                pass
        self.db.close()
        self.scorer.close()
        self.reports.close()
        self.prometheus.close()
        self.trainer.close()  # releases the other ranks of a learner on several processes
