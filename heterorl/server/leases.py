"""Prompt leases: the learner owns every prompt it hands out until the group comes back or the lease expires.

A prompt is leased to one sampler with an expiry. Every lease is in one of the states of `LeaseState`, the same
words in memory and in the run database:

    outstanding --(expiry passes)--> expired --(its prompt is leased again)--> released
         |                              |
         +-------(group accepted)-------+--> accepted --> trained | dropped

An expired lease can still be accepted late, as long as its prompt has not been leased again. `trained`,
`dropped` and `released` are final: such a lease leaves memory and lives on in the database only.

`LeaseBook` is the one path for every change of state: each method changes memory and queues the same change to
the run database (`LeaseJournal`, implemented by `heterorl.server.db.RunDB`) in the same call, and returns the
database's ticket for the caller to wait on outside its lock. The cost of each call is proportional to what it
changes: outstanding leases sit in a heap by expiry, and state counts are counters.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import grpc

from heterorl.common.contract import Reason
from heterorl.common.tasks import Problem
from heterorl.server.errors import Refused

logger = logging.getLogger(__name__)


class LeaseState(str, enum.Enum):
    OUTSTANDING = "outstanding"  # with a sampler, not yet overdue
    EXPIRED = "expired"          # overdue; its prompt waits to be leased again; a late group is still accepted
    RELEASED = "released"        # expired and its prompt was leased again: a late group is refused
    ACCEPTED = "accepted"        # group stored, waiting to be trained
    TRAINED = "trained"
    DROPPED = "dropped"          # accepted but not trained: too stale, or held aside by the trust checks


LIVE_STATES = (LeaseState.OUTSTANDING, LeaseState.EXPIRED, LeaseState.ACCEPTED)  # kept in memory
DONE_STATES = (LeaseState.ACCEPTED, LeaseState.TRAINED, LeaseState.DROPPED)  # a group came back for it


class Ticket(Protocol):
    def wait(self) -> object: ...


class LeaseJournal(Protocol):
    """Where the book writes each change it makes (the run database); every method queues and returns a ticket."""

    def issue_leases(self, leases: list[Lease], released: list[str]) -> Ticket: ...
    def expire_leases(self, lease_ids: list[str]) -> Ticket: ...
    def accept_group(self, group: object) -> Ticket: ...
    def finish_leases(self, lease_ids: list[str], state: LeaseState, step: int) -> Ticket: ...
    def lease_owner_and_state(self, lease_id: str) -> tuple[str, LeaseState] | None: ...


@dataclass(slots=True)
class Lease:
    lease_id: str
    serial: int        # issue order; the number inside the lease id
    prompt_index: int  # position in the task's train stream: the identity of this prompt instance
    problem: Problem
    prompt_token_ids: list[int]
    sampler_id: str
    issued_at: float
    expires_at: float
    state: LeaseState = LeaseState.OUTSTANDING
    reissue_of: str | None = None  # the expired lease whose prompt this one took over
    batch: int = 1  # leases issued with it in one LeasePrompts reply (scheduling.py measures per batch)


@dataclass(frozen=True)
class BookSize:
    """How much the book holds in memory: live leases only, whatever the run's length."""

    live: int           # outstanding, expired and accepted leases
    expiry_heap: int    # entries of the expiry heap (outstanding leases, plus a bounded number of stale ones)
    requeued: int       # expired leases whose prompt waits to be leased again


def judge(lease_id: str, sampler_id: str, owner: str, state: LeaseState) -> bool:
    """May a group from `sampler_id` be taken for a lease of `owner` in `state`? True: it is a duplicate of an
    accepted group; False: accept it. Refused otherwise. The one rule, for leases in memory and in the database."""
    if owner != sampler_id:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"lease {lease_id} belongs to another sampler",
                      Reason.LEASE_NOT_OWNED)
    if state in DONE_STATES:
        return True
    if state is LeaseState.RELEASED:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                      f"lease {lease_id} expired and its prompt was leased again", Reason.LEASE_RELEASED)
    return False


def unknown_lease(lease_id: str) -> Refused:
    return Refused(grpc.StatusCode.NOT_FOUND, f"unknown lease id {lease_id!r}", Reason.LEASE_UNKNOWN)


class LeaseBook:
    """The live leases of a run and counters of all of them. Not thread-safe: the learner holds its lock."""

    def __init__(self, problem_at: Callable[[int], Problem], encode: Callable[[Problem], list[int]], ttl_s: float,
                 journal: LeaseJournal, max_prompt_tokens: int = 0):
        self.problem_at = problem_at  # the task's deterministic train stream
        self.encode = encode
        self.ttl_s = ttl_s
        self.journal = journal
        self.max_prompt_tokens = max_prompt_tokens  # longer prompts of the stream are skipped (0: no limit)
        self.prompts_too_long = 0  # prompts skipped for their length
        self.next_index = 0  # the next fresh prompt of the stream
        self._serial = itertools.count(1)
        self._live: dict[str, Lease] = {}
        self._expiry: list[tuple[float, int, str]] = []  # (expires_at, serial, lease id) of outstanding leases
        self._requeued: deque[str] = deque()  # expired leases in expiry order; skipped once no longer expired
        self._counts = {state: 0 for state in LeaseState}  # every lease of the run, by state
        self._held: dict[str, int] = {}  # outstanding leases per sampler
        self.on_expire: Callable[[Lease], None] | None = None  # told of every lease that expires (scheduling)

    # ---- views -------------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {state.value: n for state, n in self._counts.items()}

    def count(self, state: LeaseState) -> int:
        return self._counts[state]

    def outstanding(self) -> int:
        return self._counts[LeaseState.OUTSTANDING]

    def held(self, sampler_id: str) -> int:
        """Outstanding leases of one sampler."""
        return self._held.get(sampler_id, 0)

    def get(self, lease_id: str) -> Lease | None:
        """A live lease (outstanding, expired or accepted); None if finished or unknown."""
        return self._live.get(lease_id)

    def in_memory(self) -> BookSize:
        return BookSize(len(self._live), len(self._expiry), len(self._requeued))

    # ---- changes: each one in memory and queued to the journal -------------------------------------------------

    def _move(self, lease: Lease, state: LeaseState) -> None:
        self._counts[lease.state] -= 1
        self._counts[state] += 1
        if lease.state is LeaseState.OUTSTANDING:
            self._unhold(lease.sampler_id)
        lease.state = state
        if state not in LIVE_STATES:
            del self._live[lease.lease_id]

    def expire_overdue(self, now: float) -> int:
        """Expire the outstanding leases whose time ran out; costs what expires, not what is outstanding."""
        expired = []
        while self._expiry and self._expiry[0][0] <= now:
            _, _, lease_id = heapq.heappop(self._expiry)
            lease = self._live.get(lease_id)
            if lease is not None and lease.state is LeaseState.OUTSTANDING and lease.expires_at <= now:
                self._move(lease, LeaseState.EXPIRED)
                self._requeued.append(lease_id)
                expired.append(lease_id)
                if self.on_expire is not None:
                    self.on_expire(lease)
        if expired:
            self.journal.expire_leases(expired)  # nobody waits: the next commit takes it along
        return len(expired)

    def issue(self, sampler_id: str, n: int, now: float, ttl_s: float | None = None) -> tuple[list[Lease], Ticket | None]:
        """Lease up to n prompts, each for `ttl_s` (default: the book's): first those whose leases expired, then
        fresh ones from the task."""
        ttl_s = self.ttl_s if ttl_s is None else ttl_s
        self.expire_overdue(now)
        issued: list[Lease] = []
        released: list[str] = []
        while len(issued) < n:
            old = self._next_requeued()
            if old is not None:
                self._move(old, LeaseState.RELEASED)
                released.append(old.lease_id)
                index, problem, tokens = old.prompt_index, old.problem, old.prompt_token_ids
            else:
                index, problem, tokens = self._next_fresh()
            serial = next(self._serial)
            lease = Lease(
                lease_id=f"L{serial}-{uuid.uuid4().hex[:12]}", serial=serial, prompt_index=index, problem=problem,
                prompt_token_ids=tokens, sampler_id=sampler_id, issued_at=now, expires_at=now + ttl_s,
                reissue_of=old.lease_id if old is not None else None, batch=n,
            )
            self._add(lease)
            issued.append(lease)
        return issued, (self.journal.issue_leases(issued, released) if issued else None)

    def _next_requeued(self) -> Lease | None:
        while self._requeued:
            lease = self._live.get(self._requeued.popleft())
            if lease is not None and lease.state is LeaseState.EXPIRED:
                return lease
        return None

    def _next_fresh(self) -> tuple[int, Problem, list[int]]:
        """The next prompt of the stream that fits `max_prompt_tokens`; longer ones are skipped and counted."""
        for _ in range(100_000):
            index = self.next_index
            self.next_index += 1
            problem = self.problem_at(index)
            tokens = self.encode(problem)
            if not self.max_prompt_tokens or len(tokens) <= self.max_prompt_tokens:
                return index, problem, tokens
            self.prompts_too_long += 1
            if self.prompts_too_long == 1 or self.prompts_too_long % 1000 == 0:
                logger.warning("prompt %d has %d tokens, over max_prompt_tokens %d: skipped (%d so far)", index,
                               len(tokens), self.max_prompt_tokens, self.prompts_too_long)
        raise RuntimeError(f"100000 prompts in a row are longer than max_prompt_tokens {self.max_prompt_tokens}")

    def _add(self, lease: Lease) -> None:
        self._live[lease.lease_id] = lease
        self._counts[lease.state] += 1
        if lease.state is LeaseState.OUTSTANDING:
            heapq.heappush(self._expiry, (lease.expires_at, lease.serial, lease.lease_id))
            self._held[lease.sampler_id] = self._held.get(lease.sampler_id, 0) + 1
        elif lease.state is LeaseState.EXPIRED:
            self._requeued.append(lease.lease_id)

    def check_submittable(self, lease_id: str, sampler_id: str) -> tuple[Lease | None, bool]:
        """(live lease, duplicate) for a group of `lease_id` from `sampler_id`; Refused when it must be refused.

        (None, False): the lease is not in memory; `check_finished` asks the database (outside the lock).
        """
        lease = self._live.get(lease_id)
        if lease is None:
            return None, False
        return lease, judge(lease_id, sampler_id, lease.sampler_id, lease.state)

    def check_finished(self, lease_id: str, sampler_id: str) -> bool:
        """For a lease not in memory: True (a duplicate of a group accepted earlier) or Refused. Reads the
        database, so call it without holding the learner's lock."""
        found = self.journal.lease_owner_and_state(lease_id)
        if found is None:
            raise unknown_lease(lease_id)
        owner, state = found
        if state in LIVE_STATES and state is not LeaseState.ACCEPTED:
            raise RuntimeError(f"lease {lease_id} is {state.value} in the database but not in memory")
        return judge(lease_id, sampler_id, owner, state)

    def accept(self, lease: Lease, group: object) -> Ticket:
        """Accept the group of a checked lease (a late, expired-but-not-released lease is revived)."""
        if lease.state not in (LeaseState.OUTSTANDING, LeaseState.EXPIRED):
            raise RuntimeError(f"lease {lease.lease_id} accepted from state {lease.state.value}")
        self._move(lease, LeaseState.ACCEPTED)
        self._compact()
        return self.journal.accept_group(group)

    def finish(self, lease_ids: list[str], trained: bool, step: int) -> Ticket | None:
        """Accepted leases trained (or dropped) at optimizer step `step`; they leave memory."""
        state = LeaseState.TRAINED if trained else LeaseState.DROPPED
        for lease_id in lease_ids:
            lease = self._live.get(lease_id)
            if lease is None or lease.state is not LeaseState.ACCEPTED:
                where = lease.state.value if lease is not None else "not live"
                raise RuntimeError(f"lease {lease_id} finished from state {where}")
        for lease_id in lease_ids:
            self._move(self._live[lease_id], state)
        return self.journal.finish_leases(list(lease_ids), state, step) if lease_ids else None

    def _unhold(self, sampler_id: str) -> None:
        left = self._held[sampler_id] - 1
        if left:
            self._held[sampler_id] = left
        else:
            del self._held[sampler_id]

    def _compact(self) -> None:
        """Drop heap entries of leases no longer outstanding once they outnumber the outstanding ones."""
        if len(self._expiry) > 2 * self._counts[LeaseState.OUTSTANDING] + 64:
            self._expiry = [e for e in self._expiry if (l := self._live.get(e[2])) is not None
                            and l.state is LeaseState.OUTSTANDING]
            heapq.heapify(self._expiry)

    # ---- resume --------------------------------------------------------------------------------------------------

    def restore(self, live: Iterable[Lease], counts: dict[LeaseState, int], next_index: int, next_serial: int,
                now: float) -> None:
        """Load a resumed run into an empty book: its live leases (in issue order), the counts of all its leases,
        where the prompt stream and the lease ids continue; leases overdue at `now` expire here."""
        if self._live or any(self._counts.values()):
            raise RuntimeError("restore needs an empty lease book")
        for lease in sorted(live, key=lambda l: l.serial):
            self._add(lease)
        for state in LeaseState:
            if state not in LIVE_STATES:
                self._counts[state] = counts.get(state, 0)
        self.next_index = next_index
        self._serial = itertools.count(next_serial)
        self.expire_overdue(now)
