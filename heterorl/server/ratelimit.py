"""How often a caller may call, and how many refusals the learner has answered (by reason).

Rate limits are token buckets per key (a sampler id, or a credential for calls that name no sampler). A call over
its limit is refused with RESOURCE_EXHAUSTED and `Reason.RATE_LIMITED`, which samplers treat as "back off and
retry". `Refusals` counts every refused call learner-wide by `Reason` value, also those no sampler can be blamed
for (a missing token, an unknown id); the learner counts the ones it can blame against each sampler.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from heterorl.common.contract import Reason


class Refusals:
    """Learner-wide counts of refused requests, keyed by `Reason` value (the keys of `Status.rejections`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, reason: Reason) -> None:
        with self._lock:
            self._counts[reason.value] = self._counts.get(reason.value, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class RateLimiter:
    """Token buckets by key: `rate` per second sustained, `burst` at once; rate 0 disables the limit."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if not (rate >= 0 and burst >= 0) or (rate > 0 and burst < 1):
            raise ValueError(f"a rate limit needs rate >= 0 and burst >= 1, got rate {rate}, burst {burst}")
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of that count)

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        """0 if the call may proceed (and it is charged), else the seconds until it could."""
        if not self.rate:
            return 0.0
        cost = min(cost, self.burst)  # a call dearer than the whole bucket still goes through on a full one
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self.max_keys:  # forget keys whose buckets have refilled (they are fresh anyway)
                full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
                for k in full:
                    del self._buckets[k]
            return (cost - tokens) / self.rate


@dataclass(frozen=True)
class RateLimits:
    """Per-sampler limits of one learner: calls of any kind, and trajectory groups."""

    calls_per_s: float = 50.0
    calls_burst: float = 200.0
    groups_per_s: float = 200.0
    groups_burst: float = 800.0

    def __post_init__(self) -> None:
        for what, rate, burst in (("calls", self.calls_per_s, self.calls_burst),
                                  ("groups", self.groups_per_s, self.groups_burst)):
            if not (math.isfinite(rate) and rate >= 0 and (rate == 0 or burst >= 1)):
                raise ValueError(f"rate limit of {what}: need rate >= 0 and burst >= 1, got {rate}/s, burst {burst}")
