"""Recomputing samplers' log-probs: honest groups pass, invented log-probs are caught and quarantine the sampler."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from heterorl.common import codec
from heterorl.common.model import encode_prompt, load_causal_lm, resolve_model
from heterorl.node.engine import SamplingSettings, TransformersEngine
from heterorl.server.store import StoredCompletion, StoredGroup
from heterorl.server.trust import TrustBook, TrustConfig, Verifier
from heterorl.common.weights import ENCODING_ANCHOR, weight_tensors

SAMPLING = SamplingSettings(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def honest(tiny_cache):
    """A real engine generates one group at version 3; the learner holds that version's bf16 snapshot."""
    model_dir = resolve_model("tiny", cache=tiny_cache)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    snapshot = {n: t.detach().to(torch.bfloat16).clone() for n, t in weight_tensors(model).items()}
    engine = TransformersEngine(model_dir, seed=1)
    engine.load_weights(ENCODING_ANCHOR, codec.encode(snapshot), 3, 0, codec.digest(snapshot))
    prompt = encode_prompt(engine.tokenizer, "What is 3 + 4?")
    [completions] = engine.generate([prompt], 6, SAMPLING)
    group = StoredGroup(
        lease_id="L-honest", sampler_id="S-1", prompt_index=0, prompt_token_ids=prompt, policy_version=3,
        completions=tuple(StoredCompletion(c.token_ids, c.logprobs, c.finish_reason, 0.0, None) for c in completions),
        accepted_at=0.0,
    )
    verifier = Verifier(model, engine.pad_id, SAMPLING.temperature)
    # The trainer's weights move on; the verifier must use the claimed version, not the current one.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    verifier.load(3, snapshot)
    return verifier, group


def _lying(group: StoredGroup, shift: float) -> StoredGroup:
    lied = tuple(dataclasses.replace(c, logprobs=[min(0.0, x + shift) for x in c.logprobs]) for c in group.completions)
    return dataclasses.replace(group, completions=lied)


def test_an_honest_group_matches_its_version(honest):
    verifier, group = honest
    assert verifier.mean_abs_diff(group) < 1e-3


def test_invented_logprobs_are_caught(honest):
    verifier, group = honest
    assert verifier.mean_abs_diff(_lying(group, 0.5)) > TrustConfig().tolerance
    flat = dataclasses.replace(group, completions=tuple(
        dataclasses.replace(c, logprobs=[-0.01] * len(c.token_ids)) for c in group.completions))
    assert verifier.mean_abs_diff(flat) > TrustConfig().tolerance


def test_the_wrong_version_is_caught(honest, tiny_cache):
    verifier, group = honest
    model = load_causal_lm(resolve_model("tiny", cache=tiny_cache), dtype=torch.float32)
    other = {n: (t.detach() * 1.5).to(torch.bfloat16) for n, t in weight_tensors(model).items()}
    verifier.load(4, other)
    try:
        assert verifier.mean_abs_diff(group) > TrustConfig().tolerance
    finally:
        snapshot = {n: t.detach().to(torch.bfloat16) for n, t in weight_tensors(model).items()}
        verifier.load(3, snapshot)


def test_quarantine_after_repeated_mismatches_only():
    book = TrustBook(TrustConfig(quarantine_after=2, tolerance=0.05))
    assert not book.record("S-1", 0.01)
    assert not book.record("S-1", 0.9)       # one mismatch is not yet enough
    assert not book.quarantined("S-1")
    assert book.record("S-1", float("nan"))  # a NaN claim counts as a mismatch
    assert book.quarantined("S-1") and not book.quarantined("S-2")
    assert book.of("S-1").verified == 3 and book.of("S-1").mismatched == 2


def test_first_groups_always_checked_then_a_stable_share():
    book = TrustBook(TrustConfig(verify_first=3, verify_fraction=0.25))
    group = lambda i: StoredGroup(f"L-{i}", "S-1", i, [1], 1, (), 0.0)  # noqa: E731
    first = [book.wants_check(group(i)) for i in range(3)]
    assert first == [True, True, True]
    rest = [book.wants_check(group(i)) for i in range(3, 4003)]
    assert 0.20 < sum(rest) / len(rest) < 0.30
    again = TrustBook(TrustConfig(verify_first=0, verify_fraction=0.25))
    assert [again.wants_check(group(i)) for i in range(3, 4003)] == rest  # by lease id, not by chance


def test_the_learner_keeps_a_lying_samplers_groups_aside_and_reports_it(tiny_cache, tmp_path, monkeypatch):
    """Real learner, real engine at the published version 1: honest groups train, invented log-probs do not."""
    from heterorl.common.config import from_flat
    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner, Submission

    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    learner = Learner(from_flat(LearnerConfig,
        port=0, run_dir=tmp_path / "run", model="tiny", reward="digit_fraction", group_size=4, groups_per_step=2,
        max_new_tokens=6, eval_size=0, max_inflight_groups=64, verify_first=4, quarantine_after=2, threads=1,
    ))
    try:
        payload = learner.versions.payload(0, 1)
        engine = TransformersEngine(resolve_model("tiny", cache=tiny_cache), seed=3)
        engine.load_weights(payload.encoding, payload.data, 1, 0, payload.weights_sha256)
        honest = learner.register("honest", "transformers", "cpu", 4)
        liar = learner.register("liar", "transformers", "cpu", 4)
        temperature = learner.config.sampling.temperature
        sampling = SamplingSettings(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=6)
        for record, lie in ((honest, False), (liar, True), (honest, False), (liar, True)):
            [lease] = learner.lease(record.sampler_id, 1)
            [group] = engine.generate([list(lease.prompt_token_ids)], 4, sampling)
            completions = [(c.token_ids, [-0.01] * len(c.token_ids) if lie else c.logprobs, c.finish_reason, None)
                           for c in group]
            learner.submit(Submission(record.sampler_id, lease.lease_id, 1, completions))
        import threading

        from heterorl.server import loop

        kept = loop.screen(learner, loop.wait_for_groups(learner, threading.Event()))
        kept += loop.screen(learner, loop.wait_for_groups(learner, threading.Event()))
        assert {g.sampler_id for g in kept} == {honest.sampler_id} and len(kept) == 2
        status = learner.status()
        views = {s.name: s for s in status.samplers}
        assert views["liar"].quarantined and views["liar"].logprob_mismatched == 2
        assert not views["honest"].quarantined and views["honest"].logprob_checked == 2
        assert views["honest"].logprob_mean_diff < 1e-3
        assert status.groups_dropped_stale == 2  # caught groups are never trained: dropped, and counted
    finally:
        learner.close()
