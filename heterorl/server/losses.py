"""Policy losses of the learner: GEPO and the baselines it is compared with.

Every loss sees the same batch layout: ``N`` groups (one prompt each) of ``G`` completions, each
padded to ``T`` tokens. A group is always the completions of ONE prompt, so every group statistic
(the reward baseline, GEPO's denominator ``D``) is taken inside a group, never across prompts.

Conventions shared by all losses (so that switching ``LossConfig.name`` changes one thing only):

* ``s_i`` is the masked *mean* of the current per-token log-probs of completion ``i``; ``ŝ_i`` the
  same mean of the sampler's (behaviour) log-probs. Behaviour log-probs are always detached.
* Padding (``mask`` False) never counts: padded values are replaced before any arithmetic, so even
  NaN/inf there changes neither the loss nor the gradient, and padded positions get zero gradient.
* A zero-length completion (all-False mask row) contributes nothing: no term in any sum, not
  counted in any denominator (sequence means, Dr.GRPO's sequence count, the k3 token mean) and left
  out of GEPO's ``D``. Its reward still enters its group's baseline, because it is a real sample
  of the policy with a real reward. A batch with no tokens at all gives a loss of exactly 0 that is
  still attached to the graph (zero gradient).
* Every log-ratio is clamped to at most ``LOG_RATIO_MAX`` before ``exp``. This only keeps the
  weights finite in float32 (a NaN would otherwise appear in backward as ``0 * inf``); a weight of
  ``e**60`` is far outside any clip range, and above the cap its gradient is zero.
* The optional k3 penalty (``beta_k3 > 0``) is the per-token estimator
  ``exp(ŝ_t - s_t) - (ŝ_t - s_t) - 1`` averaged over all valid tokens of the batch. It is taken per
  token rather than on the sequence means so that it constrains every token (a sequence mean can
  stay equal while individual tokens drift) and so that it is the same quantity for every loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_NAMES: tuple[str, ...] = ("gepo", "grpo", "gspo", "dr_grpo", "reinforce")
ADV_NORMS: tuple[str, ...] = ("mean", "mean_std")
METRIC_NAMES: tuple[str, ...] = (
    "is_weight_mean",
    "is_weight_var",
    "is_weight_max",
    "clip_frac_low",
    "clip_frac_high",
    "kl_k3",
    "adv_mean",
    "adv_std",
    "adv_zero_frac",
    "seq_len_mean",
    "loss",
    # The three weight families side by side, whichever loss is trained (the GEPO paper's theorem compares
    # their variances as KL grows): per-token ratio π/μ (GRPO), sequence ratio p/q (GSPO), p/E_q[q] (GEPO).
    "token_ratio_var",
    "seq_ratio_var",
    "group_weight_var",
)
# exp(60) ~ 1.1e26 is finite in float32 (whose exp overflows just above 88).
LOG_RATIO_MAX = 60.0


def _is_real_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class LossConfig:
    """Which policy loss the learner optimizes and its hyper-parameters.

    ``eps_low``/``eps_high``: clip range ``[1 - eps_low, 1 + eps_high]`` of the importance weight.
    ``beta_k3``: weight of the per-token k3 penalty toward the behaviour policy (paper: 0.005).
    ``adv_norm``: ``"mean"`` (``r - mean``, what the paper's GEPO runs used) or ``"mean_std"``.
    ``max_len``: Dr.GRPO's constant length normaliser (the generation budget); ``None`` means the
    padded length ``T`` of the batch.
    """

    name: str = "gepo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta_k3: float = 0.0
    adv_norm: str = "mean"
    std_eps: float = 1e-6
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss name {self.name!r}; expected one of {LOSS_NAMES}")
        if not _is_real_number(self.eps_low) or not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be a finite number in [0, 1), got {self.eps_low!r}")
        if not _is_real_number(self.eps_high) or self.eps_high < 0.0:
            raise ValueError(f"eps_high must be a finite number >= 0, got {self.eps_high!r}")
        if not _is_real_number(self.beta_k3) or self.beta_k3 < 0.0:
            raise ValueError(f"beta_k3 must be a finite number >= 0, got {self.beta_k3!r}")
        _check_adv_norm(self.adv_norm, self.std_eps)
        if self.max_len is not None and (
            not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 1
        ):
            raise ValueError(f"max_len must be None or a positive int, got {self.max_len!r}")


@dataclass(frozen=True)
class BatchNorms:
    """The denominators of a loss, taken over the WHOLE optimizer batch.

    A batch split into micro-batches of whole groups gives exactly the full-batch loss when each micro-batch's
    loss divides by these (not by its own counts): every loss is a sum of per-sequence or per-token terms over
    one of these counts. ``sequences``: completions with at least one token; ``tokens``: completion tokens;
    ``width``: the longest completion (Dr.GRPO's normaliser when ``max_len`` is None).
    """

    sequences: int
    tokens: int
    width: int

    @staticmethod
    def of(mask: Tensor) -> "BatchNorms":
        """The norms of a batch given whole, from its ``[N, G, T]`` mask."""
        lengths = mask.sum(dim=-1)
        return BatchNorms(int((lengths > 0).sum()), int(lengths.sum()), int(mask.shape[-1]))


@dataclass
class LossOutput:
    """The scalar loss (differentiable w.r.t. ``logprobs``) and detached float metrics."""

    loss: Tensor
    metrics: dict[str, float]


def _check_adv_norm(adv_norm: str, std_eps: float) -> None:
    if adv_norm not in ADV_NORMS:
        raise ValueError(f"unknown adv_norm {adv_norm!r}; expected one of {ADV_NORMS}")
    if not _is_real_number(std_eps) or std_eps <= 0.0:
        raise ValueError(f"std_eps must be a finite number > 0, got {std_eps!r}")


def group_advantages(rewards: Tensor, adv_norm: str = "mean", std_eps: float = 1e-6) -> Tensor:
    """Group-relative advantages ``[N, G]`` from rewards ``[N, G]`` (one row per prompt).

    ``"mean"``: ``r - mean_group(r)``. ``"mean_std"``: that divided by ``std_group(r) + std_eps``,
    with the population std (divide by ``G``), so that it is defined for every ``G``.
    A group whose rewards are all equal gets exactly 0 (plain float arithmetic would leave
    rounding residue such as 6e-8, which ``mean_std`` would blow up to about 1).
    """
    _check_adv_norm(adv_norm, std_eps)
    if not isinstance(rewards, Tensor) or rewards.dim() != 2:
        raise ValueError(f"rewards must be a 2-D tensor [N, G], got {_describe(rewards)}")
    if rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be non-empty, got shape {tuple(rewards.shape)}")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise ValueError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    r = rewards.detach().to(_compute_dtype(rewards.dtype))
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    adv = r - r.mean(dim=-1, keepdim=True)
    if adv_norm == "mean_std":
        adv = adv / (r.std(dim=-1, correction=0, keepdim=True) + std_eps)
    all_equal = (r == r[:, :1]).all(dim=-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(adv), adv)


def gepo_log_denominator(behavior_seq_logprobs: Tensor, valid: Tensor) -> Tensor:
    """``log D`` per group, ``D = Σ_j q_j² / Σ_j q_j`` with ``q_j = exp(ŝ_j)``, in log space.

    ``behavior_seq_logprobs``: ``[N, G]`` length-normalised behaviour log-probs ``ŝ``; ``valid``:
    ``[N, G]`` bool, False for zero-length completions, which are left out of both sums. A group
    with no valid completion gets ``log D = 0`` (it has nothing to weight). The result carries no
    gradient: ``D`` is a constant of the behaviour policy.
    """
    if behavior_seq_logprobs.shape != valid.shape or behavior_seq_logprobs.dim() != 2:
        raise ValueError(
            f"expected matching [N, G] shapes, got {tuple(behavior_seq_logprobs.shape)} "
            f"and {tuple(valid.shape)}"
        )
    s_hat = behavior_seq_logprobs.detach().masked_fill(~valid, -math.inf)
    log_d = torch.logsumexp(2.0 * s_hat, dim=-1) - torch.logsumexp(s_hat, dim=-1)
    return torch.where(valid.any(dim=-1), log_d, torch.zeros_like(log_d))


def policy_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    cfg: LossConfig,
    norms: BatchNorms | None = None,
) -> LossOutput:
    """The loss selected by ``cfg.name`` on ``N`` groups of ``G`` completions.

    ``norms``: the whole batch's denominators when these groups are one micro-batch of it (see `BatchNorms`);
    None means these groups are the whole batch. Metrics describe the groups given (`loss` and `kl_k3` then being
    their share of the whole batch's).

    ``logprobs``: ``[N, G, T]`` current per-token log-probs of the sampled tokens (with grad);
    ``behavior_logprobs``: ``[N, G, T]`` the sampler's log-probs of the same tokens (detached here);
    ``mask``: ``[N, G, T]`` bool, True on completion tokens; ``rewards``: ``[N, G]``.

    Losses (ratio clipped to ``[1-eps_low, 1+eps_high]`` in the PPO form ``-min(ρA, clip(ρ)A)``):
    ``gepo``  ρ_i = exp(s_i - log D) per sequence, mean over sequences;
    ``gspo``  ρ_i = exp(s_i - ŝ_i) per sequence, mean over sequences;
    ``grpo``  ρ_t = exp(logp_t - logp̂_t) per token, token mean per sequence, mean over sequences;
    ``dr_grpo`` the per-token objective summed over all tokens / (sequences × max_len);
    ``reinforce`` ``-A_i · s_i`` (token *mean*, so its on-policy gradient equals GRPO's and GSPO's
    on-policy gradient), mean over sequences, no ratio and no clip.
    """
    _check_inputs(logprobs, behavior_logprobs, mask, rewards)
    dtype = _compute_dtype(logprobs.dtype)
    _check_finite(logprobs, behavior_logprobs, mask)

    maskf = mask.to(dtype)
    # Sanitise padding first: `where` (not multiplication) so NaN/inf there cannot leak.
    lp = torch.where(mask, logprobs.to(dtype), torch.zeros((), dtype=dtype, device=logprobs.device))
    blp = torch.where(
        mask, behavior_logprobs.detach().to(dtype), torch.zeros((), dtype=dtype, device=mask.device)
    )
    lengths = maskf.sum(dim=-1)  # [N, G]
    valid = lengths > 0  # [N, G]
    validf = valid.to(dtype)
    whole = norms if norms is not None else BatchNorms.of(mask)
    n_valid = torch.tensor(float(whole.sequences), dtype=dtype, device=lp.device)
    n_tokens = torch.tensor(float(whole.tokens), dtype=dtype, device=lp.device)
    safe_len = lengths.clamp(min=1.0)
    s = lp.sum(dim=-1) / safe_len  # [N, G]
    s_hat = blp.sum(dim=-1) / safe_len

    adv = group_advantages(rewards, cfg.adv_norm, cfg.std_eps).to(dtype=dtype, device=lp.device)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high

    if cfg.name in ("gepo", "gspo"):
        if cfg.name == "gepo":
            log_ref = gepo_log_denominator(s_hat, valid).unsqueeze(-1)  # [N, 1]
        else:
            log_ref = s_hat
        weight = torch.exp((s - log_ref).clamp(max=LOG_RATIO_MAX))  # [N, G]
        obj, clip_low, clip_high = _clipped_objective(weight, adv, lo, hi)
        policy = -(obj * validf).sum() / n_valid.clamp(min=1.0)
        weight_mask = valid
    elif cfg.name in ("grpo", "dr_grpo"):
        weight = torch.exp((lp - blp).clamp(max=LOG_RATIO_MAX))  # [N, G, T]
        obj, clip_low, clip_high = _clipped_objective(weight, adv.unsqueeze(-1), lo, hi)
        obj = obj * maskf
        if cfg.name == "grpo":
            per_seq = obj.sum(dim=-1) / safe_len
            policy = -per_seq.sum() / n_valid.clamp(min=1.0)
        else:
            max_len = cfg.max_len if cfg.max_len is not None else whole.width
            longest = int(lengths.max().item()) if lengths.numel() else 0
            if longest > max_len:
                raise ValueError(
                    f"dr_grpo max_len={max_len} is shorter than a completion of {longest} tokens"
                )
            policy = -obj.sum() / (n_valid.clamp(min=1.0) * max_len)
        weight_mask = mask
    else:  # reinforce
        policy = -(adv * s * validf).sum() / n_valid.clamp(min=1.0)
        weight = torch.ones_like(s)
        clip_low = clip_high = torch.zeros_like(valid)
        weight_mask = valid

    # Per-token k3 between behaviour and current policy, over all valid tokens of the batch.
    d = (blp - lp).clamp(max=LOG_RATIO_MAX)
    k3_mean = ((torch.exp(d) - d - 1.0) * maskf).sum() / n_tokens.clamp(min=1.0)
    loss = policy + cfg.beta_k3 * k3_mean if cfg.beta_k3 > 0 else policy

    with torch.no_grad():
        family_vars = (
            _masked_var(torch.exp((lp - blp).clamp(max=LOG_RATIO_MAX)), mask),
            _masked_var(torch.exp((s - s_hat).clamp(max=LOG_RATIO_MAX)), valid),
            _masked_var(torch.exp((s - gepo_log_denominator(s_hat, valid).unsqueeze(-1)).clamp(max=LOG_RATIO_MAX)), valid),
        )
    metrics = _metrics(
        loss=loss,
        weight=weight,
        weight_mask=weight_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        kl_k3=k3_mean,
        adv=adv,
        rewards=rewards,
        lengths=lengths,
    )
    metrics.update(zip(METRIC_NAMES[-3:], family_vars))
    return LossOutput(loss=loss, metrics=metrics)


def _masked_var(values: Tensor, mask: Tensor) -> float:
    """Population variance (float64) of `values` where `mask` holds; 0 when nothing is valid."""
    picked = values.detach().to(torch.float64)[mask.expand_as(values)]
    return float(picked.var(correction=0)) if picked.numel() else 0.0


def _clipped_objective(
    ratio: Tensor, adv: Tensor, lo: float, hi: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``min(ρA, clip(ρ, lo, hi)A)`` written as a choice so the active clip is explicit.

    The clip changes the min only when ``A > 0, ρ > hi`` or ``A < 0, ρ < lo``; there the objective
    is the constant ``hi·A`` / ``lo·A`` (zero gradient), everywhere else it is ``ρA``.
    """
    clip_high = (adv > 0) & (ratio > hi)
    clip_low = (adv < 0) & (ratio < lo)
    bound = torch.where(clip_high, torch.full_like(ratio, hi), torch.full_like(ratio, lo))
    obj = torch.where(clip_high | clip_low, bound * adv, ratio * adv)
    return obj, clip_low, clip_high


@torch.no_grad()
def _metrics(
    *,
    loss: Tensor,
    weight: Tensor,
    weight_mask: Tensor,
    clip_low: Tensor,
    clip_high: Tensor,
    kl_k3: Tensor,
    adv: Tensor,
    rewards: Tensor,
    lengths: Tensor,
) -> dict[str, float]:
    """Detached evidence for the logs, in float64 (weights can be large enough that w² overflows
    float32). Weight statistics cover the weights the loss uses on valid entries only; the
    variance is the population variance; with no valid entry they are 0."""
    f64 = torch.float64
    wm = weight_mask.expand_as(weight)
    w = weight.detach().to(f64)[wm]
    count = w.numel()
    if count:
        w_mean, w_var, w_max = w.mean(), w.var(correction=0), w.max()
        low = clip_low.expand_as(weight)[wm].to(f64).mean()
        high = clip_high.expand_as(weight)[wm].to(f64).mean()
    else:
        w_mean = w_var = w_max = low = high = torch.zeros((), dtype=f64)
    r = rewards.detach()
    zero_groups = (r == r[:, :1]).all(dim=-1).to(f64).mean()
    a = adv.detach().to(f64)
    values = torch.stack(
        [
            w_mean.to(f64).cpu(),
            w_var.to(f64).cpu(),
            w_max.to(f64).cpu(),
            low.cpu(),
            high.cpu(),
            kl_k3.detach().to(f64).cpu(),
            a.mean().cpu(),
            a.std(correction=0).cpu(),
            zero_groups.cpu(),
            lengths.detach().to(f64).mean().cpu(),
            loss.detach().to(f64).cpu(),
        ]
    ).tolist()
    return dict(zip(METRIC_NAMES, values))  # the last three names are filled in by `policy_loss`


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 log-probs would make exp/logsumexp and the means too coarse."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_inputs(logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, rewards: Tensor) -> None:
    for name, t in (("logprobs", logprobs), ("behavior_logprobs", behavior_logprobs)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating [N, G, T] tensor, got {_describe(t)}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [N, G, T], got {_describe(mask)}")
    shape = tuple(logprobs.shape)
    if tuple(behavior_logprobs.shape) != shape or tuple(mask.shape) != shape:
        raise ValueError(
            f"logprobs {shape}, behavior_logprobs {tuple(behavior_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must have the same [N, G, T] shape"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"need at least one group of at least one completion, got shape {shape}")
    if not isinstance(rewards, Tensor) or tuple(rewards.shape) != shape[:2]:
        raise ValueError(f"rewards must have shape {shape[:2]} (N, G), got {_describe(rewards)}")


def _check_finite(logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor) -> None:
    """A non-finite log-prob on a real token would turn the whole loss into NaN; say so instead."""
    with torch.no_grad():
        for name, t in (("logprobs", logprobs), ("behavior_logprobs", behavior_logprobs)):
            bad = mask & ~torch.isfinite(t)
            if bad.any():
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                raise ValueError(
                    f"{name} has {int(bad.sum())} non-finite value(s) on completion tokens "
                    f"(first at [n, g, t] = {first})"
                )
