"""Lease bookkeeping: expiry, re-issue, late acceptance, exactly-once accounting, and one path to the journal."""

from __future__ import annotations

import random

import grpc
import pytest

from heterorl.common.contract import Reason
from heterorl.common.tasks import Problem
from heterorl.server.errors import Refused
from heterorl.server.leases import LIVE_STATES, LeaseBook, LeaseState


class Done:
    def wait(self):
        return None


class MemoryJournal:
    """What a run database would hold: lease id -> (owner, state), written only through the book's calls."""

    def __init__(self):
        self.rows: dict[str, tuple[str, LeaseState]] = {}

    def issue_leases(self, leases, released):
        for lease in leases:
            self.rows[lease.lease_id] = (lease.sampler_id, lease.state)
        for lease_id in released:
            assert self.rows[lease_id][1] is LeaseState.EXPIRED
            self.rows[lease_id] = (self.rows[lease_id][0], LeaseState.RELEASED)
        return Done()

    def expire_leases(self, lease_ids):
        for lease_id in lease_ids:
            assert self.rows[lease_id][1] is LeaseState.OUTSTANDING
            self.rows[lease_id] = (self.rows[lease_id][0], LeaseState.EXPIRED)
        return Done()

    def accept_group(self, group):
        owner, state = self.rows[group]
        assert state in (LeaseState.OUTSTANDING, LeaseState.EXPIRED)
        self.rows[group] = (owner, LeaseState.ACCEPTED)
        return Done()

    def finish_leases(self, lease_ids, state, step):
        for lease_id in lease_ids:
            assert self.rows[lease_id][1] is LeaseState.ACCEPTED
            self.rows[lease_id] = (self.rows[lease_id][0], state)
        return Done()

    def lease_owner_and_state(self, lease_id):
        return self.rows.get(lease_id)


def make_book(ttl=10.0, journal=None) -> LeaseBook:
    def problem_at(i):
        return Problem(id=f"p{i % 5}", question=f"q{i % 5}", answer=str(i % 5))  # contents repeat, as in tasks

    return LeaseBook(problem_at=problem_at, encode=lambda p: [1, 2, 3], ttl_s=ttl, journal=journal or MemoryJournal())


def refusal(call) -> Refused:
    with pytest.raises(Refused) as info:
        call()
    return info.value


def test_expired_prompt_is_reissued_under_a_new_lease_and_the_old_one_is_released():
    book = make_book(ttl=10)
    (first,), _ = book.issue("a", 1, now=0.0)
    assert book.expire_overdue(now=5.0) == 0
    (again,), _ = book.issue("b", 1, now=11.0)
    assert again.prompt_index == first.prompt_index and again.lease_id != first.lease_id
    assert book.get(first.lease_id) is None  # finished: it left memory
    assert book.journal.rows[first.lease_id][1] is LeaseState.RELEASED
    err = refusal(lambda: book.check_finished(first.lease_id, "a"))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.LEASE_RELEASED)


def test_late_group_revives_a_lease_whose_prompt_was_not_reissued():
    book = make_book(ttl=10)
    (lease,), _ = book.issue("a", 1, now=0.0)
    assert book.expire_overdue(now=11.0) == 1
    assert book.counts()["expired"] == 1 and book.outstanding() == 0  # flow control frees its room
    found, duplicate = book.check_submittable(lease.lease_id, "a")
    assert found is lease and not duplicate
    book.accept(found, lease.lease_id)
    fresh, _ = book.issue("b", 2, now=12.0)
    assert lease.prompt_index not in {l.prompt_index for l in fresh}


def test_ownership_duplicates_and_unknown():
    book = make_book()
    (lease,), _ = book.issue("a", 1, now=0.0)
    err = refusal(lambda: book.check_submittable(lease.lease_id, "b"))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.LEASE_NOT_OWNED)
    assert book.check_submittable("nope", "a") == (None, False)  # not in memory: ask the journal
    err = refusal(lambda: book.check_finished("nope", "a"))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, Reason.LEASE_UNKNOWN)
    found, _ = book.check_submittable(lease.lease_id, "a")
    book.accept(found, lease.lease_id)
    assert book.check_submittable(lease.lease_id, "a")[1] is True
    book.finish([lease.lease_id], trained=True, step=1)
    assert book.get(lease.lease_id) is None
    assert book.check_finished(lease.lease_id, "a") is True  # a resent group of a trained lease: duplicate
    err = refusal(lambda: book.check_finished(lease.lease_id, "b"))
    assert err.reason is Reason.LEASE_NOT_OWNED
    with pytest.raises(RuntimeError):
        book.finish([lease.lease_id], trained=True, step=2)


def test_overlong_prompts_are_skipped_and_counted():
    book = LeaseBook(problem_at=lambda i: Problem(id=str(i), question="x" * (i % 3), answer="0"),
                     encode=lambda p: [1] * (1 + len(p.question)), ttl_s=10, journal=MemoryJournal(),
                     max_prompt_tokens=2)
    leases, _ = book.issue("a", 4, now=0.0)
    assert all(len(l.prompt_token_ids) <= 2 for l in leases)
    assert book.prompts_too_long == 1 and [l.prompt_index for l in leases] == [0, 1, 3, 4]


def test_random_schedules_account_for_every_prompt_exactly_once_in_memory_and_journal():
    rng = random.Random(7)
    journal = MemoryJournal()
    book = make_book(ttl=3, journal=journal)
    now = 0.0
    trained_prompts: list[int] = []
    issued: list = []
    for _ in range(3000):
        now += rng.random()
        action = rng.random()
        if action < 0.3:
            issued += book.issue(rng.choice("abc"), rng.randint(1, 3), now)[0]
        elif action < 0.7 and issued:
            lease = rng.choice(issued[-30:])
            try:
                found, duplicate = book.check_submittable(lease.lease_id, lease.sampler_id)
                if found is None:
                    assert book.check_finished(lease.lease_id, lease.sampler_id) is True
                elif not duplicate:
                    book.accept(found, lease.lease_id)
            except Refused as err:
                assert err.reason is Reason.LEASE_RELEASED
        else:
            accepted = [l for l in issued[-60:] if book.get(l.lease_id) is not None
                        and book.get(l.lease_id).state is LeaseState.ACCEPTED]
            chosen = accepted[: rng.randint(0, 4)]
            book.finish([l.lease_id for l in chosen], trained=True, step=1)
            trained_prompts += [l.prompt_index for l in chosen]
        book.expire_overdue(now)
    counts = book.counts()
    assert sum(counts.values()) == len(journal.rows) == len(issued)
    # Memory and journal agree: the counters are the journal's states, and memory holds exactly the live ones.
    for state in LeaseState:
        assert counts[state.value] == sum(s is state for _, s in journal.rows.values()), state
    live = [i for i, (_, s) in journal.rows.items() if s in LIVE_STATES]
    assert book.in_memory().live == len(live) and all(book.get(i) is not None for i in live)
    assert len(trained_prompts) == len(set(trained_prompts)), "a prompt was trained twice"
    # A prompt is in flight at most once: among leases not released no prompt repeats.
    held = [l.prompt_index for l in issued if journal.rows[l.lease_id][1] is not LeaseState.RELEASED]
    assert len(held) == len(set(held))
