"""The run's reward, contained: a reward that raises, hangs, crashes or returns no number refuses that group with a
reason, is counted, and neither the caller nor the learner dies."""

from __future__ import annotations

import time

import grpc
import pytest

from heterorl.common.contract import Reason
from heterorl.server.errors import Refused
from heterorl.server.rewards import Scorer

PATH = "reward_fixtures:"


def refusal(call) -> Refused:
    with pytest.raises(Refused) as info:
        call()
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    return info.value


def test_a_builtin_reward_runs_inline_and_bad_values_are_refused():
    scorer = Scorer("last_number", timeout_s=1.0)
    assert scorer.score(["the answer is 4", "5"], "4") == [1.0, 0.0]
    assert scorer.counts.refused == 0


def test_a_custom_reward_that_fails_in_every_way_is_refused_counted_and_replaced():
    scorer = Scorer(PATH + "raises_on_odd", timeout_s=1.0, workers=1)
    try:
        assert scorer.score(["a", "b"], "2") == [0.5, 0.5]
        assert refusal(lambda: scorer.score(["a"], "3")).reason is Reason.REWARD_FAILED
        assert scorer.score(["a"], "4") == [0.5]  # the same worker carries on
    finally:
        scorer.close()
    scorer = Scorer(PATH + "hangs_on_odd", timeout_s=0.5, workers=1)
    try:
        began = time.monotonic()
        err = refusal(lambda: scorer.score(["a"], "1"))
        assert err.reason is Reason.REWARD_TIMEOUT and time.monotonic() - began < 10
        assert scorer.score(["a"], "2") == [0.5]  # a fresh worker replaced the one that overran
        assert (scorer.counts.refused_timeout, scorer.counts.refused_failed) == (1, 0)
    finally:
        scorer.close()
    for name in ("exits", "not_a_number"):
        scorer = Scorer(PATH + name, timeout_s=5.0, workers=1)
        try:
            assert refusal(lambda: scorer.score(["a"], "1")).reason is Reason.REWARD_FAILED
            assert refusal(lambda: scorer.score(["a"], "1")).reason is Reason.REWARD_FAILED  # and again
            assert scorer.counts.refused_failed == 2
        finally:
            scorer.close()


def test_evaluation_scores_a_failing_reward_zero_and_counts_it():
    scorer = Scorer(PATH + "raises_on_odd", timeout_s=1.0, workers=1)
    try:
        assert scorer.score_or_zero("a", "3") == 0.0 and scorer.score_or_zero("a", "2") == 0.5
        assert scorer.counts.eval_failures == 1 and scorer.counts.refused == 0
    finally:
        scorer.close()


def test_a_reward_that_cannot_be_imported_stops_the_learner_at_start():
    with pytest.raises(ValueError, match="no_such_module"):
        Scorer("no_such_module:f", timeout_s=1.0)
    with pytest.raises(ValueError, match="unknown reward"):
        Scorer("no_such_builtin", timeout_s=1.0)


def test_the_learner_refuses_groups_its_reward_fails_on_and_keeps_serving(tiny_cache, tmp_path, monkeypatch):
    from heterorl.common.config import from_flat
    from heterorl.server.config import LearnerConfig
    from heterorl.server.ingest import Submission
    from heterorl.server.learner import Learner

    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    learner = Learner(from_flat(LearnerConfig,
        port=0, run_dir=tmp_path / "run", model="tiny", reward=PATH + "hangs_on_odd", reward_timeout_s=0.5,
        group_size=2, groups_per_step=2, max_new_tokens=4, eval_size=0, max_inflight_groups=64, threads=1,
    ))
    try:
        sid = learner.register("s", "transformers", "cpu", 16).sampler_id
        leases = learner.lease(sid, 8)
        refused = accepted = 0
        for lease in leases:
            completions = [([5, 6], [-1.0, -1.0], 2, None)] * 2
            try:
                assert learner.submit(Submission(sid, lease.lease_id, 1, completions)) is False
                accepted += 1
            except Refused as err:
                assert err.reason is Reason.REWARD_TIMEOUT
                refused += 1
                assert learner.lease_state(lease.lease_id).value == "outstanding"  # the sampler may retry
        odd = sum(int(l.problem.answer) % 2 == 1 for l in leases)
        assert (refused, accepted) == (odd, len(leases) - odd) and 0 < odd < len(leases)
        status = learner.status()
        assert status.groups_refused_reward == refused and status.groups_pending == accepted
    finally:
        learner.close()
