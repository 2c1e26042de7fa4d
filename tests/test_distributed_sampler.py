"""A multi-GPU sampler host: `--device cuda:N` for the transformers engine and `--tensor-parallel-size` for vLLM.

This machine has no GPU, so these test everything around the GPU path: the settings and their combinations, the
device resolution, and the refusals a CPU-only host must give by name (the GPU path itself runs in the device
check of issue 11).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from heterorl.common.config import from_flat
from heterorl.common.model import resolve_model
from heterorl.node.config import SamplerConfig
from heterorl.node.engine import TransformersEngine, sampler_device
from heterorl.node.engine_base import ENGINE_TRANSFORMERS, ENGINE_VLLM, vllm_installed
from heterorl.node.engine_factory import check_engine_device, create_engine
from heterorl.node.engine_vllm import VLLMOptions


def test_device_and_tensor_parallel_settings_are_checked_by_name():
    config = from_flat(SamplerConfig, engine=ENGINE_TRANSFORMERS, device="cuda:1")
    assert (config.sampler.device, config.sampler.tensor_parallel_size) == ("cuda:1", 1)
    with pytest.raises(ValueError, match="needs --engine vllm"):
        from_flat(SamplerConfig, engine=ENGINE_TRANSFORMERS, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        from_flat(SamplerConfig, engine=ENGINE_TRANSFORMERS, device="gpu0")
    with pytest.raises(ValueError, match="tensor_parallel_size must be in 1..64"):
        check_engine_device(ENGINE_VLLM, "cuda", 0)
    check_engine_device(ENGINE_VLLM, "cuda", 8)  # vLLM over 8 GPUs of one host
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=3"):
        check_engine_device(ENGINE_VLLM, "cuda:3", 1)


@pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed")
def test_vllm_settings_reach_its_options():
    config = from_flat(SamplerConfig, engine=ENGINE_VLLM, device="cuda", tensor_parallel_size=4)
    assert config.sampler.tensor_parallel_size == 4
    assert VLLMOptions(tensor_parallel_size=4).tensor_parallel_size == 4
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        VLLMOptions(tensor_parallel_size=0)


def test_sampler_device_resolution():
    assert sampler_device("cpu") == torch.device("cpu")
    assert sampler_device("cuda:3", cuda_available=True) == torch.device("cuda:3")
    with pytest.raises(ValueError, match="no CUDA device"):
        sampler_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        sampler_device("cuda:x", cuda_available=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a host without CUDA")
def test_a_gpu_engine_on_a_host_without_one_is_refused(tiny_cache):
    model_dir = resolve_model("tiny", cache=tiny_cache)
    with pytest.raises(ValueError, match="no CUDA device"):
        TransformersEngine(model_dir, device="cuda:0")
    with pytest.raises(ValueError, match="needs --engine vllm"):
        create_engine(ENGINE_TRANSFORMERS, model_dir, tensor_parallel_size=2)
    engine = create_engine(ENGINE_TRANSFORMERS, model_dir, device="cpu")  # the CPU path: one copy, generating
    assert engine.device == torch.device("cpu") and engine.model.device == torch.device("cpu")
    assert all(engine._device_params[n].data_ptr() == t.data_ptr() for n, t in engine.params.items())  # one copy


def test_the_sampler_command_refuses_a_bad_combination_before_connecting():
    done = subprocess.run([sys.executable, "-m", "heterorl.node.main", "--learner", "127.0.0.1:1", "--engine",
                           "transformers", "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--tensor-parallel-size 2 needs --engine vllm" in done.stderr
