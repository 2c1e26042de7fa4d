"""Generation engines: G sampled completions per prompt with the per-token log-probs they were sampled with.

An engine holds exactly one weight version at a time and reports it with every group, so a version switch can
never land inside a group. `TransformersEngine` runs anywhere (CPU included) and computes in fp32 from weights
that are exactly the published bf16 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from heterorl.common import codec
from heterorl.common.model import load_tokenizer
from heterorl.common.weights import ENCODING_DELTA, WeightsCorrupt, weight_tensors
from heterorl.v1 import learner_pb2 as pb


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int

    @classmethod
    def from_proto(cls, params: pb.SamplingParams) -> "SamplingSettings":
        return cls(params.temperature, params.top_p, params.top_k, params.max_new_tokens)


@dataclass(frozen=True)
class GeneratedCompletion:
    token_ids: list[int]
    logprobs: list[float]  # log-probs under the distribution sampled from (temperature, top-k/top-p applied)
    finish_reason: int     # pb.FINISH_REASON_STOP or pb.FINISH_REASON_LENGTH
    text: str


class TransformersEngine:
    name = "transformers"

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
        rows = [p for p in prompts for _ in range(group_size)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, prompt in enumerate(rows):  # left padding: every row continues at the right edge
            ids[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[r, width - len(prompt) :] = 1
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
                group.append(
                    GeneratedCompletion(
                        token_ids=tokens,
                        logprobs=logprobs[r, : len(tokens)].tolist(),
                        finish_reason=finish,
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    )
                )
            groups.append(group)
        return groups
