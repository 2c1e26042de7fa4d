"""The transformers engine: runs anywhere (CPU included), computing in fp32 from weights that are exactly the
published values (an fp32 upcast of a bf16 version is exact, and is hashed as the version's dtype).

Generation, verification and stop handling follow `heterorl.node.engine_base`; stop strings also end a row's
generation early (a stopping criterion), so a batch does not run every row to max_new_tokens.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from heterorl.common.model import left_pad, load_tokenizer
from heterorl.common.weights import weight_tensors
from heterorl.node.engine_base import (
    ENGINE_TRANSFORMERS,
    EngineBase,
    GeneratedCompletion,
    SamplingSettings,
)

__all__ = ["GeneratedCompletion", "SamplingSettings", "TransformersEngine"]


class _StopStrings(StoppingCriteria):
    """Ends a row once its decoded completion contains a stop string (the exact cut is made afterwards)."""

    def __init__(self, prompt_width: int, decode: Callable[[Sequence[int]], str], stop: Sequence[str]):
        self.prompt_width, self.decode, self.stop = prompt_width, decode, tuple(stop)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        rows = input_ids[:, self.prompt_width :].tolist()
        done = [any(s in self.decode(row) for s in self.stop) for row in rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def sampler_device(spec: str, cuda_available: bool | None = None) -> torch.device:
    """The torch device of `--device` (cpu, cuda, cuda:N); a GPU this host does not have is an error by name."""
    if spec == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", spec):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {spec!r}")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not has_cuda:
        raise ValueError(f"--device {spec}: torch sees no CUDA device on this host (use --device cpu)")
    if ":" in spec and cuda_available is None and int(spec.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this host has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec)


class TransformersEngine(EngineBase):
    name = ENGINE_TRANSFORMERS

    def __init__(self, model_dir: Path, seed: int = 0, weights_dtype: torch.dtype = torch.bfloat16,
                 device: str = "cpu"):
        """`device`: cpu, cuda or cuda:N. Updates are applied and verified in the CPU copy (`params`, what the codec
        writes into and the digest reads), then copied to the device model that generates."""
        super().__init__(load_tokenizer(model_dir), weights_dtype)
        self.device = sampler_device(device)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval()
        self.params = weight_tensors(model)
        self.model = model if self.device.type == "cpu" else copy.deepcopy(model).to(self.device)
        self._device_params = weight_tensors(self.model)
        self.generator_seed = seed
        torch.manual_seed(seed)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @torch.no_grad()
    def load_weights(self, encoding: str, payload: bytes | bytearray, version: int, base_version: int,
                     weights_sha256: str) -> None:
        """Apply a verified payload in place; the engine refuses to run unless the result hashes right."""
        self._begin_update(encoding, version, base_version, weights_sha256)
        self._apply_payload(payload, self.params, version)
        digest = self._digest(self.params, weights_sha256)
        if digest == weights_sha256 and self.device.type != "cpu":  # only verified weights reach the device
            for name, tensor in self._device_params.items():
                tensor.copy_(self.params[name], non_blocking=True)
            torch.cuda.synchronize(self.device)
        self._verified(digest, weights_sha256, version)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], group_size: int, sampling: SamplingSettings) -> list[list[GeneratedCompletion]]:
        """group_size completions for each prompt, all from the current version, batched in one call."""
        if self.version == 0:
            raise RuntimeError("no verified weights loaded")
        ids, attention = left_pad([p for p in prompts for _ in range(group_size)], self.pad_id)
        ids, attention = ids.to(self.device), attention.to(self.device)
        width = ids.shape[1]
        generation = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        stopping = StoppingCriteriaList([_StopStrings(width, self.decode, sampling.stop)] if sampling.stop else [])
        out = self.model.generate(input_ids=ids, attention_mask=attention, generation_config=generation,
                                  stopping_criteria=stopping)
        new_tokens = out.sequences[:, width:]
        # `scores` are the processed logits the sampler drew from (temperature, top-k, top-p applied).
        scores = torch.stack(out.scores, dim=1).float()  # [rows, steps, vocab]
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)
        rows = [self.completion(new_tokens[r].tolist(), logprobs[r].tolist(), sampling) for r in range(len(ids))]
        return [rows[p * group_size : (p + 1) * group_size] for p in range(len(prompts))]

    def close(self) -> None:
        """Nothing to release: the model is plain tensors, freed with the engine."""
