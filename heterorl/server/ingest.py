"""Prompts out, groups in: leasing, and taking a validated group (lease check -> re-score -> store).

The learner's lock guards memory only. Re-scoring (decoding the completions and running the run's reward) happens
outside it, between two lease checks under it, so gRPC workers and the trainer never wait on user code; every
change reaches the run database through `LeaseBook`, and a caller is answered only once its change is committed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from heterorl.common.contract import Reason
from heterorl.server.commits import DurabilityError, Ticket
from heterorl.server.errors import Refused
from heterorl.server.leases import Lease, LeaseBook
from heterorl.server.registry import Registry
from heterorl.server.rewards import Scorer
from heterorl.server.scheduling import Scheduler, SchedulingConfig
from heterorl.server.store import StoredCompletion, StoredGroup, TrajectoryStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """A validated TrajectoryGroup, in the learner's own types."""

    sampler_id: str
    lease_id: str
    policy_version: int
    completions: list[tuple[list[int], list[float], int, float | None]]  # tokens, logprobs, finish, claimed reward
    generation_seconds: float = 0.0  # what the sampler says generating its batch took (scheduling only)


def committed(ticket: Ticket | None) -> None:
    """Wait for a queued change to commit; if the database failed, refuse with UNAVAILABLE (samplers keep the
    work and retry, and the learner stops: a restart resumes from what was committed)."""
    if ticket is None:
        return
    try:
        ticket.wait()
    except DurabilityError as err:
        raise Refused(grpc.StatusCode.UNAVAILABLE, f"the learner cannot store its state and is stopping: {err}",
                      Reason.LEARNER_STOPPING) from None


class Ingest:
    def __init__(self, lock: threading.Lock, groups_ready: threading.Condition, registry: Registry,
                 book: LeaseBook, store: TrajectoryStore, scorer: Scorer, decode: Callable[[list[int]], str],
                 inflight_limit: int, scheduler: Scheduler | None = None,
                 newest: Callable[[], int] | None = None):
        self.lock = lock
        self.groups_ready = groups_ready
        self.registry = registry
        self.book = book
        self.store = store
        self.scorer = scorer
        self.decode = decode
        self.inflight_limit = inflight_limit
        self.accepting: dict[str, Ticket] = {}  # lease id -> commit of its group, until that commit is waited for
        # How many leases each call gets, and for how long (scheduling.py); uniform unless told otherwise.
        self.scheduler = scheduler or Scheduler(SchedulingConfig(policy="uniform", ttl_s=book.ttl_s,
                                                                 window=inflight_limit))
        self.newest = newest
        book.on_expire = lambda lease: self.scheduler.expired(lease.sampler_id)

    def lease(self, sampler_id: str, max_groups: int) -> list[Lease]:
        """Up to max_groups new leases, fewer when enough work is already in flight (flow control)."""
        with self.lock:
            record = self.registry.touch(sampler_id)
            now = time.time()
            self.book.expire_overdue(now)
            if self.newest is not None:
                self.scheduler.observe_version(self.newest(), now)
            room = self.inflight_limit - self.book.outstanding() - len(self.store)
            plan = self.scheduler.plan(sampler_id, max_groups, record.max_batch, room, self.book.held(sampler_id),
                                       now)
            leases, ticket = self.book.issue(sampler_id, plan.n, now, plan.ttl_s) if plan.n else ([], None)
            record.groups_leased += len(leases)
        committed(ticket)  # a lease reaches its sampler only once committed
        return leases

    def retry_after(self) -> float:
        """LeaseReply.retry_after_s for a reply without leases (scheduling.py; 0 = no hint)."""
        with self.lock:
            return self.scheduler.retry_after(time.time())

    def submit(self, submission: Submission) -> bool:
        """Store a validated group; True if it duplicates an acknowledged one. Returns once the group is committed
        (the caller acknowledges it then); a duplicate arriving while the first copy's commit is still under way
        waits for that commit too."""
        sid, lease_id = submission.sampler_id, submission.lease_id
        with self.lock:
            self.registry.touch(sid)
            lease, duplicate = self.book.check_submittable(lease_id, sid)
            ticket = self.accepting.get(lease_id) if duplicate else None
        if lease is None:
            return self.book.check_finished(lease_id, sid)  # not in memory: the database knows
        if duplicate:
            committed(ticket)
            return True
        scored = self._score(submission, lease.problem.answer)  # outside the lock: user code
        with self.lock:
            record = self.registry.touch(sid)
            lease, duplicate = self.book.check_submittable(lease_id, sid)  # anything may have happened meanwhile
            if lease is not None and not duplicate:
                group = StoredGroup(
                    lease_id=lease_id, sampler_id=sid, prompt_index=lease.prompt_index,
                    prompt_token_ids=lease.prompt_token_ids, policy_version=submission.policy_version,
                    completions=scored, accepted_at=time.time(),
                )
                # Queued under the lock, so it commits before the step that trains the group is recorded.
                ticket = self.accepting[lease_id] = self.book.accept(lease, group)
                self.scheduler.returned(sid, lease.issued_at, lease.batch, group.accepted_at,
                                        submission.generation_seconds)
                self.store.add(group)
                record.groups_accepted += 1
                record.version = max(record.version, submission.policy_version)
                record.reward_disagreements += sum(
                    c.sampler_reward is not None and abs(c.sampler_reward - c.reward) > 1e-6 for c in scored)
                self.groups_ready.notify_all()
            else:
                ticket = self.accepting.get(lease_id) if duplicate else None
        if lease is None:
            return self.book.check_finished(lease_id, sid)
        try:
            committed(ticket)
        finally:
            if not duplicate:
                with self.lock:
                    self.accepting.pop(lease_id, None)
        return duplicate

    def _score(self, submission: Submission, answer: str) -> tuple[StoredCompletion, ...]:
        texts = [self.decode(tokens) for tokens, _, _, _ in submission.completions]
        rewards = self.scorer.score(texts, answer)
        return tuple(StoredCompletion(tokens, logprobs, finish, reward, claimed)
                     for (tokens, logprobs, finish, claimed), reward in zip(submission.completions, rewards))
