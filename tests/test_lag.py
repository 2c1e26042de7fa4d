"""Deliberate sampler lag: the policy's decisions and the paper's log-normal quantiles."""

from __future__ import annotations

import random

import pytest

from heterorl.common.config import from_flat
from heterorl.node.lag import LagPolicy, lognormal_lag
from heterorl.node.config import SamplerConfig


def test_no_lag_refreshes_whenever_newer():
    policy = LagPolicy()
    assert not policy.active
    assert policy.due(held=0, held_since=0.0, newest=1, now=0.0)  # nothing loaded yet
    assert policy.due(held=3, held_since=0.0, newest=4, now=0.0)
    assert not policy.due(held=4, held_since=0.0, newest=4, now=100.0)


def test_version_lag_waits_until_the_learner_is_far_enough_ahead():
    policy = LagPolicy(versions=8)
    assert policy.due(held=0, held_since=0.0, newest=5, now=0.0)
    assert not policy.due(held=5, held_since=0.0, newest=12, now=1e6)
    assert policy.due(held=5, held_since=0.0, newest=13, now=0.0)


def test_time_lag_and_version_lag_must_both_hold():
    policy = LagPolicy(versions=2, seconds=30.0)
    assert not policy.due(held=1, held_since=100.0, newest=10, now=120.0)  # far ahead but held only 20 s
    assert not policy.due(held=1, held_since=100.0, newest=2, now=200.0)  # held long but only 1 version behind
    assert policy.due(held=1, held_since=100.0, newest=3, now=130.0)


def test_lognormal_matches_the_papers_quantiles():
    rng = random.Random(0)
    draws = sorted(lognormal_lag(1920.0, rng) for _ in range(200_000))
    lo, hi = draws[int(0.0025 * len(draws))], draws[int(0.9975 * len(draws))]
    assert lo == pytest.approx(60.0, rel=0.05)
    assert hi == pytest.approx(1920.0, rel=0.05)


def test_lognormal_policy_draws_a_new_lag_each_refresh_within_its_range():
    policy = LagPolicy(versions=64, dist="lognormal", seed=3)
    seen = set()
    for _ in range(200):
        assert 0 < policy.current_versions < 64 * 3
        seen.add(round(policy.current_versions, 6))
        policy.draw()
    assert len(seen) > 150


@pytest.mark.parametrize("kwargs", [{"lag_versions": -1}, {"lag_seconds": -1.0}, {"lag_dist": "uniform"}])
def test_bad_lag_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        from_flat(SamplerConfig, **kwargs)
