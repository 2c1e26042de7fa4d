"""Which engine a sampler runs: the one place that knows both engines (they know only their shared base)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from heterorl.node.engine_base import ENGINE_VLLM, Engine, check_engine, default_engine

__all__ = ["check_engine", "check_engine_device", "create_engine", "default_engine"]

_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


def check_engine_device(engine: str, device: str, tensor_parallel_size: int = 1) -> None:
    """Syntax and combinations of `--device` and `--tensor-parallel-size` (checked where the config is read,
    before any GPU is asked for): the transformers engine runs on one device it is given; vLLM spreads a model
    over `tensor_parallel_size` GPUs it chooses itself (CUDA_VISIBLE_DEVICES restricts them)."""
    if not _DEVICE.match(device):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if not 1 <= tensor_parallel_size <= 64:
        raise ValueError(f"tensor_parallel_size must be in 1..64, got {tensor_parallel_size}")
    if engine == ENGINE_VLLM:
        if device.startswith("cuda:"):
            raise ValueError(f"--device {device}: vLLM chooses its GPUs itself; give --device cuda and restrict it "
                             f"with CUDA_VISIBLE_DEVICES={device.split(':')[1]}")
    elif tensor_parallel_size != 1:
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} needs --engine vllm (the {engine} engine "
                         f"runs on one device)")


def create_engine(name: str, model_dir: Path, seed: int = 0, weights_dtype: torch.dtype = torch.bfloat16,
                  device: str = "cpu", tensor_parallel_size: int = 1) -> Engine:
    """The engine called `name` for the model architecture in `model_dir` (weights arrive later, verified)."""
    check_engine(name)
    check_engine_device(name, device, tensor_parallel_size)
    if name == ENGINE_VLLM:
        from heterorl.node.engine_vllm import VLLMEngine, VLLMOptions  # imports vLLM only when it is asked for

        return VLLMEngine(model_dir, seed=seed, weights_dtype=weights_dtype,
                          options=VLLMOptions(tensor_parallel_size=tensor_parallel_size))
    from heterorl.node.engine import TransformersEngine

    return TransformersEngine(model_dir, seed=seed, weights_dtype=weights_dtype, device=device)
