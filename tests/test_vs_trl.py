"""benchmarks/vs_trl.py's pieces that decide what is compared: the matched settings reach both arms unchanged, and
the speedup is read off the curves as documented. CPU-light: no model is trained here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module
    spec.loader.exec_module(module)
    return module


vs = _load()


def test_matched_defaults_are_the_learners_and_reach_the_learner_flags():
    from heterorl.common.config import parse
    from heterorl.server.config import LearnerConfig

    m = vs.Matched.from_learner_defaults(steps=7, eval_every=3, eval_size=50)
    defaults = LearnerConfig()
    assert (m.group_size, m.prompts_per_step, m.lr, m.max_new_tokens, m.temperature) == (
        defaults.train.group_size, defaults.train.groups_per_step, defaults.train.lr,
        defaults.sampling.max_new_tokens, defaults.sampling.temperature)
    # Parse the flags the benchmark gives the learner as the learner does: every matched value arrives.
    config = parse(LearnerConfig, "heterorl-learner", "", vs.learner_flags(m, "bf16"))
    assert config.run.max_steps == 7 and config.eval.eval_every == 3 and config.eval.eval_size == 50
    assert config.train.group_size == m.group_size and config.train.groups_per_step == m.prompts_per_step
    assert config.train.lr == m.lr and config.sampling.max_new_tokens == m.max_new_tokens
    assert config.sampling.temperature == m.temperature and config.loss.beta_k3 == 0.0
    assert config.train.compute_dtype == "bf16"
    assert m.eval_steps() == [0, 3, 6, 7]


def test_trl_config_gets_the_same_settings():
    trl = pytest.importorskip("trl", reason="TRL is the `bench` extra")
    m = vs.Matched.from_learner_defaults(steps=5, lr=1e-5)
    c = trl.GRPOConfig(**vs.trl_config_kwargs(m, Path("unused-out"), bf16=False))
    assert c.num_generations == m.group_size
    # One optimizer step per generation batch of B prompts x G completions, each prompt's G in one group.
    assert c.per_device_train_batch_size == m.prompts_per_step * m.group_size
    assert c.generation_batch_size == m.prompts_per_step * m.group_size and c.gradient_accumulation_steps == 1
    assert (c.max_completion_length, c.temperature, c.learning_rate, c.max_steps) == (
        m.max_new_tokens, m.temperature, 1e-5, 5)
    assert c.beta == 0.0 and c.loss_type == vs.TRL_LOSS and c.scale_rewards == "none"
    assert c.lr_scheduler_type == "constant" and c.shuffle_dataset is False and c.num_iterations == 1


def test_time_to_interpolates_and_speedup_falls_back_at_heterorls_best():
    P = vs.Point
    trl = [P(0, 0.0, 0.40), P(10, 100.0, 0.60), P(20, 200.0, 0.80)]
    het = [P(0, 0.0, 0.40), P(10, 40.0, 0.70), P(20, 80.0, 0.90)]
    assert vs.time_to(het, 0.80) == pytest.approx(60.0)  # halfway between 0.70 at 40 s and 0.90 at 80 s
    ratio, at, how = vs.speedup(trl, het)
    assert ratio == pytest.approx(200.0 / 60.0) and at == pytest.approx(60.0) and "reached" in how
    # heterorl stops at 0.70 < 0.80: compare at 0.70, which TRL reaches at 150 s.
    slow = [P(0, 0.0, 0.40), P(10, 40.0, 0.70), P(20, 80.0, 0.65)]
    ratio, at, how = vs.speedup(trl, slow)
    assert ratio == pytest.approx(150.0 / 40.0) and at == 40.0 and "never reached" in how
    assert vs.time_to(slow, 0.95) is None
