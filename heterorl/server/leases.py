"""Prompt leases: the learner owns every prompt it hands out until the group comes back or the lease expires.

A prompt is leased to one sampler with an expiry. When the sampler returns the group in time, the lease is
*accepted* (then *trained*, or *dropped* as too stale). When the lease expires, its prompt goes back to a queue
and is leased again under a new lease id; the old lease can still be accepted late as long as its prompt has not
been handed out again. Every lease ends in exactly one state, which is what the accounting tests check.

The book lives in memory; the learner commits every change that matters after a crash (issue, re-issue,
acceptance, training) to the run database, and `restore` rebuilds the book from it when a run is resumed.
"""

from __future__ import annotations

import enum
import itertools
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from heterorl.common.tasks import Problem


class LeaseState(enum.Enum):
    OUTSTANDING = "outstanding"  # with a sampler
    ACCEPTED = "accepted"        # group stored, waiting to be trained
    TRAINED = "trained"
    DROPPED = "dropped"          # accepted but too stale to train (counted, never silent)
    EXPIRED = "expired"          # ran out of time; its prompt was queued for another lease


class LeaseError(Exception):
    """A lease operation refused; `code` names the gRPC status the service answers with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Lease:
    lease_id: str
    prompt_index: int  # position in the task's train stream: the identity of this prompt instance
    problem: Problem
    prompt_token_ids: list[int]
    sampler_id: str
    issued_at: float
    expires_at: float
    state: LeaseState = LeaseState.OUTSTANDING
    reissued: bool = False  # the prompt of this (expired) lease has been leased again
    reissue_of: str | None = None  # the expired lease whose prompt this one took over


def lease_serial(lease_id: str) -> int:
    """The issue counter inside a lease id `L<serial>-<random>` (ids are made by `LeaseBook.issue`)."""
    head, sep, _ = lease_id.partition("-")
    if not sep or not head.startswith("L") or not head[1:].isdigit():
        raise ValueError(f"not a lease id of this learner: {lease_id!r}")
    return int(head[1:])


@dataclass
class LeaseBook:
    """All leases of a run. Not thread-safe: the service serialises access with its own lock."""

    problem_at: Callable[[int], Problem]  # the task's deterministic train stream
    encode: Callable[[Problem], list[int]]
    ttl_s: float
    next_index: int = 0  # the next fresh prompt of the stream
    leases: dict[str, Lease] = field(default_factory=dict)
    _requeued: deque[str] = field(default_factory=deque)  # lease ids whose prompt must be leased again
    _serial: itertools.count = field(default_factory=lambda: itertools.count(1))

    def count(self, state: LeaseState) -> int:
        return sum(1 for lease in self.leases.values() if lease.state is state)

    def counts(self) -> dict[str, int]:
        out = {state.value: 0 for state in LeaseState}
        for lease in self.leases.values():
            out[lease.state.value] += 1
        return out

    def expire_overdue(self, now: float) -> int:
        expired = 0
        for lease in self.leases.values():
            if lease.state is LeaseState.OUTSTANDING and lease.expires_at <= now:
                lease.state = LeaseState.EXPIRED
                self._requeued.append(lease.lease_id)
                expired += 1
        return expired

    def issue(self, sampler_id: str, n: int, now: float) -> list[Lease]:
        """Lease up to n prompts: first those whose leases expired, then fresh ones from the task."""
        self.expire_overdue(now)
        issued = []
        while len(issued) < n:
            index, problem, tokens, reissue_of = -1, None, None, None
            while self._requeued:
                old = self.leases[self._requeued.popleft()]
                if old.state is LeaseState.EXPIRED and not old.reissued:
                    old.reissued = True
                    index, problem, tokens, reissue_of = old.prompt_index, old.problem, old.prompt_token_ids, old.lease_id
                    break
            if problem is None:
                index = self.next_index
                problem = self.problem_at(index)
                tokens = self.encode(problem)
                self.next_index += 1
            lease = Lease(
                lease_id=f"L{next(self._serial)}-{uuid.uuid4().hex[:12]}",
                prompt_index=index,
                problem=problem,
                prompt_token_ids=tokens,
                sampler_id=sampler_id,
                issued_at=now,
                expires_at=now + self.ttl_s,
                reissue_of=reissue_of,
            )
            self.leases[lease.lease_id] = lease
            issued.append(lease)
        return issued

    def check_submittable(self, lease_id: str, sampler_id: str) -> tuple[Lease, bool]:
        """(lease, duplicate). Raises LeaseError when the group must be refused."""
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseError("NOT_FOUND", f"unknown lease id {lease_id!r}")
        if lease.sampler_id != sampler_id:
            raise LeaseError("PERMISSION_DENIED", f"lease {lease_id} belongs to another sampler")
        if lease.state in (LeaseState.ACCEPTED, LeaseState.TRAINED, LeaseState.DROPPED):
            return lease, True
        if lease.state is LeaseState.EXPIRED and lease.reissued:
            raise LeaseError(
                "FAILED_PRECONDITION", f"lease {lease_id} expired and its prompt was leased again"
            )
        return lease, False

    def accept(self, lease: Lease) -> None:
        """Mark a checked lease accepted; a late (expired, not yet re-leased) lease is revived."""
        lease.state = LeaseState.ACCEPTED
        # An expired lease may still sit in the requeue; `reissued` stays False and the queue skips it
        # because its state is no longer EXPIRED.

    def finish(self, lease_id: str, trained: bool) -> None:
        lease = self.leases[lease_id]
        if lease.state is not LeaseState.ACCEPTED:
            raise RuntimeError(f"lease {lease_id} finished from state {lease.state.value}")
        lease.state = LeaseState.TRAINED if trained else LeaseState.DROPPED

    def outstanding(self) -> int:
        return self.count(LeaseState.OUTSTANDING)

    def restore(self, leases: Iterable[Lease], now: float) -> None:
        """Load the leases of a resumed run into an empty book, in issue order.

        The prompt stream continues after the highest prompt ever leased, lease ids continue their counter, and
        leases that are overdue at `now` expire here, so their prompts are leased again first.
        """
        if self.leases:
            raise RuntimeError("restore needs an empty lease book")
        for lease in sorted(leases, key=lambda l: lease_serial(l.lease_id)):
            self.leases[lease.lease_id] = lease
        if self.leases:
            self.next_index = max(l.prompt_index for l in self.leases.values()) + 1
            self._serial = itertools.count(max(lease_serial(i) for i in self.leases) + 1)
        self.expire_overdue(now)
