"""The optimizer side: fp32 master weights, per-token log-probs of sampled completions, one GEPO step.

The trainer knows nothing about gRPC or leases; it turns a list of stored groups into one optimizer step and
hands out bf16 snapshots of the weights for publishing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from heterorl.common.tasks import Problem
from heterorl.common.weights import weight_tensors
from heterorl.server.losses import LossConfig, policy_loss
from heterorl.server.store import StoredGroup


@dataclass(frozen=True)
class TrainerConfig:
    lr: float
    weight_decay: float
    max_grad_norm: float
    temperature: float
    loss: LossConfig
    micro_groups: int = 4  # groups per forward/backward; bounds the memory of the logits


def completion_logprobs(
    model: torch.nn.Module, sequences: list[list[int]], prompt_lens: list[int], temperature: float, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each sequence's completion part under `model` at `temperature`.

    Returns (logprobs [B, T], mask [B, T]) where T is the longest completion; padding is masked out.
    """
    device = next(model.parameters()).device
    lengths = [len(s) for s in sequences]
    max_len = max(lengths)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(sequences), max_len), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention).logits  # [B, L, V]
    comp_lens = [n - p for n, p in zip(lengths, prompt_lens)]
    width = max(comp_lens)
    # Position t predicts token t+1: the completion token at absolute index p+j is scored by logits[p+j-1].
    starts = torch.tensor(prompt_lens, device=device) - 1
    offsets = torch.arange(width, device=device)
    positions = (starts[:, None] + offsets[None, :]).clamp(max=max_len - 2)
    mask = offsets[None, :] < torch.tensor(comp_lens, device=device)[:, None]
    rows = torch.arange(len(sequences), device=device)[:, None]
    picked = logits[rows, positions].float() / temperature  # [B, T, V]
    targets = input_ids[rows, positions + 1]
    logprobs = picked.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    return logprobs.masked_fill(~mask, 0.0), mask


class Trainer:
    def __init__(self, model: torch.nn.Module, pad_id: int, config: TrainerConfig):
        self.model = model.float().train()
        self.pad_id = pad_id
        self.config = config
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0

    def train_step(self, groups: list[StoredGroup]) -> dict[str, float]:
        """One optimizer step on whole groups; returns the step's metrics (loss evidence, grad norm, time)."""
        if not groups:
            raise ValueError("train_step needs at least one group")
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_total = len(groups)
        sums: dict[str, float] = {}
        maxes: dict[str, float] = {}
        for first in range(0, n_total, self.config.micro_groups):
            chunk = groups[first : first + self.config.micro_groups]
            out = self._loss(chunk)
            # Every loss is a mean over sequences of per-group terms, so whole-group micro-batches add up
            # exactly when weighted by their share of the groups.
            (out.loss * (len(chunk) / n_total)).backward()
            for key, value in out.metrics.items():
                if key.endswith("_max"):
                    maxes[key] = max(maxes.get(key, -math.inf), value)
                else:
                    sums[key] = sums.get(key, 0.0) + value * len(chunk) / n_total
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {**sums, **maxes}
        metrics["grad_norm"] = float(grad_norm)
        metrics["train_seconds"] = time.perf_counter() - started
        return metrics

    def _loss(self, groups: list[StoredGroup]):
        sequences, prompt_lens, behaviour, rewards = [], [], [], []
        for group in groups:
            for comp in group.completions:
                sequences.append(list(group.prompt_token_ids) + list(comp.token_ids))
                prompt_lens.append(len(group.prompt_token_ids))
                behaviour.append(comp.logprobs)
                rewards.append(comp.reward)
        logprobs, mask = completion_logprobs(
            self.model, sequences, prompt_lens, self.config.temperature, self.pad_id
        )
        behaviour_t = torch.zeros_like(logprobs)
        for row, values in enumerate(behaviour):
            behaviour_t[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        n, g = len(groups), len(groups[0].completions)
        shape = (n, g, logprobs.shape[-1])
        return policy_loss(
            logprobs.view(shape),
            behaviour_t.view(shape),
            mask.view(shape),
            torch.tensor(rewards, dtype=torch.float32).view(n, g),
            self.config.loss,
        )

    def snapshot(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The weights as published: each parameter cast to `dtype` (a fresh copy, safe to encode later)."""
        return {name: t.detach().to(dtype).contiguous() for name, t in weight_tensors(self.model).items()}

    @torch.no_grad()
    def evaluate(self, problems: list[Problem], encode, decode, reward_fn, max_new_tokens: int,
                 batch_size: int = 32) -> float:
        """Greedy held-out accuracy: fraction of problems whose greedy answer earns reward >= 1."""
        if not problems:
            return float("nan")
        self.model.eval()
        correct = 0
        for first in range(0, len(problems), batch_size):
            batch = problems[first : first + batch_size]
            prompts = [encode(p) for p in batch]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, p in enumerate(prompts):  # left padding: generation continues at the right edge
                ids[row, width - len(p) :] = torch.tensor(p)
                attention[row, width - len(p) :] = 1
            out = self.model.generate(
                input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
            )
            for row, problem in enumerate(batch):
                text = decode(out[row, width:].tolist())
                correct += reward_fn(text, problem.answer) >= 1.0
        self.model.train()
        return correct / len(problems)
