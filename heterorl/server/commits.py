"""Group commit for the run database: changes queued in order, committed in batches by whoever waits first.

A gRPC handler queues its change under the learner's lock (which fixes the order), releases the lock and waits
for the commit before it answers, so an acknowledgement always follows a commit. There is no commit thread: the
first waiter to find no commit under way commits everything queued so far in one transaction (each change in its
own savepoint); alone, a handler commits its own change with no hand-over between threads, and under load one
fsync serves many changes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DurabilityError(RuntimeError):
    """The database could not commit; the learner must stop rather than acknowledge what it cannot keep."""


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Ticket:
    """A queued change; `wait()` returns once it is committed (or raises why it was not)."""

    def __init__(self, queue: CommitQueue, job: _Job):
        self._queue = queue
        self._job = job

    def wait(self) -> Any:
        self._queue.commit_through(self._job)
        if self._job.error is not None:
            raise self._job.error
        return self._job.result

    @property
    def committed(self) -> bool:
        return self._job.done and self._job.error is None


class CommitQueue:
    """Thread-safe ordered queue of changes to one sqlite connection (used by one thread at a time)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, synchronous: str):
        self._conn = conn
        self.path = path
        self.synchronous = synchronous
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._committing = False
        self._closed = False
        self.failed: BaseException | None = None
        self.commits = 0  # transactions committed (each may hold many queued changes)

    def write(self, fn: Callable[[sqlite3.Connection], Any], durable: bool = False) -> Ticket:
        """Queue fn(connection) to run in commit order; `durable` forces it to disk whatever `synchronous` says.

        Cheap and never blocking, so callers queue under their own lock and wait for the commit after releasing
        it. Never raises: once nothing can be committed, the ticket is failed already.
        """
        job = _Job(fn, durable)
        with self._cond:
            if self.failed is not None or self._closed:
                why = f"failed earlier: {self.failed}" if self.failed is not None else "is closed"
                job.error = DurabilityError(f"the run database {self.path} {why}")
                job.done = True
            else:
                self._queue.append(job)
        return Ticket(self, job)

    def commit_through(self, job: _Job) -> None:
        """Return once `job` is committed (see the module docstring for who commits)."""
        while True:
            with self._cond:
                while not job.done and self._committing:
                    self._cond.wait()
                if job.done:
                    return
                self._committing = True
                batch, self._queue = self._queue, []
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._committing = False
                    self._cond.notify_all()

    def _commit(self, batch: list[_Job]) -> None:
        if not batch:
            return
        conn = self._conn
        single = len(batch) == 1  # the common case when idle: no savepoint needed
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                if not single:
                    conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn)
                except (sqlite3.IntegrityError, ValueError) as err:  # this change alone is refused
                    job.error = err
                    conn.execute("ROLLBACK" if single else "ROLLBACK TO job")
                # anything else (I/O error, full disk, a damaged file) fails the whole batch below
                if not single:
                    conn.execute("RELEASE job")
            if conn.in_transaction:
                conn.execute("COMMIT")
            if self.synchronous != "full" and any(j.durable for j in batch):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # syncs the WAL, then the database file
            self.commits += 1
        except BaseException as err:  # noqa: BLE001 - every waiter must learn the batch did not commit
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            with self._cond:
                self.failed = err
                rest, self._queue = self._queue, []
            for job in batch + rest:
                job.error = DurabilityError(f"commit to {self.path} failed: {err}")
                job.done = True
            return
        with self._cond:
            for job in batch:
                job.done = True

    def execute_when_idle(self, sql: str) -> None:
        """Run a statement that may not run inside a transaction (a PRAGMA), after everything queued."""
        if self._queue:
            self.commit_through(self._queue[-1])
        with self._cond:
            while self._committing:
                self._cond.wait()
            self._conn.execute(sql)

    def close(self) -> None:
        """Commit what is queued, then close the connection; later changes fail with DurabilityError."""
        with self._cond:
            self._closed = True
            last = self._queue[-1] if self._queue else None
        if last is not None:
            self.commit_through(last)
        with self._cond:
            while self._committing:
                self._cond.wait()
            self._conn.close()
