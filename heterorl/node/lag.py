"""Deliberate sampler lag, for staleness experiments: hold a policy version for a while before refreshing.

The GEPO paper delays samplers by a log-normal amount whose 0.25% and 99.75% quantiles are 60 s and 1920 s. Here
the lag is either fixed or drawn from that same log-normal shape, scaled so that its 99.75% quantile equals the
configured lag (the 0.25% quantile is then 1/32 of it, as in the paper: 60 s = 1920 s / 32). A lag counts in
versions (refresh once the learner is at least D versions ahead) or in seconds (refresh once the held version is
at least D seconds old), or both (both must hold). A new D is drawn at every refresh.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

LAG_DISTS = ("fixed", "lognormal")
# Standard-normal quantile of 0.9975: the paper's 0.25%/99.75% quantiles sit this many sigmas from the median.
_Z_99_75 = 2.807033768343811
# The paper's spread: 99.75% quantile / 0.25% quantile = 1920 s / 60 s.
PAPER_QUANTILE_RATIO = 32.0


def lognormal_lag(top: float, rng: random.Random) -> float:
    """One draw from the paper's log-normal scaled so its 99.75% quantile is `top` (0.25% quantile: top/32)."""
    if top <= 0:
        return 0.0
    sigma = math.log(PAPER_QUANTILE_RATIO) / (2 * _Z_99_75)
    mu = math.log(top) - sigma * _Z_99_75
    return rng.lognormvariate(mu, sigma)


@dataclass
class LagPolicy:
    """When a sampler holding `held` since `held_since` may refresh to the learner's `newest` version."""

    versions: int = 0
    seconds: float = 0.0
    dist: str = "fixed"
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    current_versions: float = field(init=False, default=0.0)
    current_seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.dist not in LAG_DISTS:
            raise ValueError(f"lag_dist must be one of {LAG_DISTS}, got {self.dist!r}")
        if self.versions < 0 or not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError("lag_versions and lag_seconds must be >= 0")
        self._rng = random.Random(f"lag-{self.seed}")
        self.draw()

    @property
    def active(self) -> bool:
        return self.versions > 0 or self.seconds > 0

    def draw(self) -> None:
        """Pick the lag to wait before the next refresh (called after every refresh)."""
        if self.dist == "fixed":
            self.current_versions, self.current_seconds = float(self.versions), self.seconds
        else:
            self.current_versions = lognormal_lag(self.versions, self._rng)
            self.current_seconds = lognormal_lag(self.seconds, self._rng)

    def due(self, held: int, held_since: float, newest: int, now: float) -> bool:
        """True when the sampler should load a newer version now."""
        if held == 0:
            return True  # nothing loaded yet: there is no policy to lag behind
        if newest <= held:
            return False
        return newest - held >= self.current_versions and now - held_since >= self.current_seconds
