"""100,000 leases through the lease book: memory and the cost of a lease call stay flat as the run gets longer.

Finished leases leave memory (the run database keeps them), expiry looks only at what expires, and counts are
counters; so the figures at 1k, 10k and 100k leases of history are the same. Run with `-s` to see them.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

from heterorl.common.tasks import Problem
from heterorl.server.leases import LeaseBook

from test_leases import MemoryJournal

MARKS = (1_000, 10_000, 100_000)
WINDOW = 1_000  # lease calls timed at each mark
BATCH = 16


class ForgetfulJournal(MemoryJournal):
    """Accepts every change and keeps none of it (the database's memory is not the book's)."""

    def issue_leases(self, leases, released):
        return self

    def expire_leases(self, lease_ids):
        return self

    def accept_group(self, group):
        return self

    def finish_leases(self, lease_ids, state, step):
        return self

    def wait(self):
        return None


def test_a_hundred_thousand_leases_keep_memory_and_call_cost_flat():
    problems = [Problem(id=str(i), question=f"q{i}", answer=str(i)) for i in range(64)]
    book = LeaseBook(problem_at=lambda i: problems[i % 64], encode=lambda p: [1, 2, 3], ttl_s=5.0,
                     journal=ForgetfulJournal())
    now = 0.0
    pushed = 0
    figures = []

    def cycle() -> int:
        """One round as a sampler and the trainer make it: lease a batch, return most of it, train what came back;
        one lease in eight is never returned and expires. Returns the number of book calls made."""
        nonlocal now, pushed
        now += 0.05
        leases, _ = book.issue("s", BATCH, now)
        made = 1
        returned = [l for l in leases if l.serial % 8]
        for lease in returned:
            found, duplicate = book.check_submittable(lease.lease_id, "s")
            book.accept(found, lease.lease_id)
            made += 2
        book.finish([l.lease_id for l in returned], trained=True, step=1)
        book.expire_overdue(now)
        pushed += len(leases)
        return made + 2

    tracemalloc.start()
    try:
        for mark in MARKS:
            while pushed < mark:
                cycle()
            gc.collect()
            memory = tracemalloc.get_traced_memory()[0]
            made, started = 0, time.perf_counter()
            while made < WINDOW:
                made += cycle()
            per_call_us = (time.perf_counter() - started) / made * 1e6
            figures.append((mark, memory, per_call_us, book.in_memory()))
    finally:
        tracemalloc.stop()
    for mark, memory, us, size in figures:
        print(f"\nlease book after {mark:>7,} leases: {memory / 1024:8.1f} KiB traced, {us:6.2f} us/call, "
              f"in memory: {size.live} live, {size.expiry_heap} heap entries, {size.requeued} requeued")
    counts = book.counts()
    assert sum(counts.values()) >= MARKS[-1]
    assert counts["trained"] > 0.8 * MARKS[-1] and counts["released"] > 0.05 * MARKS[-1]
    (_, mem_1k, us_1k, size_1k), *_, (_, mem_100k, us_100k, size_100k) = figures
    assert size_100k.live <= 4 * BATCH * 8 and size_100k.expiry_heap <= 4 * BATCH * 8 + 64
    assert mem_100k < 2 * mem_1k + 256 * 1024, "memory grows with the length of the run"
    assert us_100k < 5 * us_1k, "a lease call costs more as the run gets longer"
