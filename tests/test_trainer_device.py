"""`--device` and `--compute-dtype`: resolution on any host, and a step whose every tensor sits on the device."""

from __future__ import annotations

import random

import pytest
import torch

from heterorl.common.config import from_flat
from heterorl.common.model import load_causal_lm, resolve_model
from heterorl.server.config import LearnerConfig
from heterorl.server.losses import LossConfig
from heterorl.server.precision import resolve_compute_dtype, resolve_device
from heterorl.server.store import StoredCompletion, StoredGroup
from heterorl.server.trainer import Trainer, TrainerConfig


def test_auto_picks_cuda_only_when_present_and_cuda_without_it_is_refused():
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda")
    assert resolve_device("cuda:1", cuda_available=True) == torch.device("cuda", 1)
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda", cuda_available=False)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError):
            resolve_device(bad)


def test_compute_dtype_auto_is_bf16_on_cuda_and_explicit_choices_win():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compute_dtype("auto", cuda) == torch.bfloat16
    assert resolve_compute_dtype("auto", cpu) == torch.float32
    assert resolve_compute_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_compute_dtype("fp32", cuda) == torch.float32
    with pytest.raises(ValueError):
        resolve_compute_dtype("fp16", cpu)


def test_train_settings_are_checked_where_the_config_is_built():
    config = from_flat(LearnerConfig, device="cuda:0", compute_dtype="bf16", micro_batch_tokens=512,
                       grad_checkpointing=True)
    assert (config.train.device, config.train.compute_dtype, config.train.micro_batch_tokens) == ("cuda:0", "bf16", 512)
    for bad in ({"device": "tpu"}, {"compute_dtype": "half"}, {"micro_batch_tokens": -1}):
        with pytest.raises(ValueError):
            from_flat(LearnerConfig, **bad)


def _groups(seed: int) -> list[StoredGroup]:
    rng = random.Random(seed)
    groups = []
    for rewards in ([1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0]):
        prompt = [rng.randrange(4, 90) for _ in range(rng.randint(5, 12))]
        comps = []
        for r in rewards:
            n = rng.randint(1, 6)
            comps.append(StoredCompletion([rng.randrange(4, 90) for _ in range(n)], [-2.0] * n, 1, r, None))
        groups.append(StoredGroup("L", "S", 0, prompt, 1, tuple(comps), 0.0))
    return groups


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_a_step_on_an_explicit_cpu_keeps_fp32_master_weights(tiny_cache, compute_dtype):
    model = load_causal_lm(resolve_model("tiny", cache=tiny_cache)).float()
    trainer = Trainer(model, pad_id=0, config=TrainerConfig(
        lr=1e-2, weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, loss=LossConfig(), device="cpu",
        compute_dtype=compute_dtype))
    assert trainer.device == torch.device("cpu")
    before = trainer.snapshot(torch.float32)
    metrics = trainer.train_step(_groups(0))
    assert metrics["grad_norm"] > 0
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in trainer.model.parameters())
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    after = trainer.snapshot(torch.float32)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    published = trainer.snapshot()
    assert all(published[k].dtype == torch.bfloat16 and torch.equal(published[k], after[k].to(torch.bfloat16))
               for k in after)


def test_gradient_checkpointing_gives_the_same_step(tiny_cache):
    weights = []
    for ckpt in (False, True):
        model = load_causal_lm(resolve_model("tiny", cache=tiny_cache)).float()
        trainer = Trainer(model, pad_id=0, config=TrainerConfig(
            lr=1e-3, weight_decay=0.0, max_grad_norm=0.0, temperature=0.7, loss=LossConfig(), device="cpu",
            compute_dtype="fp32", grad_checkpointing=ckpt))
        metrics = trainer.train_step(_groups(1))
        weights.append((metrics["loss"], metrics["grad_norm"], trainer.snapshot(torch.float32)))
    (loss0, norm0, w0), (loss1, norm1, w1) = weights
    assert loss1 == pytest.approx(loss0, rel=1e-5) and norm1 == pytest.approx(norm0, rel=1e-4)
    assert any(not torch.equal(w0[k], v) for k, v in load_causal_lm(resolve_model("tiny", cache=tiny_cache))
               .state_dict().items() if k in w0)
    for key, value in w0.items():
        torch.testing.assert_close(w1[key], value, rtol=0, atol=1e-5, msg=key)
