"""The run's durable state: one sqlite database in WAL mode under RUN_DIR, which `--resume RUN_DIR` continues from.

What lives here, and why it is enough to resume:

- `run`: the run id and its config; a resumed run keeps both.
- `samplers`: the registry. A restarted learner still knows every sampler id, so samplers carry on with their ids
  and the outbox they resend (groups of leases from before the crash) is accepted.
- `leases`: every lease and its state, in the words of `heterorl.server.leases.LeaseState`, written only by
  `LeaseBook` (one path for memory and database). Finished leases live here only; a resume loads the live ones.
- `groups`: each accepted group, committed before its sampler is acknowledged, kept until a checkpoint covers the
  step that trained it (until then a crash may still take that step's weights away, and the group is trained
  again from here).
- `versions`: every version number ever published and its weights digest, so a resumed run never gives two
  different weights the same number.
- `checkpoints`: which train-state directory holds the weights of which step and version. A resume loads the
  newest row; a directory that was written but not yet recorded does not exist as far as the run is concerned.

Changes are queued in order and committed in batches (`heterorl.server.commits`).

`synchronous`: "full" (default) syncs the WAL on every commit, so an acknowledged group survives a power cut;
"normal" does not sync on commit: committed changes survive any crash of the learner process (kill -9, OOM), and
the database stays consistent after an OS crash or power cut, but the last acknowledged groups may then be lost.
A checkpoint record is made durable in either mode, because old checkpoint files are deleted after it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heterorl.server.commits import CommitQueue, DurabilityError, Ticket
from heterorl.server.leases import Lease, LeaseState
from heterorl.server.store import StoredGroup, encode_group

__all__ = ["DB_NAME", "DurabilityError", "RunDB", "RunState", "Ticket", "read_only_query"]

DB_NAME = "run.db"
SCHEMA_VERSION = 2  # 2: one lease-state vocabulary (LeaseState) with `released`, and a lease `serial`
SYNC_MODES = ("full", "normal")

_SCHEMA = """
CREATE TABLE run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samplers (sampler_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE leases (
    lease_id TEXT PRIMARY KEY,
    serial INTEGER NOT NULL UNIQUE,  -- issue order
    prompt_index INTEGER NOT NULL,
    sampler_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,         -- heterorl.server.leases.LeaseState
    step INTEGER                 -- the optimizer step that trained (or dropped) the group
);
CREATE INDEX leases_live ON leases (state) WHERE state IN ('outstanding', 'expired', 'accepted');
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
_LIVE = "('outstanding', 'expired', 'accepted')"
_TAKEN = "('outstanding', 'expired')"  # states a group may be accepted from


@dataclass(frozen=True)
class LeaseRow:
    lease_id: str
    serial: int
    prompt_index: int
    sampler_id: str
    issued_at: float
    expires_at: float
    state: LeaseState


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


@dataclass(frozen=True)
class SamplerLeaseCounts:
    leased: int
    accepted: int  # leases whose group came back (accepted, trained or dropped)


@dataclass
class RunState:
    """Everything a resume reads back (after `rewind`): the live part in full, the rest as counts."""

    run_id: str
    config: dict[str, Any]
    samplers: dict[str, dict[str, Any]]
    live_leases: list[LeaseRow]        # outstanding, expired and accepted
    lease_counts: dict[LeaseState, int]
    sampler_leases: dict[str, SamplerLeaseCounts]
    next_prompt_index: int             # after the highest prompt ever leased
    next_serial: int                   # after the highest lease serial
    pending: list[GroupRow]            # accepted, not trained, in acceptance order
    newest_version: int                # the highest version number ever published
    versions: dict[int, str]           # version -> weights digest
    checkpoint: CheckpointRow | None   # the newest recorded checkpoint
    last_seen_alive: float             # time of the newest committed event: the learner was alive then


class RunDB:
    """The sqlite database of one run. Thread-safe: changes are queued in order and committed in batches."""

    def __init__(self, path: Path, synchronous: str = "full", *, _create: bool = False):
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        self.path = Path(path)
        if _create and self.path.exists():
            raise FileExistsError(f"{self.path} already exists")
        if not _create and not self.path.exists():
            raise FileNotFoundError(f"no run database at {self.path}")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=10000")
        if _create:
            conn.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            conn.close()
            older = "an older heterorl" if version < SCHEMA_VERSION else "a newer heterorl"
            raise ValueError(f"{self.path} was written by {older} (run database schema {version}); this learner "
                             f"reads schema {SCHEMA_VERSION} only: finish that run with the heterorl that started it, "
                             "or start a new run in another --run-dir")
        self._commits = CommitQueue(conn, self.path, synchronous)

    @classmethod
    def create(cls, path: Path, run_id: str, config: dict[str, Any], synchronous: str = "full") -> RunDB:
        db = cls(path, synchronous, _create=True)
        meta = {"run_id": run_id, "config": json.dumps(config), "created_at": repr(time.time())}
        db.write(lambda c: c.executemany("INSERT INTO run VALUES (?, ?)", meta.items()), durable=True).wait()
        return db

    @classmethod
    def open(cls, path: Path, synchronous: str = "full") -> RunDB:
        return cls(path, synchronous)

    # ---- the commit queue ------------------------------------------------------------------------------------

    def write(self, fn, durable: bool = False) -> Ticket:
        return self._commits.write(fn, durable)

    @property
    def failed(self) -> BaseException | None:
        return self._commits.failed

    @property
    def commits(self) -> int:
        return self._commits.commits

    def set_synchronous(self, synchronous: str) -> None:
        """Change the commit mode (a resumed run may); call before any change is queued."""
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        self._commits.execute_when_idle(f"PRAGMA synchronous={synchronous.upper()}")
        self._commits.synchronous = synchronous

    def close(self) -> None:
        self._commits.close()

    # ---- changes ---------------------------------------------------------------------------------------------

    def add_sampler(self, sampler_id: str, record: dict[str, Any]) -> Ticket:
        text = json.dumps(record)
        return self.write(lambda c: c.execute("INSERT INTO samplers VALUES (?, ?)", (sampler_id, text)))

    def save_samplers(self, records: dict[str, dict[str, Any]]) -> Ticket:
        """Refresh the stored counters of every sampler (they are saved at checkpoints, not per event)."""
        rows = [(json.dumps(r), sid) for sid, r in records.items()]
        return self.write(lambda c: c.executemany("UPDATE samplers SET record = ? WHERE sampler_id = ?", rows))

    # The four lease changes below are called by LeaseBook only (heterorl.server.leases.LeaseJournal).

    def issue_leases(self, leases: list[Lease], released: list[str]) -> Ticket:
        """New leases, and the expired leases whose prompts they took over."""
        rows = [(l.lease_id, l.serial, l.prompt_index, l.sampler_id, l.issued_at, l.expires_at, l.state.value)
                for l in leases]
        old = [(lease_id,) for lease_id in released]

        def fn(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, NULL)", rows)
            done = c.executemany("UPDATE leases SET state = 'released' WHERE lease_id = ? AND state = 'expired'",
                                 old).rowcount
            if done != len(old):
                raise ValueError(f"{len(old) - done} of {len(old)} released leases were not expired in the database")

        return self.write(fn)

    def expire_leases(self, lease_ids: list[str]) -> Ticket:
        rows = [(lease_id,) for lease_id in lease_ids]
        return self.write(lambda c: c.executemany(
            "UPDATE leases SET state = 'expired' WHERE lease_id = ? AND state = 'outstanding'", rows))

    def accept_group(self, group: StoredGroup) -> Ticket:
        """An accepted group and its lease's new state (encoded at commit time, off the learner's lock)."""

        def fn(c: sqlite3.Connection) -> None:
            row = (group.lease_id, group.sampler_id, group.prompt_index, group.policy_version, group.accepted_at,
                   encode_group(group))
            c.execute("INSERT INTO groups (lease_id, sampler_id, prompt_index, policy_version, accepted_at, data) "
                      "VALUES (?, ?, ?, ?, ?, ?)", row)
            changed = c.execute(f"UPDATE leases SET state = 'accepted' WHERE lease_id = ? AND state IN {_TAKEN}",
                                (group.lease_id,)).rowcount
            if changed != 1:
                raise ValueError(f"lease {group.lease_id} is neither outstanding nor expired in the database")

        return self.write(fn)

    def finish_leases(self, lease_ids: list[str], state: LeaseState, step: int) -> Ticket:
        """Accepted leases trained (or dropped) at optimizer step `step`."""
        if state not in (LeaseState.TRAINED, LeaseState.DROPPED):
            raise ValueError(f"a lease finishes as trained or dropped, not {state!r}")
        rows = [(state.value, step, lease_id) for lease_id in lease_ids]

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
        whose training it now holds (and those dropped)."""
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

    def stored_config(self) -> dict[str, Any]:
        return self.write(lambda c: json.loads(c.execute("SELECT value FROM run WHERE key = 'config'").fetchone()[0])
                          ).wait()

    def lease_owner_and_state(self, lease_id: str) -> tuple[str, LeaseState] | None:
        """(sampler id, state) of any lease of the run, in commit order with every queued change."""
        rows = self.query("SELECT sampler_id, state FROM leases WHERE lease_id = ?", (lease_id,))
        return (rows[0][0], LeaseState(rows[0][1])) if rows else None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of a read-only query, in commit order with every queued change (for status and tests)."""
        return self.write(lambda c: c.execute(sql, params).fetchall()).wait()


def _load(c: sqlite3.Connection) -> RunState:
    meta = dict(c.execute("SELECT key, value FROM run"))
    samplers = {sid: json.loads(record) for sid, record in c.execute("SELECT sampler_id, record FROM samplers")}
    live = [LeaseRow(*row[:6], LeaseState(row[6])) for row in c.execute(
        "SELECT lease_id, serial, prompt_index, sampler_id, issued_at, expires_at, state FROM leases "
        f"WHERE state IN {_LIVE} ORDER BY serial")]
    counts = {LeaseState(s): n for s, n in c.execute("SELECT state, COUNT(*) FROM leases GROUP BY state")}
    per_sampler = {sid: SamplerLeaseCounts(n, done or 0) for sid, n, done in c.execute(
        "SELECT sampler_id, COUNT(*), SUM(state IN ('accepted', 'trained', 'dropped')) FROM leases "
        "GROUP BY sampler_id")}
    top_index, top_serial = c.execute("SELECT MAX(prompt_index), MAX(serial) FROM leases").fetchone()
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
        live_leases=live,
        lease_counts=counts,
        sampler_leases=per_sampler,
        next_prompt_index=(top_index + 1) if top_index is not None else 0,
        next_serial=(top_serial + 1) if top_serial is not None else 1,
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
