"""Which engine a sampler runs: the one place that knows both engines (they know only their shared base)."""

from __future__ import annotations

from pathlib import Path

import torch

from heterorl.node.engine_base import ENGINE_VLLM, Engine, check_engine, default_engine

__all__ = ["check_engine", "create_engine", "default_engine"]


def create_engine(name: str, model_dir: Path, seed: int = 0, weights_dtype: torch.dtype = torch.bfloat16) -> Engine:
    """The engine called `name` for the model architecture in `model_dir` (weights arrive later, verified)."""
    check_engine(name)
    if name == ENGINE_VLLM:
        from heterorl.node.engine_vllm import VLLMEngine  # imports vLLM only when it is the engine asked for

        return VLLMEngine(model_dir, seed=seed, weights_dtype=weights_dtype)
    from heterorl.node.engine import TransformersEngine

    return TransformersEngine(model_dir, seed=seed, weights_dtype=weights_dtype)
