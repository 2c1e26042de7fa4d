"""The optimizer side: fp32 master weights, per-token log-probs of sampled completions, one GEPO step.

The trainer knows nothing about gRPC or leases; it turns a list of stored groups into one optimizer step and
hands out bf16 snapshots of the weights for publishing.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from heterorl.common.weights import weight_tensors
from heterorl.server import checkpoint as ckpt
from heterorl.server import distributed
from heterorl.server.distributed import Ranks
from heterorl.server.losses import BatchNorms, LossConfig, policy_loss
from heterorl.server.microbatch import batch_norms, plan_micro_batches
from heterorl.server.precision import autocast, resolve_compute_dtype, resolve_device
from heterorl.server.store import StoredGroup


@dataclass(frozen=True)
class TrainerConfig:
    lr: float
    weight_decay: float
    max_grad_norm: float
    temperature: float
    loss: LossConfig
    top_k: int = 0        # the run's sampling rule, so recomputed log-probs match what samplers report
    top_p: float = 1.0
    device: str = "auto"          # heterorl.server.precision.DEVICE_HELP
    compute_dtype: str = "auto"   # forward/backward arithmetic; master weights and AdamW state stay fp32
    grad_checkpointing: bool = False
    micro_batch_tokens: int = 0   # token budget of one forward/backward, whole groups each (0 = the whole batch)


def sampled_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """log-prob of each target token under the distribution the samplers draw from ([..., V] -> [...]).

    That distribution (the same in every engine, see `heterorl.node.engine`): logits / temperature, then top-k
    (keep the k largest, ties kept), then top-p over what is left (keep the smallest set of largest tokens whose
    probability reaches top_p), renormalized over the kept tokens. With top_k = 0 and top_p = 1 it is the full
    softmax. The kept set is chosen without gradient (it is a constant of the sampling rule), and the target is
    always kept: a sampled token lies in the sampler's set, and rounding must not turn a boundary token into -inf.
    """
    scaled = logits.float() / temperature
    if top_k > 0 or top_p < 1.0:
        with torch.no_grad():
            keep = torch.ones_like(scaled, dtype=torch.bool)
            if 0 < top_k < scaled.shape[-1]:
                kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
                keep = scaled >= kth
            if top_p < 1.0:
                masked = scaled.masked_fill(~keep, float("-inf"))
                ascending, order = masked.sort(dim=-1)
                below = ascending.softmax(dim=-1).cumsum(dim=-1)  # mass of this token and all smaller ones
                drop = below <= 1.0 - top_p
                drop[..., -1] = False  # the largest token always stays
                keep &= ~drop.scatter(-1, order, drop)
            keep.scatter_(-1, targets[..., None], True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return scaled.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def completion_logprobs(
    model: torch.nn.Module, sequences: list[list[int]], prompt_lens: list[int], temperature: float, pad_id: int,
    top_k: int = 0, top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each sequence's completion part under `model`, as the samplers report them.

    The plain way: one forward over every full sequence. Returns (logprobs [B, T], mask [B, T]) where T is the
    longest completion; padding is masked out. `group_logprobs` computes the same for a group more cheaply.
    Temperature, top-k and top-p are the run's sampling settings, treated as in `sampled_token_logprobs`.
    """
    device = next(model.parameters()).device
    lengths = [len(s) for s in sequences]
    max_len = max(lengths)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(sequences), max_len), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    # Only positions from the earliest prompt end on score a completion token: the [B, L, V] logits of the
    # prompts are never built (the vocabulary makes them the biggest tensor of the step).
    keep = max_len - min(prompt_lens) + 1
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=keep).logits
    comp_lens = [n - p for n, p in zip(lengths, prompt_lens, strict=True)]
    width = max(comp_lens)
    # Position t predicts token t+1: the completion token at absolute index p+j is scored by logits[p+j-1].
    starts = torch.tensor(prompt_lens, device=device) - 1
    offsets = torch.arange(width, device=device)
    positions = (starts[:, None] + offsets[None, :]).clamp(max=max_len - 2)
    mask = offsets[None, :] < torch.tensor(comp_lens, device=device)[:, None]
    rows = torch.arange(len(sequences), device=device)[:, None]
    targets = input_ids[rows, positions + 1]
    scored = logits[rows, positions - (max_len - logits.shape[1])]  # logits keep the last `keep` positions
    logprobs = sampled_token_logprobs(scored, targets, temperature, top_k, top_p)  # [B, T]
    return logprobs.masked_fill(~mask, 0.0), mask


def group_logprobs(
    model: torch.nn.Module, prompt: list[int], completions: list[list[int]], temperature: float, pad_id: int,
    top_k: int = 0, top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logprobs` for the G completions of one prompt, running the shared prompt only once.

    The prompt is usually most of each sequence (a chat template around a short question), so a group costs
    one prompt forward plus G short completion forwards instead of G full ones: about 3x less compute for the
    default task. Gradients still flow through the prompt's keys and values (the cache is built with autograd
    on and repeated per completion), so the result and its gradient equal the full forward's.
    Completions are right-padded; padding sits after every real token, so causal attention never sees it.
    """
    device = next(model.parameters()).device
    g = len(completions)
    width = max(len(c) for c in completions)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:, :].expand(g, 1, -1)  # the prompt's last position predicts token 0
    tokens = torch.full((g, width), pad_id, dtype=torch.long, device=device)
    for row, comp in enumerate(completions):
        tokens[row, : len(comp)] = torch.tensor(comp, dtype=torch.long)
    if width > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(g)
        rest = model(input_ids=tokens[:, :-1], past_key_values=cache, use_cache=False).logits
        logits = torch.cat([first, rest], dim=1)
    else:
        logits = first
    logprobs = sampled_token_logprobs(logits, tokens, temperature, top_k, top_p)  # [G, T]
    mask = torch.arange(width, device=device)[None, :] < torch.tensor([len(c) for c in completions], device=device)[:, None]
    return logprobs.masked_fill(~mask, 0.0), mask


class Trainer:
    """fp32 master weights and AdamW state on `config.device`; forward/backward in `config.compute_dtype`.

    With `ranks` (a learner on several processes, heterorl.server.distributed) the model is sharded with FSDP2 and
    the methods that touch the weights (`train_step`, `snapshot`, `save_state`, `load_state`) are collective:
    rank 0 calls them and announces each to the other ranks, which run the same code from `distributed.follow`.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, config: TrainerConfig, ranks: Ranks | None = None):
        self.ranks = ranks
        self.device = resolve_device(ranks.device if ranks else config.device)
        self.compute_dtype = resolve_compute_dtype(config.compute_dtype, self.device)
        # Rank 0 of several keeps a plain bf16 copy of the architecture on the CPU: trust checks and evaluation
        # run on it (loaded with a published version), since the sharded model cannot run on one rank alone.
        self.template = (copy.deepcopy(model).to(torch.bfloat16).eval()
                         if ranks is not None and ranks.leader else None)
        # Several ranks: FSDP moves each block to the device as it shards it, so the whole model never sits on one
        # device (a 32B model would not fit); one rank: the whole model goes there.
        self.model = model.to(dtype=torch.float32) if ranks is not None else model.to(self.device, torch.float32)
        self.model.train()
        if config.grad_checkpointing:
            # HF checkpointing drops the KV cache in training, so the step then scores each group with one plain
            # forward over its full sequences (`completion_logprobs`) instead of the shared-prompt path.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if ranks is not None:
            distributed.shard(self.model, self.compute_dtype)
        self.pad_id = pad_id
        self.config = config
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0

    def train_step(self, groups: list[StoredGroup]) -> dict[str, float]:
        """One optimizer step on whole groups; returns the step's metrics (loss evidence, grad norm, time).

        Micro-batches of whole groups (`--micro-batch-tokens`) each add their share of the full-batch loss (every
        loss divides by the whole batch's counts), so the gradient is the full batch's whatever the budget; with
        several ranks each trains its own whole groups the same way and FSDP sums the gradients.
        The metrics are those of the whole batch, computed once from the detached log-probs.
        """
        if not groups:
            raise ValueError("train_step needs at least one group")
        norms = batch_norms(groups)
        if self.ranks is None:
            at, mine = 0, []
            for chunk in plan_micro_batches(groups, self.config.micro_batch_tokens):
                mine.append(list(range(at, at + len(chunk))))
                at += len(chunk)
        else:
            shares = distributed.plan_shares(groups, self.ranks.world, self.config.micro_batch_tokens)
            self.ranks.announce("step", (groups, shares, norms))
            mine = shares[0]
        return self.run_share(groups, mine, norms)

    def run_share(self, groups: list[StoredGroup], micro_batches: list[list[int]], norms: BatchNorms
                  ) -> dict[str, float]:
        """This rank's part of a step: its micro-batches (indices into `groups`), then the optimizer step.

        On one rank each group is scored with the shared-prompt forward. With several ranks every micro-batch is
        one forward (FSDP gathers each block once per forward, so all ranks must run as many) and an empty
        micro-batch is a forward of two padding tokens with a zero loss. Returns the metrics on rank 0, {} elsewhere.
        """
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sharded = self.ranks is not None
        seen: list[tuple[list[int], torch.Tensor]] = []
        with self._collective("a training step"):
            for i, indices in enumerate(micro_batches):
                if sharded:  # gradients are reduce-scattered once, after the last micro-batch
                    self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
                chunk = [groups[j] for j in indices]
                if not chunk:
                    with autocast(self.device, self.compute_dtype):
                        idle = self.model(input_ids=torch.full((1, 2), self.pad_id, device=self.device),
                                          use_cache=False).logits
                    (idle.float().sum() * 0.0).backward()
                    continue
                logprobs = self._logprobs(chunk, norms.width, one_forward=sharded)
                behaviour, mask, rewards = self._targets(chunk, norms.width)
                out = policy_loss(logprobs, behaviour, mask, rewards, self.config.loss, norms)
                out.loss.backward()
                seen.append((indices, logprobs.detach()))
            if sharded:
                parts = self.ranks.gather([(j, lp.cpu()) for indices, lps in seen for j, lp in zip(indices, lps)])
            else:
                parts = [[(j, lp) for indices, lps in seen for j, lp in zip(indices, lps)]]
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm over all ranks' shards
                grad_norm = grad_norm.full_tensor()
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if parts is None:
            return {}
        by_group = dict(item for part in parts for item in part)
        with torch.no_grad():
            logprobs = torch.stack([by_group[j].to(self.device) for j in range(len(groups))])
            metrics = policy_loss(logprobs, *self._targets(groups, norms.width), self.config.loss).metrics
        metrics["grad_norm"] = float(grad_norm)
        metrics["train_seconds"] = time.perf_counter() - started
        return metrics

    def _logprobs(self, groups: list[StoredGroup], width: int, one_forward: bool) -> torch.Tensor:
        """Log-probs with grad of `groups`' completions, [N, G, width] (zero past each completion's end)."""
        c = self.config
        if one_forward:
            sequences, prompt_lens = [], []
            for group in groups:
                prompt = list(group.prompt_token_ids)
                sequences += [prompt + list(x.token_ids) for x in group.completions]
                prompt_lens += [len(prompt)] * len(group.completions)
            with autocast(self.device, self.compute_dtype):
                logprobs, _ = completion_logprobs(self.model, sequences, prompt_lens, c.temperature, self.pad_id,
                                                  c.top_k, c.top_p)
            logprobs = torch.nn.functional.pad(logprobs.float(), (0, width - logprobs.shape[1]))
            return logprobs.view(len(groups), -1, width)
        rows = []
        for group in groups:
            prompt, completions = list(group.prompt_token_ids), [list(x.token_ids) for x in group.completions]
            with autocast(self.device, self.compute_dtype):
                if c.grad_checkpointing:
                    logprobs, _ = completion_logprobs(
                        self.model, [prompt + comp for comp in completions], [len(prompt)] * len(completions),
                        c.temperature, self.pad_id, c.top_k, c.top_p)
                else:
                    logprobs, _ = group_logprobs(
                        self.model, prompt, completions, c.temperature, self.pad_id, c.top_k, c.top_p)
            rows.append(torch.nn.functional.pad(logprobs.float(), (0, width - logprobs.shape[1])))
        return torch.stack(rows)

    def _targets(self, groups: list[StoredGroup], width: int):
        """(behaviour log-probs, mask, rewards) of `groups`, padded to `width`, on the device."""
        behaviour = torch.zeros((len(groups), len(groups[0].completions), width))
        mask = torch.zeros((len(groups), len(groups[0].completions), width), dtype=torch.bool)
        for g, group in enumerate(groups):
            for i, comp in enumerate(group.completions):
                behaviour[g, i, : len(comp.logprobs)] = torch.tensor(comp.logprobs, dtype=torch.float32)
                mask[g, i, : len(comp.token_ids)] = True
        rewards = torch.tensor([[x.reward for x in group.completions] for group in groups], dtype=torch.float32)
        return behaviour.to(self.device), mask.to(self.device), rewards.to(self.device)

    def snapshot(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The weights as published: each fp32 master parameter cast to `dtype`, on the CPU (a fresh copy, safe to
        encode later). With several ranks it is gathered whole onto rank 0 ({} on the others)."""
        if self.ranks is not None:
            self.ranks.announce("snapshot", dtype)
            with self._collective("gathering the weights"):
                return distributed.gather_weights(self.model, dtype, keep=self.ranks.leader)
        return {name: t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
                for name, t in weight_tensors(self.model).items()}

    def save_state(self, root: Path, step: int, meta: dict) -> tuple[Path | None, dict | None]:
        """A train-state checkpoint of `step` under `root` (heterorl.server.checkpoint); (None, None) on ranks > 0."""
        with self._collective(f"writing the checkpoint of step {step}"):
            return ckpt.write_train_state(root, step, self.model, self.optimizer, meta, self.ranks)

    def load_state(self, path: Path, manifest: dict) -> dict:
        """Load a checkpoint (any rank count wrote it); the run's current lr and weight decay apply from here."""
        with self._collective(f"loading the checkpoint {path.name}"):
            meta = ckpt.read_train_state(path, manifest, self.model, self.optimizer, self.ranks)
        for group in self.optimizer.param_groups:  # a resume may change these two
            group["lr"], group["weight_decay"] = self.config.lr, self.config.weight_decay
        return meta

    def reference_model(self) -> torch.nn.Module:
        """A plain model of the architecture on the trainer's device, for trust checks and evaluation.

        One rank: the trainer's own model (the verifier copies it). Several: rank 0's CPU template, moved to the
        device and handed over (called once; the caller loads a published version into it)."""
        if self.ranks is None:
            return self.model
        if self.template is None:
            raise RuntimeError("the reference model was already handed out")
        model, self.template = self.template.to(self.device), None
        return model

    def close(self) -> None:
        """Release the other ranks (rank 0 of several; nothing on one rank)."""
        if self.ranks is not None:
            self.ranks.stop()

    def _collective(self, what: str):
        return self.ranks.collective(what) if self.ranks is not None else contextlib.nullcontext()
