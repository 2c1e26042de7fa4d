"""The sampler registry and the learner's status, as typed values.

`SamplerView` and `LearnerStatus` carry exactly the field names of the proto's `SamplerStatus` and `StatusReply`,
so the service builds its reply from them field by field and a field added on one side only fails loudly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from heterorl.common.contract import Reason
from heterorl.server.errors import Refused
from heterorl.server.trust import SamplerTrust

logger = logging.getLogger(__name__)

SAMPLER_ALIVE_S = 60.0


@dataclass
class SamplerRecord:
    """One registered sampler; saved to the run database when registered and at every checkpoint."""

    sampler_id: str
    name: str
    engine: str
    device: str
    max_batch: int
    registered_at: float
    last_seen: float
    version: int = 0
    groups_leased: int = 0
    groups_accepted: int = 0
    groups_rejected: int = 0
    reward_disagreements: int = 0  # completions whose claimed reward differs from the learner's own score
    rejections: dict[str, int] = field(default_factory=dict)  # groups_rejected by Reason value
    principal: str = ""  # the credential it registered with; its id answers to that credential only


@dataclass(frozen=True)
class SamplerView:
    """One row of `heterorl status`: the fields of the proto's SamplerStatus, by name."""

    sampler_id: str
    name: str
    engine: str
    device: str
    version: int
    groups_leased: int
    groups_accepted: int
    groups_rejected: int
    last_seen_s_ago: float
    alive: bool
    rejections: dict[str, int]
    principal: str
    quarantined: bool
    logprob_checked: int
    logprob_mismatched: int
    logprob_mean_diff: float
    reward_disagreements: int


@dataclass(frozen=True)
class LearnerStatus:
    """The learner's side of the proto's StatusReply, by name (the service adds `rejections` and `security`)."""

    run_id: str
    version: int
    step: int
    groups_trained: int
    groups_pending: int
    leases_outstanding: int
    leases_expired: int
    groups_dropped_stale: int
    samplers: tuple[SamplerView, ...]
    uptime_s: float
    last_reward_mean: float
    last_eval_accuracy: float
    task: str
    loss: str
    reward_disagreements: int   # learner-wide total
    groups_refused_reward: int  # groups refused because the reward raised or ran past its limit


class Registry:
    """Registered samplers by id. Not thread-safe: the learner holds its lock around every call."""

    def __init__(self) -> None:
        self._records: dict[str, SamplerRecord] = {}

    def new(self, name: str, engine: str, device: str, max_batch: int, principal: str) -> SamplerRecord:
        now = time.time()
        record = SamplerRecord(sampler_id=f"S-{uuid.uuid4().hex[:16]}", name=name, engine=engine, device=device,
                               max_batch=max_batch, registered_at=now, last_seen=now, principal=principal)
        self._records[record.sampler_id] = record
        return record

    def get(self, sampler_id: str) -> SamplerRecord | None:
        return self._records.get(sampler_id)

    def touch(self, sampler_id: str) -> SamplerRecord:
        """The record of a registered sampler, marked as seen now; Refused NOT_FOUND otherwise."""
        record = self._records.get(sampler_id)
        if record is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"unknown sampler id {sampler_id!r}: Register first",
                          Reason.UNKNOWN_SAMPLER)
        record.last_seen = time.time()
        return record

    def count_rejection(self, sampler_id: str, reason: Reason | str) -> bool:
        record = self._records.get(sampler_id)
        if record is None:
            return False
        key = reason.value if isinstance(reason, Reason) else str(reason)
        record.groups_rejected += 1
        # Replaced, not mutated: a view hands the dict out, to be read after the lock is released.
        record.rejections = {**record.rejections, key: record.rejections.get(key, 0) + 1}
        return True

    def __len__(self) -> int:
        return len(self._records)

    def total_accepted(self) -> int:
        return sum(r.groups_accepted for r in self._records.values())

    def total_disagreements(self) -> int:
        return sum(r.reward_disagreements for r in self._records.values())

    def records(self) -> dict[str, dict[str, Any]]:
        """Every record as a plain dict, for the run database."""
        return {sid: dataclasses.asdict(r) for sid, r in self._records.items()}

    def restore(self, stored: dict[str, dict[str, Any]], leased: dict[str, tuple[int, int]]) -> None:
        """Load the samplers of a resumed run; lease counts come from the database exactly: (leased, accepted)."""
        names = {f.name for f in dataclasses.fields(SamplerRecord)}
        for sampler_id, values in stored.items():
            record = SamplerRecord(**{k: v for k, v in values.items() if k in names})
            record.groups_leased, record.groups_accepted = leased.get(sampler_id, (0, 0))
            self._records[sampler_id] = record

    def views(self, trust: dict[str, SamplerTrust], now: float) -> tuple[SamplerView, ...]:
        out = []
        for r in self._records.values():
            t = trust.get(r.sampler_id) or SamplerTrust()
            out.append(SamplerView(
                sampler_id=r.sampler_id, name=r.name, engine=r.engine, device=r.device, version=r.version,
                groups_leased=r.groups_leased, groups_accepted=r.groups_accepted, groups_rejected=r.groups_rejected,
                last_seen_s_ago=now - r.last_seen, alive=now - r.last_seen < SAMPLER_ALIVE_S,
                rejections=dict(r.rejections), principal=r.principal, quarantined=t.quarantined,
                logprob_checked=t.verified, logprob_mismatched=t.mismatched, logprob_mean_diff=t.mean_diff,
                reward_disagreements=r.reward_disagreements,
            ))
        return tuple(out)
