"""Lease bookkeeping: expiry, re-issue, late acceptance and exactly-once accounting."""

from __future__ import annotations

import random

import pytest

from heterorl.common.tasks import Problem
from heterorl.server.leases import LeaseBook, LeaseError, LeaseState


def make_book(ttl=10.0) -> LeaseBook:
    def problem_at(i):
        return Problem(id=f"p{i % 5}", question=f"q{i % 5}", answer=str(i % 5))  # contents repeat, as in tasks

    return LeaseBook(problem_at=problem_at, encode=lambda p: [1, 2, 3], ttl_s=ttl)


def test_expired_prompt_is_reissued_under_a_new_lease():
    book = make_book(ttl=10)
    (first,) = book.issue("a", 1, now=0.0)
    assert book.expire_overdue(now=5.0) == 0
    (again,) = book.issue("b", 1, now=11.0)
    assert first.state is LeaseState.EXPIRED
    assert again.prompt_index == first.prompt_index and again.lease_id != first.lease_id
    with pytest.raises(LeaseError) as info:
        book.check_submittable(first.lease_id, "a")
    assert info.value.code == "FAILED_PRECONDITION"


def test_late_group_revives_a_lease_whose_prompt_was_not_reissued():
    book = make_book(ttl=10)
    (lease,) = book.issue("a", 1, now=0.0)
    book.expire_overdue(now=11.0)
    found, duplicate = book.check_submittable(lease.lease_id, "a")
    assert not duplicate
    book.accept(found)
    fresh = book.issue("b", 2, now=12.0)
    assert lease.prompt_index not in {l.prompt_index for l in fresh}


def test_ownership_duplicates_and_unknown():
    book = make_book()
    (lease,) = book.issue("a", 1, now=0.0)
    with pytest.raises(LeaseError) as info:
        book.check_submittable(lease.lease_id, "b")
    assert info.value.code == "PERMISSION_DENIED"
    with pytest.raises(LeaseError) as info:
        book.check_submittable("nope", "a")
    assert info.value.code == "NOT_FOUND"
    found, duplicate = book.check_submittable(lease.lease_id, "a")
    book.accept(found)
    assert book.check_submittable(lease.lease_id, "a")[1] is True
    book.finish(lease.lease_id, trained=True)
    assert book.check_submittable(lease.lease_id, "a")[1] is True
    with pytest.raises(RuntimeError):
        book.finish(lease.lease_id, trained=True)


def test_random_schedules_account_for_every_prompt_exactly_once():
    rng = random.Random(7)
    book = make_book(ttl=3)
    now = 0.0
    trained_prompts: list[int] = []
    for _ in range(2000):
        now += rng.random()
        action = rng.random()
        if action < 0.3:
            book.issue(rng.choice("abc"), rng.randint(1, 3), now)
        elif action < 0.7:
            candidates = [l for l in book.leases.values() if l.state in (LeaseState.OUTSTANDING, LeaseState.EXPIRED)]
            if candidates:
                lease = rng.choice(candidates)
                try:
                    found, duplicate = book.check_submittable(lease.lease_id, lease.sampler_id)
                except LeaseError:
                    continue
                if not duplicate:
                    book.accept(found)
        else:
            accepted = [l for l in book.leases.values() if l.state is LeaseState.ACCEPTED]
            for lease in accepted[: rng.randint(0, 4)]:
                book.finish(lease.lease_id, trained=True)
                trained_prompts.append(lease.prompt_index)
        book.expire_overdue(now)
    counts = book.counts()
    assert sum(counts.values()) == len(book.leases)
    assert len(trained_prompts) == len(set(trained_prompts)), "a prompt was trained twice"
    # A prompt is in flight at most once: among non-expired leases no prompt repeats.
    live = [l.prompt_index for l in book.leases.values() if l.state is not LeaseState.EXPIRED]
    assert len(live) == len(set(live))
