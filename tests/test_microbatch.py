"""Micro-batches of whole groups under a token budget: the same loss and the same step as the whole batch."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from heterorl.common.model import load_causal_lm, resolve_model
from heterorl.server.losses import LOSS_NAMES, BatchNorms, LossConfig
from heterorl.server.microbatch import batch_norms, group_tokens, plan_micro_batches
from heterorl.server.store import StoredCompletion, StoredGroup
from heterorl.server.trainer import Trainer, TrainerConfig, group_logprobs


def _group(rng: random.Random, model, lengths: list[int], rewards: list[float]) -> StoredGroup:
    """A group whose claimed log-probs are the model's own plus noise, so ratios sit near 1 and gradients flow."""
    prompt = [rng.randrange(4, 90) for _ in range(rng.randint(4, 14))]
    tokens = [[rng.randrange(4, 90) for _ in range(n)] for n in lengths]
    with torch.no_grad():
        logprobs, _ = group_logprobs(model, prompt, tokens, 1.0, 0) if max(lengths) else (None, None)
    comps = []
    for row, (toks, r) in enumerate(zip(tokens, rewards)):
        claimed = [float(logprobs[row, j]) + rng.uniform(-0.1, 0.1) for j in range(len(toks))]
        comps.append(StoredCompletion(toks, claimed, 1, r, None))
    return StoredGroup(f"L{rng.random()}", "S", 0, prompt, 1, tuple(comps), 0.0)


@pytest.fixture(scope="module")
def setup(tiny_cache):
    model = load_causal_lm(resolve_model("tiny", cache=tiny_cache)).float()
    rng = random.Random(5)
    shapes = [([3, 7, 1, 5], [1.0, 0.0, 0.0, 1.0]), ([2, 0, 9, 4], [0.0, 0.5, 1.0, 0.0]),  # a zero-length one
              ([12, 11, 2, 6], [0.0, 0.0, 1.0, 0.0]), ([1, 1, 3, 2], [1.0, 1.0, 1.0, 1.0]),
              ([4, 8, 5, 2], [0.2, 0.9, 0.1, 0.4])]
    return model, [_group(rng, model, lengths, rewards) for lengths, rewards in shapes]


def test_plans_keep_whole_groups_in_order_and_a_big_group_alone(setup):
    _, groups = setup
    sizes = [group_tokens(g) for g in groups]
    budget = max(sizes) - 1  # the biggest group does not fit: it must go alone
    plan = plan_micro_batches(groups, budget)
    assert [g for batch in plan for g in batch] == groups
    for batch in plan:
        assert len(batch) == 1 or sum(group_tokens(g) for g in batch) <= budget
    assert [groups[sizes.index(max(sizes))]] in plan
    assert plan_micro_batches(groups, 0) == [groups] and plan_micro_batches(groups, 1) == [[g] for g in groups]
    with pytest.raises(ValueError):
        plan_micro_batches(groups, -1)


def test_batch_norms_from_groups_equal_those_of_the_padded_mask(setup):
    _, groups = setup
    lengths = [[len(c.token_ids) for c in g.completions] for g in groups]
    width = max(max(row) for row in lengths)
    mask = torch.tensor([[[j < n for j in range(width)] for n in row] for row in lengths])
    assert batch_norms(groups) == BatchNorms.of(mask) == BatchNorms(sequences=19, tokens=sum(map(sum, lengths)),
                                                                    width=12)


def _step(model, groups, loss: LossConfig, budget: int):
    """One step; returns its metrics, the gradient the optimizer saw and the updated fp32 weights."""
    trainer = Trainer(copy.deepcopy(model), pad_id=0, config=TrainerConfig(
        lr=LR, weight_decay=0.01, max_grad_norm=0.0, temperature=1.0, loss=loss, device="cpu",
        compute_dtype="fp32", micro_batch_tokens=budget))
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    metrics = trainer.train_step(groups)
    return metrics, grads, trainer.snapshot(torch.float32)


LR = 1e-3


@pytest.mark.parametrize(("name", "beta_k3"), [(name, 0.05) for name in LOSS_NAMES] + [("gepo", 0.0)])
def test_micro_batched_step_equals_the_whole_batch_step(setup, name, beta_k3):
    model, groups = setup
    loss = LossConfig(name=name, beta_k3=beta_k3)
    whole, whole_grads, whole_weights = _step(model, groups, loss, 0)
    assert whole["grad_norm"] > 0
    scale = max(float(g.abs().max()) for g in whole_grads.values())
    for budget in (1, 2 * max(group_tokens(g) for g in groups)):
        assert len(plan_micro_batches(groups, budget)) > 1
        micro, micro_grads, micro_weights = _step(model, groups, loss, budget)
        for key in ("loss", "grad_norm", "kl_k3", "is_weight_mean", "is_weight_var"):
            assert micro[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
        assert micro_grads.keys() == whole_grads.keys()
        for key, value in whole_grads.items():  # the gradient of the full-batch loss, to float rounding
            torch.testing.assert_close(micro_grads[key], value, rtol=1e-4, atol=1e-6 * scale, msg=key)
        # AdamW's first step is about lr * g/|g|, which magnifies rounding where g is ~0 by cancellation: the
        # weights agree to 1% of one step (a wrongly weighted micro-batch moves whole tensors by ~lr).
        for key, value in whole_weights.items():
            torch.testing.assert_close(micro_weights[key], value, rtol=0, atol=1e-2 * LR, msg=key)
    again = _step(model, groups, loss, 0)[2]
    assert all(torch.equal(whole_weights[k], v) for k, v in again.items())  # the comparison itself is deterministic
