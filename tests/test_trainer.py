"""The trainer's log-probs: the shared-prompt path equals the plain full-sequence forward, values and gradients."""

from __future__ import annotations

import random

import torch

from heterorl.common.model import load_causal_lm, resolve_model
from heterorl.server.losses import LossConfig
from heterorl.server.store import StoredCompletion, StoredGroup
from heterorl.server.trainer import Trainer, TrainerConfig, completion_logprobs, group_logprobs


def _model(tiny_cache):
    return load_causal_lm(resolve_model("tiny", cache=tiny_cache)).float()


def test_shared_prompt_logprobs_and_gradients_equal_the_full_forward(tiny_cache):
    model = _model(tiny_cache)
    rng = random.Random(3)
    prompt = [rng.randrange(4, 90) for _ in range(11)]
    completions = [[rng.randrange(4, 90) for _ in range(n)] for n in (1, 5, 3, 7)]
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 5, 0.8)):
        model.zero_grad()
        fast, fast_mask = group_logprobs(model, prompt, completions, temperature, 0, top_k, top_p)
        (fast * torch.linspace(0.5, 2.0, fast.numel()).view_as(fast)).sum().backward()
        fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        plain, plain_mask = completion_logprobs(
            model, [prompt + c for c in completions], [len(prompt)] * len(completions), temperature, 0, top_k, top_p
        )
        (plain * torch.linspace(0.5, 2.0, plain.numel()).view_as(plain)).sum().backward()
        assert torch.equal(fast_mask, plain_mask)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(fast_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
        assert (fast[fast_mask] < 0).all() and (fast[~fast_mask] == 0).all()


def _group(rng, prompt_len, g, rewards):
    prompt = [rng.randrange(4, 90) for _ in range(prompt_len)]
    comps = []
    for r in rewards:
        n = rng.randint(1, 6)
        comps.append(StoredCompletion([rng.randrange(4, 90) for _ in range(n)], [-2.0] * n, 1, r, None))
    return StoredGroup("L", "S", 0, prompt, 1, tuple(comps[:g]), 0.0)


def test_a_step_moves_weights_only_when_groups_carry_signal(tiny_cache):
    rng = random.Random(0)
    trainer = Trainer(_model(tiny_cache), pad_id=0, config=TrainerConfig(
        lr=1e-2, weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, loss=LossConfig(), device="cpu", micro_batch_tokens=60))
    before = {k: v.clone() for k, v in trainer.snapshot(torch.float32).items()}
    flat = [_group(rng, 9, 4, [1.0] * 4), _group(rng, 12, 4, [0.0] * 4)]
    metrics = trainer.train_step(flat)
    assert metrics["grad_norm"] == 0.0, "identical rewards must give no gradient"
    assert all(torch.equal(before[k], v) for k, v in trainer.snapshot(torch.float32).items())
    mixed = [_group(rng, 9, 4, [1.0, 0.0, 0.0, 1.0]), _group(rng, 7, 4, [0.0, 0.5, 1.0, 0.0]),
             _group(rng, 10, 4, [0.0, 0.0, 0.0, 1.0])]
    metrics = trainer.train_step(mixed)
    assert metrics["grad_norm"] > 0 and trainer.step == 2
    changed = [k for k, v in trainer.snapshot(torch.float32).items() if not torch.equal(before[k], v)]
    assert changed
