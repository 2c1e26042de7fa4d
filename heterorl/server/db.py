"""The run's durable state: one sqlite database in WAL mode under RUN_DIR, which `--resume RUN_DIR` continues from.

What lives here, and why it is enough to resume:

- `run`: the run id and its config; a resumed run keeps both.
- `samplers`: the registry. A restarted learner still knows every sampler id, so samplers carry on with their ids
  and the outbox they resend (groups of leases from before the crash) is accepted.
- `leases`: every lease and its state; the prompt stream continues after the highest prompt index ever leased.
- `groups`: each accepted group, committed before its sampler is acknowledged, kept until a checkpoint covers the
  step that trained it (until then a crash may still take that step's weights away, and the group is trained
  again from here).
- `versions`: every version number ever published and its weights digest, so a resumed run never gives two
  different weights the same number.
- `checkpoints`: which train-state directory holds the weights of which step and version. A resume loads the
  newest row; a directory that was written but not yet recorded does not exist as far as the run is concerned.

Changes are queued in order (under the learner's lock) and committed in batches (group commit, each change in its
own savepoint) by whichever waiting thread gets there first: a gRPC handler queues its change, releases the
learner's lock and waits for the commit before it answers, so an acknowledgement always follows a commit; alone, a
handler commits its own change with no hand-over between threads, and under load one fsync serves many changes.

`synchronous`: "full" (default) syncs the WAL on every commit, so an acknowledged group survives a power cut;
"normal" does not sync on commit: committed changes survive any crash of the learner process (kill -9, OOM), and
the database stays consistent after an OS crash or power cut, but the last acknowledged groups may then be lost.
A checkpoint record is made durable in either mode, because old checkpoint files are deleted after it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heterorl.server.store import StoredGroup, encode_group

DB_NAME = "run.db"
SCHEMA_VERSION = 1
SYNC_MODES = ("full", "normal")

# Lease states as stored. In memory a lease also becomes "expired" before its prompt is leased again; here it
# stays "outstanding" until then (its expiry time says the rest), and "expired" means "its prompt was re-leased".
STORED_STATES = ("outstanding", "accepted", "trained", "dropped", "expired")

_SCHEMA = """
CREATE TABLE run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samplers (sampler_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE leases (
    lease_id TEXT PRIMARY KEY,
    prompt_index INTEGER NOT NULL,
    sampler_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    step INTEGER                 -- the optimizer step that trained (or dropped) the group
);
CREATE TABLE groups (
    seq INTEGER PRIMARY KEY,     -- acceptance order: the order the trainer takes groups in
    lease_id TEXT NOT NULL UNIQUE,
    sampler_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    data BLOB NOT NULL           -- heterorl.server.store.encode_group
);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY,
    step INTEGER NOT NULL,
    weights_sha256 TEXT NOT NULL,
    published_at REAL NOT NULL
);
CREATE TABLE checkpoints (
    step INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    weights_sha256 TEXT NOT NULL, -- digest of that version: the bf16 cast of the checkpoint's fp32 weights
    path TEXT NOT NULL,           -- directory relative to RUN_DIR
    metrics_bytes INTEGER NOT NULL,
    manifest TEXT NOT NULL,       -- file name -> size and crc32
    created_at REAL NOT NULL
);
"""


class DurabilityError(RuntimeError):
    """The database could not commit; the learner must stop rather than acknowledge what it cannot keep."""


@dataclass(frozen=True)
class LeaseRow:
    lease_id: str
    prompt_index: int
    sampler_id: str
    issued_at: float
    expires_at: float
    state: str
    step: int | None = None


@dataclass(frozen=True)
class GroupRow:
    lease_id: str
    sampler_id: str
    prompt_index: int
    policy_version: int
    accepted_at: float
    data: bytes


@dataclass(frozen=True)
class CheckpointRow:
    step: int
    version: int
    weights_sha256: str
    path: str
    metrics_bytes: int
    manifest: dict[str, dict[str, int]]
    created_at: float


@dataclass
class RunState:
    """Everything a resume reads back (after `rewind`)."""

    run_id: str
    config: dict[str, Any]
    samplers: dict[str, dict[str, Any]]
    leases: list[LeaseRow]
    pending: list[GroupRow]            # accepted, not trained, in acceptance order
    newest_version: int                # the highest version number ever published
    versions: dict[int, str]           # version -> weights digest
    checkpoint: CheckpointRow | None   # the newest recorded checkpoint
    last_seen_alive: float             # time of the newest committed event: the learner was alive then


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    durable: bool
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Ticket:
    """A queued change; `wait()` returns once it is committed (or raises why it was not)."""

    def __init__(self, db: RunDB, job: _Job):
        self._db = db
        self._job = job

    def wait(self) -> Any:
        self._db._commit_through(self._job)
        if self._job.error is not None:
            raise self._job.error
        return self._job.result

    @property
    def committed(self) -> bool:
        return self._job.done and self._job.error is None


class RunDB:
    """The sqlite database of one run. Thread-safe: changes are queued in order and committed in batches."""

    def __init__(self, path: Path, synchronous: str = "full", *, _create: bool = False):
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        if _create and self.path.exists():
            raise FileExistsError(f"{self.path} already exists")
        if not _create and not self.path.exists():
            raise FileNotFoundError(f"no run database at {self.path}")
        # One connection, used by one thread at a time: whichever waiter is committing (see _commit_through).
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.execute("PRAGMA busy_timeout=10000")
        if _create:
            self._conn.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            self._conn.close()
            raise ValueError(f"{self.path}: schema version {version}, this learner reads version {SCHEMA_VERSION}")
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._committing = False
        self._closed = False
        self.failed: BaseException | None = None
        self.commits = 0  # transactions committed (each may hold many queued changes)

    # ---- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, run_id: str, config: dict[str, Any], synchronous: str = "full") -> RunDB:
        db = cls(path, synchronous, _create=True)
        meta = {"run_id": run_id, "config": json.dumps(config), "created_at": repr(time.time())}
        db.write(lambda c: c.executemany("INSERT INTO run VALUES (?, ?)", meta.items()), durable=True).wait()
        return db

    @classmethod
    def open(cls, path: Path, synchronous: str = "full") -> RunDB:
        return cls(path, synchronous)

    # ---- queueing and committing -----------------------------------------------------------------------------

    def write(self, fn: Callable[[sqlite3.Connection], Any], durable: bool = False) -> Ticket:
        """Queue fn(connection) to run in commit order; `durable` forces it to disk whatever `synchronous` says.

        Cheap and never blocking, so callers queue under their own lock (which fixes the order) and wait for the
        commit after releasing it. Never raises: once nothing can be committed, the ticket is failed already.
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

    def _commit_through(self, job: _Job) -> None:
        """Return once `job` is committed. Group commit without a thread of its own: the first waiter to find
        no commit under way commits everything queued so far in one transaction; waiters arriving meanwhile
        queue up behind it and the next of them commits their batch. Alone, a waiter commits its own change
        at once (no hand-over between threads); under load, one fsync serves many changes."""
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

    def close(self) -> None:
        """Commit what is queued, then close the file; later changes fail with DurabilityError."""
        with self._cond:
            self._closed = True
            last = self._queue[-1] if self._queue else None
        if last is not None:
            self._commit_through(last)
        with self._cond:
            while self._committing:
                self._cond.wait()
            self._conn.close()

    # ---- changes ---------------------------------------------------------------------------------------------

    def add_sampler(self, sampler_id: str, record: dict[str, Any]) -> Ticket:
        text = json.dumps(record)
        return self.write(lambda c: c.execute("INSERT INTO samplers VALUES (?, ?)", (sampler_id, text)))

    def save_samplers(self, records: dict[str, dict[str, Any]]) -> Ticket:
        """Refresh the stored counters of every sampler (they are saved at checkpoints, not per event)."""
        rows = [(json.dumps(r), sid) for sid, r in records.items()]
        return self.write(lambda c: c.executemany("UPDATE samplers SET record = ? WHERE sampler_id = ?", rows))

    def issue_leases(self, leases: list[LeaseRow], reissued: list[str]) -> Ticket:
        """New leases, and the expired leases whose prompts they took over."""
        rows = [(l.lease_id, l.prompt_index, l.sampler_id, l.issued_at, l.expires_at, l.state, l.step) for l in leases]
        old = [(lease_id,) for lease_id in reissued]

        def fn(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            c.executemany("UPDATE leases SET state = 'expired' WHERE lease_id = ?", old)

        return self.write(fn)

    def accept_group(self, group: StoredGroup) -> Ticket:
        """An accepted group and its lease's new state (encoded at commit time, off the learner's lock)."""

        def fn(c: sqlite3.Connection) -> None:
            row = (group.lease_id, group.sampler_id, group.prompt_index, group.policy_version, group.accepted_at,
                   encode_group(group))
            c.execute("INSERT INTO groups (lease_id, sampler_id, prompt_index, policy_version, accepted_at, data) "
                      "VALUES (?, ?, ?, ?, ?, ?)", row)
            changed = c.execute("UPDATE leases SET state = 'accepted' WHERE lease_id = ? AND state = 'outstanding'",
                                (group.lease_id,)).rowcount
            if changed != 1:
                raise ValueError(f"lease {group.lease_id} is not outstanding in the database")

        return self.write(fn)

    def finish_leases(self, lease_ids: list[str], state: str, step: int) -> Ticket:
        """Accepted leases trained (or dropped as too stale) at optimizer step `step`."""
        if state not in ("trained", "dropped"):
            raise ValueError(f"a lease finishes as trained or dropped, not {state!r}")
        rows = [(state, step, lease_id) for lease_id in lease_ids]

        def fn(c: sqlite3.Connection) -> None:
            done = c.executemany("UPDATE leases SET state = ?, step = ? WHERE lease_id = ? AND state = 'accepted'",
                                 rows).rowcount
            if done != len(rows):
                raise ValueError(f"{len(rows) - done} of {len(rows)} leases were not accepted in the database")

        return self.write(fn)

    def record_version(self, version: int, step: int, weights_sha256: str) -> Ticket:
        row = (version, step, weights_sha256, time.time())
        return self.write(lambda c: c.execute("INSERT INTO versions VALUES (?, ?, ?, ?)", row))

    def record_checkpoint(self, row: CheckpointRow) -> Ticket:
        """The checkpoint of `row.step` is complete on disk: make it the one to resume from, and drop the groups
        whose training it now holds (and those dropped as stale)."""
        values = (row.step, row.version, row.weights_sha256, row.path, row.metrics_bytes, json.dumps(row.manifest),
                  row.created_at)

        def fn(c: sqlite3.Connection) -> int:
            c.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            return c.execute(
                "DELETE FROM groups WHERE lease_id IN (SELECT lease_id FROM leases "
                "WHERE state = 'dropped' OR (state = 'trained' AND step <= ?))", (row.step,)
            ).rowcount

        return self.write(fn, durable=True)

    def rewind(self, step: int) -> Ticket:
        """Before a resume from the checkpoint of `step`: groups trained after it lost that training with the
        crash; they become accepted (pending) again and are trained once more from their stored rows."""
        return self.write(
            lambda c: c.execute(
                "UPDATE leases SET state = 'accepted', step = NULL WHERE state = 'trained' AND step > ?", (step,)
            ).rowcount,
            durable=True,
        )

    # ---- reading ---------------------------------------------------------------------------------------------

    def load(self) -> RunState:
        return self.write(_load).wait()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of a read-only query, in commit order with every queued change (for status and tests)."""
        return self.write(lambda c: c.execute(sql, params).fetchall()).wait()


def _load(c: sqlite3.Connection) -> RunState:
    meta = dict(c.execute("SELECT key, value FROM run"))
    samplers = {sid: json.loads(record) for sid, record in c.execute("SELECT sampler_id, record FROM samplers")}
    leases = [LeaseRow(*row) for row in c.execute(
        "SELECT lease_id, prompt_index, sampler_id, issued_at, expires_at, state, step FROM leases")]
    pending = [GroupRow(*row) for row in c.execute(
        "SELECT g.lease_id, g.sampler_id, g.prompt_index, g.policy_version, g.accepted_at, g.data FROM groups g "
        "JOIN leases l ON l.lease_id = g.lease_id WHERE l.state = 'accepted' ORDER BY g.seq")]
    versions = dict(c.execute("SELECT version, weights_sha256 FROM versions"))
    last_seen_alive = c.execute(
        "SELECT MAX(t) FROM (SELECT MAX(issued_at) AS t FROM leases UNION ALL SELECT MAX(accepted_at) FROM groups "
        "UNION ALL SELECT MAX(published_at) FROM versions UNION ALL SELECT MAX(created_at) FROM checkpoints)"
    ).fetchone()[0]
    row = c.execute("SELECT step, version, weights_sha256, path, metrics_bytes, manifest, created_at FROM checkpoints "
                    "ORDER BY step DESC LIMIT 1").fetchone()
    checkpoint = None
    if row is not None:
        checkpoint = CheckpointRow(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6])
    return RunState(
        run_id=meta["run_id"],
        config=json.loads(meta["config"]),
        samplers=samplers,
        leases=leases,
        pending=pending,
        newest_version=max(versions, default=0),
        versions=versions,
        checkpoint=checkpoint,
        last_seen_alive=last_seen_alive or float(meta["created_at"]),
    )


def read_only_query(run_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a query on a run's database from outside its learner (another process, a test, a benchmark)."""
    conn = sqlite3.connect(f"file:{Path(run_dir) / DB_NAME}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
