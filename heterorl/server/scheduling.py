"""How many prompt groups each LeasePrompts hands out, and for how long: `--lease-policy uniform|adaptive`.

`uniform` gives every sampler what it asks for (up to its max_batch and the room left in the in-flight window),
each lease for `lease_ttl_s`. On a fleet of samplers of very different speeds and distances that goes wrong
three ways: a slow or far sampler takes as many prompts as a fast one and returns them so late that they are
stale; while it holds them a fast sampler finds the window full and idles; and a sampler that vanishes keeps its
prompts until `lease_ttl_s` (minutes) has passed.

`adaptive` measures each sampler from its own returned groups and sizes its leases from that:

- per batch of leases (one LeasePrompts reply): the turnaround (issue -> group accepted), the share of it spent
  generating (the group's `generation_seconds`, per group of the batch), and the rest: the round trip around the
  generation (network, queueing, the sampler's own overheads). All three as moving averages, plus the turnaround's
  mean deviation, as TCP does for its retransmission timer;
- the learner's own pace: seconds per published version, from the versions it sees advance;
- the horizon: a batch should come back within `lease_target_versions` learner versions. A measured sampler
  whose batches come back within it gets twice its last batch (a batched engine generates 2n groups in about the
  time of n: only trying tells); one whose batches come back late gets n = (horizon - round trip) / seconds per
  group (at least 1): grow while on time, cut to fit when late, as TCP does. An unmeasured sampler gets what it
  asks for, within its share, for `lease_ttl_s`;
- its share of the in-flight window, in proportion to the rate at which it returns groups: a slow sampler can
  never hold the prompts a fast one needs (fast samplers are not starved), and every sampler may hold at least one;
- the expiry: 3 x the expected turnaround of this batch + 4 x the deviation, within [lease_min_ttl_s,
  lease_ttl_s]: a sampler that stops answering gives its prompts back after a few of its own rounds, not minutes;
- a sampler whose lease expired gets one group at a time until it returns one.

Every LeaseReply of an adaptive learner also carries `refresh_below_version` = newest - `lease_refresh_lag`: a
sampler holding an older version is too far behind for its groups to be worth much and should load a newer one
before generating. An empty reply carries `retry_after_s`: the waiting samplers' polls are spread so that about
two arrive per lease freed (1,000 idle samplers polling every 0.5 s were most of a fleet's calls). Untrusted inputs (a sampler's claimed generation_seconds) only ever shape that sampler's own
leases, and within the same limits `uniform` has.

Not thread-safe: the learner holds its lock around every call (ingest.py); every call costs O(1), except a
recount of the samplers' total rate at most once per `RECOUNT_S`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POLICIES = ("uniform", "adaptive")
ALPHA = 0.3          # weight of the newest sample in the moving averages
TTL_MEAN_FACTOR = 3.0
TTL_DEV_FACTOR = 4.0
GROWTH = 2           # a batch is at most this many times the sampler's previous one
ACTIVE_S = 60.0      # a sampler that has not asked for leases for this long leaves the rate total
RECOUNT_S = 1.0
WAITING_S = 10.0     # a sampler that got no leases this recently is waiting for some
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
POLLS_PER_FREED = 2.0  # polls of waiting samplers per lease freed (accepted group), fleet-wide


class Ewma:
    """Exponentially weighted moving average and mean absolute deviation; None until the first sample."""

    __slots__ = ("value", "dev")

    def __init__(self) -> None:
        self.value: float | None = None
        self.dev = 0.0

    def add(self, x: float) -> None:
        if self.value is None:
            self.value, self.dev = x, x / 2
        else:
            self.dev += ALPHA * (abs(x - self.value) - self.dev)
            self.value += ALPHA * (x - self.value)


@dataclass
class SamplerPerf:
    """What the learner has measured of one sampler."""

    per_group_s: Ewma = field(default_factory=Ewma)   # generation seconds per group
    overhead_s: Ewma = field(default_factory=Ewma)    # turnaround minus generation: the round trip around it
    turnaround_s: Ewma = field(default_factory=Ewma)  # issue -> accepted, per batch
    rate: Ewma = field(default_factory=Ewma)          # groups per second it returns (batch / turnaround)
    last_batch: int = 0       # size of its newest batch
    last_seen_batch: float = -1.0  # issue time of the newest batch measured (one sample per batch)
    returned: int = 0
    expired: int = 0
    penalised: bool = False   # a lease expired on it and it has not returned a group since
    asked_at: float = 0.0     # last LeasePrompts
    empty_at: float = -math.inf  # last LeasePrompts that got nothing


@dataclass(frozen=True)
class SchedulingConfig:
    policy: str = "adaptive"
    ttl_s: float = 300.0          # uniform expiry, and the most any adaptive lease gets
    min_ttl_s: float = 15.0       # the least an adaptive lease gets
    target_versions: float = 2.0  # a batch should come back within this many learner versions
    refresh_lag: int = 8          # versions behind after which a sampler is told to refresh (0: never)
    window: int = 12              # the learner's in-flight limit (leased + waiting to be trained)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"lease_policy must be one of {POLICIES}, got {self.policy!r}")

    @classmethod
    def from_serve(cls, serve, window: int) -> SchedulingConfig:
        """From the learner's [serve] settings (heterorl/server/config.py ServeSection) and its in-flight limit."""
        return cls(policy=serve.lease_policy, ttl_s=serve.lease_ttl_s, min_ttl_s=serve.lease_min_ttl_s,
                   target_versions=serve.lease_target_versions, refresh_lag=serve.lease_refresh_lag, window=window)


@dataclass(frozen=True)
class LeasePlan:
    n: int
    ttl_s: float


class Scheduler:
    def __init__(self, config: SchedulingConfig):
        self.config = config
        self.adaptive = config.policy == "adaptive"
        self.perf: dict[str, SamplerPerf] = {}
        self.version_s = Ewma()  # seconds per published version
        self._version: int | None = None
        self._version_at = 0.0
        self._total_rate = 0.0
        self._median_rate = 1.0
        self._total_at = -math.inf
        self._returned = 0          # groups accepted, all samplers
        self._returned_at_recount = 0
        self.freed_per_s = Ewma()   # leases freed per second (groups accepted), fleet-wide
        self.waiting = 0            # samplers that got no leases in the last WAITING_S

    # ---- what the learner tells the scheduler -----------------------------------------------------------------

    def observe_version(self, version: int, now: float) -> None:
        """The newest version as seen now; each advance is a sample of the learner's pace."""
        if self._version is None or version < self._version:
            self._version, self._version_at = version, now
        elif version > self._version:
            self.version_s.add((now - self._version_at) / (version - self._version))
            self._version, self._version_at = version, now

    def returned(self, sampler_id: str, issued_at: float, batch: int, now: float, generation_s: float) -> None:
        """A group of a batch issued at `issued_at` (of `batch` leases) was accepted now; `generation_s` is what the
        sampler says generating the batch took (0 or nonsense: unknown, all of the turnaround counts as work)."""
        perf = self.perf.setdefault(sampler_id, SamplerPerf())
        perf.returned += 1
        self._returned += 1
        perf.penalised = False
        if issued_at == perf.last_seen_batch:
            return  # one sample per batch: its groups come back together
        perf.last_seen_batch = issued_at
        turnaround = max(now - issued_at, 1e-3)
        batch = max(batch, 1)
        if not (math.isfinite(generation_s) and 0 < generation_s <= turnaround):
            generation_s = turnaround
        perf.turnaround_s.add(turnaround)
        perf.per_group_s.add(generation_s / batch)
        perf.overhead_s.add(turnaround - generation_s)
        perf.rate.add(batch / turnaround)

    def expired(self, sampler_id: str) -> None:
        """One of its leases ran out: one group at a time until it returns one, and its rate halves."""
        perf = self.perf.setdefault(sampler_id, SamplerPerf())
        perf.expired += 1
        perf.penalised = True
        if perf.rate.value is not None:
            perf.rate.value /= 2

    def forget(self, sampler_id: str) -> None:
        self.perf.pop(sampler_id, None)

    # ---- decisions ---------------------------------------------------------------------------------------------

    def horizon_s(self) -> float | None:
        """Seconds within which a batch should come back; None until the learner's pace is known."""
        pace = self.version_s.value
        return None if pace is None else self.config.target_versions * pace

    def plan(self, sampler_id: str, asked: int, max_batch: int, room: int, held: int, now: float) -> LeasePlan:
        """How many leases to issue to `sampler_id` now, and their expiry. `asked`: the request's max_groups;
        `room`: what the in-flight window has left; `held`: leases it holds already (outstanding)."""
        cap = max(0, min(asked, max_batch, room))
        if not self.adaptive:
            return LeasePlan(cap, self.config.ttl_s)
        perf = self.perf.setdefault(sampler_id, SamplerPerf())
        perf.asked_at = now
        if cap == 0:
            perf.empty_at = now
            return LeasePlan(0, self.config.ttl_s)
        per_group, overhead = perf.per_group_s.value, perf.overhead_s.value
        if per_group is None:  # nothing measured yet: what it asks for, within its share, for lease_ttl_s
            n = cap
        else:
            n = GROWTH * max(1, perf.last_batch)
            horizon = self.horizon_s()
            if horizon is not None and perf.turnaround_s.value > horizon:
                # Late: as many groups as fit the horizon at its measured pace. On time: grow (a batched engine
                # generates 2n in about the time of n; only trying tells).
                n = min(n, max(1, math.floor((horizon - overhead) / max(per_group, 1e-3))))
            if perf.penalised:
                n = 1
        n = min(n, cap, max(0, self.share(sampler_id, now) - held))
        if n <= 0:
            perf.empty_at = now
            return LeasePlan(0, self.config.ttl_s)
        perf.last_batch = n
        return LeasePlan(n, self.ttl_for(perf, n))

    def ttl_for(self, perf: SamplerPerf, n: int) -> float:
        """3 x the expected turnaround of an n-group batch + 4 x its deviation, within [min_ttl_s, ttl_s]."""
        if perf.per_group_s.value is None:
            return self.config.ttl_s
        expected = perf.overhead_s.value + n * perf.per_group_s.value
        ttl = TTL_MEAN_FACTOR * expected + TTL_DEV_FACTOR * perf.turnaround_s.dev
        return min(self.config.ttl_s, max(self.config.min_ttl_s, ttl))

    def share(self, sampler_id: str, now: float) -> int:
        """Leases `sampler_id` may hold at once: its part of the window by the rate it returns groups (at least 1).
        A sampler with no measured rate yet counts as the median measured one (as 1 group/s when none is)."""
        perf = self.perf[sampler_id]
        if now - self._total_at > RECOUNT_S:
            self._recount(now)
        rate = perf.rate.value if perf.rate.value is not None else self._median_rate
        total = max(self._total_rate, rate)  # a sampler new since the recount still counts itself
        return max(1, math.ceil(self.config.window * rate / total))

    def _recount(self, now: float) -> None:
        if math.isfinite(self._total_at) and now > self._total_at:
            self.freed_per_s.add((self._returned - self._returned_at_recount) / (now - self._total_at))
        self._returned_at_recount = self._returned
        self.waiting = sum(1 for p in self.perf.values() if now - p.empty_at < WAITING_S)
        active = [p for p in self.perf.values() if now - p.asked_at < ACTIVE_S]
        rates = sorted(p.rate.value for p in active if p.rate.value is not None)
        self._median_rate = rates[len(rates) // 2] if rates else 1.0
        self._total_rate = sum(p.rate.value if p.rate.value is not None else self._median_rate for p in active)
        self._total_at = now

    def retry_after(self, now: float) -> float:
        """LeaseReply.retry_after_s for a reply without leases: the waiting samplers' polls spread so that about
        POLLS_PER_FREED polls arrive per lease freed, within [RETRY_MIN_S, RETRY_MAX_S] (0: uniform, no hint).
        With 1,000 idle samplers polling every 0.5 s the learner answered 2,000 empty calls a second."""
        if not self.adaptive:
            return 0.0
        if now - self._total_at > RECOUNT_S:
            self._recount(now)
        freed = max(self.freed_per_s.value or 0.0, 1.0)
        return min(RETRY_MAX_S, max(RETRY_MIN_S, self.waiting / (POLLS_PER_FREED * freed)))

    def refresh_below(self, newest: int) -> int:
        """LeaseReply.refresh_below_version: samplers holding an older version should refresh first (0: none)."""
        lag = self.config.refresh_lag
        if not self.adaptive or lag <= 0 or newest <= lag:
            return 0
        return newest - lag

    def views(self) -> dict[str, dict[str, float]]:
        """Per sampler what was measured (for logs and benchmarks)."""
        return {sid: {"per_group_s": p.per_group_s.value or 0.0, "overhead_s": p.overhead_s.value or 0.0,
                      "rate": p.rate.value or 0.0, "last_batch": p.last_batch, "expired": p.expired,
                      "returned": p.returned} for sid, p in self.perf.items()}
