"""Tests of the learner's policy losses (GEPO and the baselines) against hand-computed values and
a loop-based reference implementation written here, independently of the vectorised code."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heterorl.server.losses import (
    LOSS_NAMES,
    METRIC_NAMES,
    LossConfig,
    gepo_log_denominator,
    group_advantages,
    policy_loss,
)

RATIO_LOSSES = ("gepo", "gspo", "grpo", "dr_grpo")


# ---------------------------------------------------------------------------------------------
# Loop-based reference: one prompt group and one sequence at a time, plain Python floats for
# everything that carries no gradient, the textbook min/clamp form of the clipped objective.
# ---------------------------------------------------------------------------------------------


def ref_advantages(rewards: list[float], adv_norm: str, std_eps: float) -> list[float]:
    g = len(rewards)
    if all(r == rewards[0] for r in rewards):
        return [0.0] * g
    mean = sum(rewards) / g
    adv = [r - mean for r in rewards]
    if adv_norm == "mean_std":
        std = math.sqrt(sum(a * a for a in adv) / g)
        adv = [a / (std + std_eps) for a in adv]
    return adv


def ref_clip(ratio: torch.Tensor, adv: float, lo: float, hi: float) -> torch.Tensor:
    return torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv)


def ref_loss(lp, blp, mask, rewards, cfg: LossConfig) -> torch.Tensor:
    n_groups, g, t_max = lp.shape
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    max_len = cfg.max_len if cfg.max_len is not None else t_max
    terms: list[torch.Tensor] = []  # one per non-empty sequence (dr_grpo: its token sum)
    k3_terms: list[torch.Tensor] = []
    for n in range(n_groups):
        adv = ref_advantages([float(r) for r in rewards[n]], cfg.adv_norm, cfg.std_eps)
        toks = [[t for t in range(t_max) if bool(mask[n, i, t])] for i in range(g)]
        s_hat = [
            sum(float(blp[n, i, t]) for t in toks[i]) / len(toks[i]) if toks[i] else None
            for i in range(g)
        ]
        qs = [math.exp(x) for x in s_hat if x is not None]
        d = sum(q * q for q in qs) / sum(qs) if qs else None  # direct formula, a plain float
        for i in range(g):
            if not toks[i]:
                continue
            s = sum(lp[n, i, t] for t in toks[i]) / len(toks[i])
            for t in toks[i]:
                diff = float(blp[n, i, t]) - lp[n, i, t]
                k3_terms.append(torch.exp(diff) - diff - 1.0)
            if cfg.name == "gepo":
                terms.append(-ref_clip(torch.exp(s) / d, adv[i], lo, hi))
            elif cfg.name == "gspo":
                terms.append(-ref_clip(torch.exp(s - s_hat[i]), adv[i], lo, hi))
            elif cfg.name in ("grpo", "dr_grpo"):
                tok = [
                    ref_clip(torch.exp(lp[n, i, t] - float(blp[n, i, t])), adv[i], lo, hi)
                    for t in toks[i]
                ]
                total = sum(tok)
                terms.append(-(total / len(toks[i]) if cfg.name == "grpo" else total))
            else:
                terms.append(-adv[i] * s)
    zero = lp.sum() * 0.0
    if not terms:
        return zero
    if cfg.name == "dr_grpo":
        loss = sum(terms) / (len(terms) * max_len)
    else:
        loss = sum(terms) / len(terms)
    if cfg.beta_k3 > 0:
        loss = loss + cfg.beta_k3 * sum(k3_terms) / len(k3_terms)
    return loss + zero


def random_batch(seed: int, n: int = 3, g: int = 4, t: int = 6, spread: float = 0.8):
    """Log-probs in float64, behaviour near them, random (non-prefix) masks with empty and
    single-token rows, integer rewards with the first group all equal."""
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, g, t, generator=gen, dtype=torch.float64) * 2.5 - 0.05
    blp = lp + spread * torch.randn(n, g, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, g, t, generator=gen) < 0.7
    mask[0, 1] = False  # zero-length completion
    mask[1, 2] = False
    mask[1, 2, 3] = True  # single-token completion
    rewards = torch.randint(0, 3, (n, g), generator=gen).to(torch.float64)
    rewards[0] = 1.0
    # padding holds garbage on purpose: it must never count
    lp = torch.where(mask, lp, torch.full_like(lp, 7.0))
    blp = torch.where(mask, blp, torch.full_like(blp, -123.0))
    return lp, blp, mask, rewards


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_loss_names() -> None:
    assert set(LOSS_NAMES) == {"gepo", "grpo", "gspo", "dr_grpo", "reinforce"}
    for name in LOSS_NAMES:
        assert LossConfig(name=name).name == name
    cfg = LossConfig()
    assert (cfg.name, cfg.eps_low, cfg.eps_high, cfg.beta_k3, cfg.adv_norm) == (
        "gepo", 0.2, 0.2, 0.0, "mean",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "ppo"},
        {"name": "GEPO"},
        {"eps_low": -0.1},
        {"eps_low": 1.0},
        {"eps_high": -0.01},
        {"eps_high": float("nan")},
        {"eps_low": float("inf")},
        {"beta_k3": -0.005},
        {"beta_k3": float("nan")},
        {"adv_norm": "std"},
        {"std_eps": 0.0},
        {"std_eps": -1e-6},
        {"max_len": 0},
        {"max_len": 3.5},
        {"max_len": True},
        {"eps_low": "0.2"},
    ],
)
def test_invalid_config_raises(kwargs) -> None:
    with pytest.raises(ValueError):
        LossConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_mean_by_hand() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 9.0]])
    a = group_advantages(r)
    expected = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-3.0, -1.0, 4.0]])
    torch.testing.assert_close(a, expected)


def test_group_advantages_mean_std_by_hand() -> None:
    r = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    std = math.sqrt((1.0 + 1.0 + 0.0) / 3)  # population std of (2, 0, 1) around 1
    a = group_advantages(r, "mean_std", std_eps=1e-3)
    expected = torch.tensor([[1 / (std + 1e-3), -1 / (std + 1e-3), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("adv_norm", ["mean", "mean_std"])
def test_identical_rewards_give_exactly_zero(adv_norm) -> None:
    # 0.7 repeated 7 times leaves ~6e-8 after a naive r - mean in float32; mean_std would
    # turn that residue into an advantage of about 1.
    r = torch.tensor([[0.7] * 7, [0.0, 1, 0, 1, 0, 1, 0]])
    a = group_advantages(r, adv_norm)
    assert torch.equal(a[0], torch.zeros(7))
    assert (a[1] != 0).all()
    assert group_advantages(torch.tensor([[3.0]]), adv_norm).item() == 0.0  # G = 1


def test_group_advantages_never_mix_groups() -> None:
    r = torch.tensor([[1.0, 0.0], [100.0, 100.0]])
    assert torch.equal(group_advantages(r), torch.tensor([[0.5, -0.5], [0.0, 0.0]]))


@pytest.mark.parametrize(
    "rewards", [torch.zeros(4), torch.zeros(2, 3, 1), torch.tensor([[1.0, float("nan")]])]
)
def test_group_advantages_bad_input(rewards) -> None:
    with pytest.raises(ValueError):
        group_advantages(rewards)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2), "bogus")


# ---------------------------------------------------------------------------------------------
# GEPO's denominator
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-20.0, 0.0, allow_nan=False), st.booleans()), min_size=1, max_size=8
    )
)
def test_log_space_denominator_matches_direct_formula(entries) -> None:
    s_hat = torch.tensor([[x for x, _ in entries]], dtype=torch.float64)
    valid = torch.tensor([[v for _, v in entries]])
    log_d = gepo_log_denominator(s_hat, valid)
    qs = [math.exp(x) for x, v in entries if v]
    if not qs:
        assert log_d.item() == 0.0
        return
    direct = sum(q * q for q in qs) / sum(qs)
    assert math.exp(log_d.item()) == pytest.approx(direct, rel=1e-9)
    # D is the q-weighted mean of q: between min and max, and never below the plain mean.
    assert min(qs) * (1 - 1e-9) <= direct <= max(qs) * (1 + 1e-9)
    assert math.exp(log_d.item()) >= (sum(qs) / len(qs)) * (1 - 1e-9)


def test_log_space_denominator_survives_tiny_probabilities() -> None:
    # q = exp(-2000) underflows to 0 in the direct formula; log space stays exact.
    s_hat = torch.tensor([[-2000.0, -2001.0]], dtype=torch.float64)
    log_d = gepo_log_denominator(s_hat, torch.ones(1, 2, dtype=torch.bool)).item()
    expected = -2000.0 + math.log((1 + math.exp(-2)) / (1 + math.exp(-1)))
    assert log_d == pytest.approx(expected, abs=1e-9)


def test_denominator_has_no_gradient_and_behaviour_gets_none() -> None:
    lp, blp, mask, rewards = random_batch(1)
    lp.requires_grad_(True)
    blp.requires_grad_(True)
    for name in LOSS_NAMES:
        out = policy_loss(lp, blp, mask, rewards, LossConfig(name=name, beta_k3=0.01))
        g_lp, g_blp = torch.autograd.grad(out.loss, [lp, blp], allow_unused=True)
        assert g_blp is None, name
        assert g_lp is not None and g_lp.abs().sum() > 0, name
    assert not gepo_log_denominator(blp[..., 0], torch.ones(3, 4, dtype=torch.bool)).requires_grad


def test_gepo_depends_on_behaviour_only_through_d() -> None:
    """Permuting behaviour sequences inside a group keeps D, so GEPO (with beta 0) is unchanged
    though every per-sequence behaviour value moved; GSPO, which uses each ŝ_i, changes."""
    gen = torch.Generator().manual_seed(5)
    lp = (-torch.rand(2, 4, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    blp = lp.detach() + 0.5 * torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    rewards = torch.tensor([[1.0, 0, 0, 1], [0.0, 0, 1, 2]], dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    blp_perm = blp[:, perm]
    assert not torch.allclose(blp_perm.mean(-1), blp.mean(-1))

    def loss_and_grad(name, b):
        out = policy_loss(lp, b, mask, rewards, LossConfig(name=name))
        return out.loss.detach(), torch.autograd.grad(out.loss, lp)[0]

    base, g_base = loss_and_grad("gepo", blp)
    moved, g_moved = loss_and_grad("gepo", blp_perm)
    torch.testing.assert_close(moved, base, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_moved, g_base, rtol=1e-12, atol=1e-14)
    assert not torch.isclose(loss_and_grad("gspo", blp_perm)[0], loss_and_grad("gspo", blp)[0])

    # Changing D changes the loss exactly as the formula with D as a plain constant says.
    shifted = blp.clone()
    shifted[0] -= 0.3  # every q of group 0 shrinks by e^-0.3, so D does too
    out = policy_loss(lp, shifted, mask, rewards, LossConfig(name="gepo"))
    torch.testing.assert_close(
        out.loss, ref_loss(lp, shifted, mask, rewards, LossConfig(name="gepo")), rtol=1e-12,
        atol=1e-14,
    )


def test_gepo_weight_is_not_one_on_policy_but_equals_gspo_when_q_equal() -> None:
    lp = torch.tensor([[[-0.2, -0.4], [-1.0, -1.5], [-0.1, -0.3]]], dtype=torch.float64)
    mask = torch.ones(1, 3, 2, dtype=torch.bool)
    rewards = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    on = policy_loss(lp, lp, mask, rewards, LossConfig(name="gepo")).metrics
    qs = [math.exp(-0.3), math.exp(-1.25), math.exp(-0.2)]
    d = sum(q * q for q in qs) / sum(qs)
    w = [q / d for q in qs]
    assert on["is_weight_mean"] == pytest.approx(sum(w) / 3, rel=1e-12)
    assert on["is_weight_max"] == pytest.approx(max(w), rel=1e-12)
    assert on["is_weight_mean"] != pytest.approx(1.0, abs=1e-3)
    # When every q in a group is the same, D = q and GEPO's weight is GSPO's ratio.
    same_q = torch.full_like(lp, -0.5)
    cur = lp.clone().requires_grad_(True)
    a = policy_loss(cur, same_q, mask, rewards, LossConfig(name="gepo"))
    b = policy_loss(cur, same_q, mask, rewards, LossConfig(name="gspo"))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        torch.autograd.grad(a.loss, cur)[0], torch.autograd.grad(b.loss, cur)[0], rtol=1e-12,
        atol=1e-14,
    )


# ---------------------------------------------------------------------------------------------
# Hand-computed values on one group of three completions (lengths 1, 2, 3)
# ---------------------------------------------------------------------------------------------

HAND_LP = [[-0.5, 0.0, 0.0], [-1.0, -0.2, 0.0], [-0.3, -0.6, -0.9]]
HAND_BLP = [[-0.7, 0.0, 0.0], [-0.9, -0.5, 0.0], [-0.2, -0.4, -1.2]]
HAND_MASK = [[True, False, False], [True, True, False], [True, True, True]]
HAND_REWARDS = [[1.0, 0.0, 0.0]]  # A = (2/3, -1/3, -1/3)
HAND_EPS_LOW, HAND_EPS_HIGH = 0.15, 0.1  # clip range [0.85, 1.1]


def hand_batch():
    lp = torch.tensor([HAND_LP], dtype=torch.float64, requires_grad=True)
    blp = torch.tensor([HAND_BLP], dtype=torch.float64)
    mask = torch.tensor([HAND_MASK])
    rewards = torch.tensor(HAND_REWARDS, dtype=torch.float64)
    return lp, blp, mask, rewards


def hand_cfg(name: str, **kw) -> LossConfig:
    return LossConfig(name=name, eps_low=HAND_EPS_LOW, eps_high=HAND_EPS_HIGH, **kw)


A1, A2, A3 = 2 / 3, -1 / 3, -1 / 3
# s = (-0.5, -0.6, -0.6), ŝ = (-0.7, -0.7, -0.6); per-token d = ŝ_t - s_t:
HAND_D_TOKENS = [-0.2, 0.1, -0.3, 0.1, 0.2, -0.3]
HAND_K3 = sum(math.exp(d) - d - 1 for d in HAND_D_TOKENS) / 6


def test_hand_gepo() -> None:
    lp, blp, mask, rewards = hand_batch()
    out = policy_loss(lp, blp, mask, rewards, hand_cfg("gepo"))
    q1, q2, q3 = math.exp(-0.7), math.exp(-0.7), math.exp(-0.6)
    d = (q1**2 + q2**2 + q3**2) / (q1 + q2 + q3)  # 0.51518...
    w1, w2, w3 = math.exp(-0.5) / d, math.exp(-0.6) / d, math.exp(-0.6) / d  # 1.177, 1.065, 1.065
    # w1 > 1.1 with A1 > 0: clipped to 1.1. w2, w3 > 1.1 but A < 0: the unclipped term is the min.
    expected = -(1.1 * A1 + w2 * A2 + w3 * A3) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(-0.00775, abs=5e-5)
    m = out.metrics
    mean_w = (w1 + w2 + w3) / 3
    assert m["is_weight_mean"] == pytest.approx(mean_w, rel=1e-12)
    assert m["is_weight_var"] == pytest.approx(
        ((w1 - mean_w) ** 2 + (w2 - mean_w) ** 2 + (w3 - mean_w) ** 2) / 3, rel=1e-9
    )
    assert m["is_weight_max"] == pytest.approx(w1, rel=1e-12)
    assert m["clip_frac_high"] == pytest.approx(1 / 3)
    assert m["clip_frac_low"] == 0.0
    assert m["kl_k3"] == pytest.approx(HAND_K3, rel=1e-12)
    assert m["adv_mean"] == pytest.approx(0.0, abs=1e-15)
    assert m["adv_std"] == pytest.approx(math.sqrt((A1**2 + A2**2 + A3**2) / 3), rel=1e-12)
    assert m["adv_zero_frac"] == 0.0
    assert m["seq_len_mean"] == pytest.approx(2.0)
    assert m["loss"] == pytest.approx(expected, rel=1e-12)
    # d loss / d lp: seq 1 clipped -> 0; seq 2, 3: -(1/3) A w / len per token.
    (g,) = torch.autograd.grad(out.loss, lp)
    expected_g = [
        [0.0, 0.0, 0.0],
        [-(A2 * w2) / 3 / 2] * 2 + [0.0],
        [-(A3 * w3) / 3 / 3] * 3,
    ]
    torch.testing.assert_close(g[0], torch.tensor(expected_g, dtype=torch.float64))


def test_hand_gspo() -> None:
    lp, blp, mask, rewards = hand_batch()
    out = policy_loss(lp, blp, mask, rewards, hand_cfg("gspo"))
    r1, r2, r3 = math.exp(0.2), math.exp(0.1), math.exp(0.0)
    # r1 = 1.221 > 1.1 with A1 > 0: clipped; r2 = 1.105 with A2 < 0: unclipped; r3 = 1.
    expected = -(1.1 * A1 + r2 * A2 + r3 * A3) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["is_weight_max"] == pytest.approx(r1, rel=1e-12)
    assert out.metrics["is_weight_mean"] == pytest.approx((r1 + r2 + r3) / 3, rel=1e-12)
    assert out.metrics["clip_frac_high"] == pytest.approx(1 / 3)
    assert out.metrics["clip_frac_low"] == 0.0


def grpo_token_objectives() -> list[list[float]]:
    # token ratios exp(lp - blp) and their advantages; clip range [0.85, 1.1]
    ratios = [
        [math.exp(0.2)],  # 1.221, A > 0: clipped high -> 1.1
        [math.exp(-0.1), math.exp(0.3)],  # 0.905 inside; 1.350 with A < 0: unclipped
        [math.exp(-0.1), math.exp(-0.2), math.exp(0.3)],  # 0.819 < 0.85 with A < 0: clipped low
    ]
    return [
        [1.1 * A1],
        [ratios[1][0] * A2, ratios[1][1] * A2],
        [ratios[2][0] * A3, 0.85 * A3, ratios[2][2] * A3],
    ]


def test_hand_grpo() -> None:
    lp, blp, mask, rewards = hand_batch()
    out = policy_loss(lp, blp, mask, rewards, hand_cfg("grpo"))
    obj = grpo_token_objectives()
    expected = -(sum(obj[0]) / 1 + sum(obj[1]) / 2 + sum(obj[2]) / 3) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    ratios = [math.exp(x) for x in (0.2, -0.1, 0.3, -0.1, -0.2, 0.3)]
    assert out.metrics["is_weight_mean"] == pytest.approx(sum(ratios) / 6, rel=1e-12)
    assert out.metrics["is_weight_max"] == pytest.approx(math.exp(0.3), rel=1e-12)
    assert out.metrics["clip_frac_high"] == pytest.approx(1 / 6)
    assert out.metrics["clip_frac_low"] == pytest.approx(1 / 6)


def test_hand_dr_grpo() -> None:
    lp, blp, mask, rewards = hand_batch()
    out = policy_loss(lp, blp, mask, rewards, hand_cfg("dr_grpo", max_len=4))
    obj = grpo_token_objectives()
    expected = -(sum(obj[0]) + sum(obj[1]) + sum(obj[2])) / (3 * 4)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # max_len defaults to T = 3
    default = policy_loss(lp, blp, mask, rewards, hand_cfg("dr_grpo"))
    assert default.loss.item() == pytest.approx(expected * 4 / 3, rel=1e-12)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(lp, blp, mask, rewards, hand_cfg("dr_grpo", max_len=2))


def test_hand_reinforce() -> None:
    lp, blp, mask, rewards = hand_batch()
    out = policy_loss(lp, blp, mask, rewards, hand_cfg("reinforce"))
    expected = -(A1 * -0.5 + A2 * -0.6 + A3 * -0.6) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    m = out.metrics
    assert (m["is_weight_mean"], m["is_weight_var"], m["is_weight_max"]) == (1.0, 0.0, 1.0)
    assert (m["clip_frac_low"], m["clip_frac_high"]) == (0.0, 0.0)
    (g,) = torch.autograd.grad(out.loss, lp)
    expected_g = [[-A1 / 3, 0, 0], [-A2 / 6, -A2 / 6, 0], [-A3 / 9] * 3]
    torch.testing.assert_close(g[0], torch.tensor(expected_g, dtype=torch.float64))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_hand_k3_penalty(name) -> None:
    lp, blp, mask, rewards = hand_batch()
    plain = policy_loss(lp, blp, mask, rewards, hand_cfg(name)).loss.item()
    with_k3 = policy_loss(lp, blp, mask, rewards, hand_cfg(name, beta_k3=0.005)).loss.item()
    assert with_k3 - plain == pytest.approx(0.005 * HAND_K3, rel=1e-9)


def test_k3_gradient_pulls_toward_behaviour() -> None:
    lp = torch.tensor([[[-1.0, -2.0]]], dtype=torch.float64, requires_grad=True)
    blp = torch.tensor([[[-0.5, -2.5]]], dtype=torch.float64)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    out = policy_loss(lp, blp, mask, torch.zeros(1, 1, dtype=torch.float64),
                      LossConfig(beta_k3=1.0))
    (g,) = torch.autograd.grad(out.loss, lp)
    # d/ds of e^{ŝ-s} - (ŝ-s) - 1 is 1 - e^{ŝ-s}; descent moves s toward ŝ.
    expected = [(1 - math.exp(0.5)) / 2, (1 - math.exp(-0.5)) / 2]
    torch.testing.assert_close(g[0, 0], torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Gradients against autograd of the loop-based reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(
    "adv_norm,beta,eps", [("mean", 0.0, (0.2, 0.2)), ("mean_std", 0.005, (0.1, 0.28))]
)
@pytest.mark.parametrize("seed", [1, 3, 8])  # seeds whose data clip on both sides
def test_matches_loop_reference(name, adv_norm, beta, eps, seed) -> None:
    lp, blp, mask, rewards = random_batch(seed)
    cfg = LossConfig(name=name, adv_norm=adv_norm, beta_k3=beta, eps_low=eps[0], eps_high=eps[1])
    cur = lp.clone().requires_grad_(True)
    out = policy_loss(cur, blp, mask, rewards, cfg)
    (g,) = torch.autograd.grad(out.loss, cur)
    ref_cur = lp.clone().requires_grad_(True)
    ref = ref_loss(ref_cur, blp, mask, rewards, cfg)
    (g_ref,) = torch.autograd.grad(ref, ref_cur)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(g).all()
    assert (g[~mask] == 0).all()  # padding gets no gradient
    if name in RATIO_LOSSES:
        # the data must exercise both sides of the clip for this comparison to mean much
        m = out.metrics
        assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0
        assert m["clip_frac_low"] + m["clip_frac_high"] < 1


def test_dr_grpo_reference_with_budget() -> None:
    lp, blp, mask, rewards = random_batch(3)
    cfg = LossConfig(name="dr_grpo", max_len=16)
    cur = lp.clone().requires_grad_(True)
    ref_cur = lp.clone().requires_grad_(True)
    out = policy_loss(cur, blp, mask, rewards, cfg)
    ref = ref_loss(ref_cur, blp, mask, rewards, cfg)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, cur)[0], torch.autograd.grad(ref, ref_cur)[0]
    )


def test_on_policy_gradients_agree() -> None:
    """On-policy every ratio is 1, nothing is clipped, and GRPO, GSPO and REINFORCE (token mean)
    all give the gradient -A_i ∇s_i / #sequences."""
    lp, _, mask, rewards = random_batch(4)
    grads = {}
    for name in ("grpo", "gspo", "reinforce"):
        cur = lp.clone().requires_grad_(True)
        out = policy_loss(cur, lp, mask, rewards, LossConfig(name=name))
        grads[name] = torch.autograd.grad(out.loss, cur)[0]
        assert out.metrics["is_weight_mean"] == pytest.approx(1.0, rel=1e-12)
        assert out.metrics["clip_frac_low"] == out.metrics["clip_frac_high"] == 0.0
        assert out.metrics["kl_k3"] == pytest.approx(0.0, abs=1e-15)
    torch.testing.assert_close(grads["grpo"], grads["reinforce"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["gspo"], grads["reinforce"], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RATIO_LOSSES)
@pytest.mark.parametrize(
    "w,grad_pos_adv,grad_neg_adv",
    [
        (1.5, False, True),  # above 1+eps: A>0 clipped (no grad), A<0 keeps its gradient
        (0.5, True, False),  # below 1-eps: A<0 clipped (no grad), A>0 keeps its gradient
        (1.0, True, True),  # inside: always a gradient
        (1.15, True, True),
        (0.85, True, True),
    ],
)
def test_clipping(name, w, grad_pos_adv, grad_neg_adv) -> None:
    """Two single-token completions with q = 0.5 each, so D = 0.5 and GEPO's weight, GSPO's ratio
    and the token ratio are all p / 0.5 = w. Rewards (1, 0) give A = (0.5, -0.5)."""
    blp = torch.full((1, 2, 1), math.log(0.5), dtype=torch.float64)
    lp = torch.full((1, 2, 1), math.log(0.5 * w), dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 2, 1, dtype=torch.bool)
    rewards = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = policy_loss(lp, blp, mask, rewards, LossConfig(name=name))
    (g,) = torch.autograd.grad(out.loss, lp)
    for idx, adv, has_grad in ((0, 0.5, grad_pos_adv), (1, -0.5, grad_neg_adv)):
        expected = -adv * w / 2 if has_grad else 0.0  # d/dlp of -(w A)/2 with w = e^lp / 0.5
        assert g[0, idx, 0].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert out.metrics["is_weight_mean"] == pytest.approx(w, rel=1e-12)
    assert out.metrics["clip_frac_high"] == (0.5 if w > 1.2 else 0.0)
    assert out.metrics["clip_frac_low"] == (0.5 if w < 0.8 else 0.0)


def test_extreme_ratio_stays_finite() -> None:
    """A token the sampler gave e^-200 but the learner finds likely: no inf/NaN anywhere."""
    lp = torch.tensor([[[-0.1], [-0.2]]], requires_grad=True)
    blp = torch.tensor([[[-200.0], [-0.2]]])
    mask = torch.ones(1, 2, 1, dtype=torch.bool)
    for name in LOSS_NAMES:
        for rewards in ([[1.0, 0.0]], [[0.0, 1.0]]):
            out = policy_loss(lp, blp, mask, torch.tensor(rewards), LossConfig(name=name,
                                                                               beta_k3=0.005))
            (g,) = torch.autograd.grad(out.loss, lp)
            assert torch.isfinite(out.loss) and torch.isfinite(g).all(), name
            assert all(math.isfinite(v) for v in out.metrics.values()), name


# ---------------------------------------------------------------------------------------------
# Degenerate groups and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("adv_norm", ["mean", "mean_std"])
def test_identical_rewards_give_zero_policy_gradient(name, adv_norm) -> None:
    lp, blp, mask, _ = random_batch(6)
    rewards = torch.full((3, 4), 0.7, dtype=torch.float64)
    cur = lp.clone().requires_grad_(True)
    out = policy_loss(cur, blp, mask, rewards, LossConfig(name=name, adv_norm=adv_norm))
    (g,) = torch.autograd.grad(out.loss, cur)
    assert out.loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    assert out.metrics["adv_zero_frac"] == 1.0
    assert out.metrics["adv_std"] == 0.0


def test_adv_zero_frac_counts_groups() -> None:
    lp, blp, mask, rewards = random_batch(0)  # group 0 all equal by construction
    rewards[1] = torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    rewards[2] = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    m = policy_loss(lp, blp, mask, rewards, LossConfig()).metrics
    assert m["adv_zero_frac"] == pytest.approx(2 / 3)
    assert m["seq_len_mean"] == pytest.approx(mask.sum().item() / 12)
    assert tuple(m) == METRIC_NAMES
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_single_token_completions(name) -> None:
    lp = torch.tensor([[[-0.3], [-1.2], [-0.05]]], dtype=torch.float64, requires_grad=True)
    blp = torch.tensor([[[-0.4], [-1.0], [-0.05]]], dtype=torch.float64)
    mask = torch.ones(1, 3, 1, dtype=torch.bool)
    rewards = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)
    cfg = LossConfig(name=name)
    out = policy_loss(lp, blp, mask, rewards, cfg)
    (g,) = torch.autograd.grad(out.loss, lp)
    ref_lp = lp.detach().clone().requires_grad_(True)
    ref = ref_loss(ref_lp, blp, mask, rewards, cfg)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.autograd.grad(ref, ref_lp)[0], rtol=1e-12, atol=1e-14)
    assert g.abs().sum() > 0
    assert out.metrics["seq_len_mean"] == 1.0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_length_completion_contributes_nothing(name) -> None:
    """An empty completion adds no term and no count; its reward still sets the baseline. So the
    loss equals that of the same batch with the empty completion's group mate holding the same
    advantages and the empty one simply absent from every sum and denominator."""
    lp = torch.tensor([[[-0.3, -0.7], [-1.2, -0.4], [0.0, 0.0]]], dtype=torch.float64)
    blp = torch.tensor([[[-0.5, -0.6], [-1.0, -0.3], [0.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True], [True, True], [False, False]]])
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)  # A = (0, -1, +1)
    cfg = LossConfig(name=name, beta_k3=0.01)
    cur = lp.clone().requires_grad_(True)
    out = policy_loss(cur, blp, mask, rewards, cfg)
    (g,) = torch.autograd.grad(out.loss, cur)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    assert (g[0, 2] == 0).all()
    ref_cur = lp.clone().requires_grad_(True)
    ref = ref_loss(ref_cur, blp, mask, rewards, cfg)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.autograd.grad(ref, ref_cur)[0], rtol=1e-12, atol=1e-14)
    # With only the second completion carrying a non-zero advantage (-1), the sequence-mean
    # losses are that one term over 2 sequences, not 3.
    if name == "reinforce":
        assert out.loss.item() == pytest.approx(
            -(-1.0 * -0.8) / 2 + 0.01 * ref_k3(lp, blp, mask), rel=1e-12
        )


def ref_k3(lp, blp, mask) -> float:
    ds = [float(b - a) for a, b, m in zip(lp.flatten(), blp.flatten(), mask.flatten()) if m]
    return sum(math.exp(d) - d - 1 for d in ds) / len(ds)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_batch_without_tokens(name) -> None:
    lp = torch.full((2, 3, 4), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = policy_loss(lp, lp.detach(), mask, rewards, LossConfig(name=name, beta_k3=0.1))
    (g,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert out.metrics["seq_len_mean"] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    name=st.sampled_from(LOSS_NAMES),
    pad_lp=st.floats(allow_nan=True, allow_infinity=True),
    pad_blp=st.floats(allow_nan=True, allow_infinity=True),
)
def test_padding_never_counts(seed, name, pad_lp, pad_blp) -> None:
    lp, blp, mask, rewards = random_batch(seed, n=2, g=3, t=5)
    cfg = LossConfig(name=name, beta_k3=0.01)

    def run(fill_lp: float, fill_blp: float):
        cur = torch.where(mask, lp, torch.full_like(lp, fill_lp)).requires_grad_(True)
        b = torch.where(mask, blp, torch.full_like(blp, fill_blp))
        out = policy_loss(cur, b, mask, rewards, cfg)
        return out, torch.autograd.grad(out.loss, cur)[0]

    base, g_base = run(0.0, 0.0)
    other, g_other = run(pad_lp, pad_blp)
    assert torch.equal(other.loss, base.loss)
    assert torch.equal(g_other, g_base)
    assert (g_other[~mask] == 0).all()
    assert other.metrics == base.metrics


# ---------------------------------------------------------------------------------------------
# Input validation and dtypes
# ---------------------------------------------------------------------------------------------


def test_invalid_inputs_raise() -> None:
    lp, blp, mask, rewards = random_batch(0)
    cfg = LossConfig()
    bad = [
        (lp[0], blp[0], mask[0], rewards),  # 2-D
        (lp, blp[:, :3], mask, rewards),  # shape mismatch
        (lp, blp, mask.to(torch.float64), rewards),  # mask not bool
        (lp, blp, mask, rewards[:, :3]),  # rewards shape
        (lp, blp, mask, rewards.unsqueeze(-1)),
        (lp[:0], blp[:0], mask[:0], rewards[:0]),  # empty batch
        (lp.to(torch.int64), blp, mask, rewards),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            policy_loss(*args, cfg)
    nan_lp = lp.clone()
    nan_lp[mask.nonzero()[0].unbind()] = float("nan")
    with pytest.raises(ValueError, match="logprobs"):
        policy_loss(nan_lp, blp, mask, rewards, cfg)
    inf_blp = blp.clone()
    inf_blp[mask.nonzero()[3].unbind()] = -float("inf")
    with pytest.raises(ValueError, match="behavior_logprobs"):
        policy_loss(lp, inf_blp, mask, rewards, cfg)
    nan_r = rewards.clone()
    nan_r[1, 1] = float("nan")
    with pytest.raises(ValueError, match="rewards"):
        policy_loss(lp, blp, mask, nan_r, cfg)


def test_low_precision_inputs_are_upcast() -> None:
    lp, blp, mask, rewards = random_batch(2)
    cur = lp.to(torch.bfloat16).requires_grad_(True)
    out = policy_loss(cur, blp.to(torch.bfloat16), mask, rewards.float(), LossConfig())
    assert out.loss.dtype == torch.float32
    (g,) = torch.autograd.grad(out.loss, cur)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all() and g.abs().sum() > 0
    full = policy_loss(
        lp.to(torch.bfloat16).double(), blp.to(torch.bfloat16).double(), mask, rewards,
        LossConfig(),
    )
    assert out.loss.item() == pytest.approx(full.loss.item(), rel=1e-5, abs=1e-6)


def test_typical_batch_shape() -> None:
    """The learner's usual batch, N=8, G=8, T=64: finite loss and gradient for every loss."""
    gen = torch.Generator().manual_seed(0)
    n, g, t = 8, 8, 64
    lp = (-torch.rand(n, g, t, generator=gen) * 3).requires_grad_(True)
    blp = lp.detach() + 0.3 * torch.randn(n, g, t, generator=gen)
    mask = torch.arange(t).expand(n, g, t) < torch.randint(0, t + 1, (n, g, 1), generator=gen)
    rewards = torch.randint(0, 2, (n, g), generator=gen).float()
    for name in LOSS_NAMES:
        out = policy_loss(lp, blp, mask, rewards, LossConfig(name=name, beta_k3=0.005))
        (grad,) = torch.autograd.grad(out.loss, lp)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert out.loss.shape == ()


def test_weight_family_variances_are_logged_for_every_loss_and_match_each_losss_own_weight() -> None:
    lp, blp, mask, rewards = random_batch(3)
    outs = {name: policy_loss(lp, blp, mask, rewards, LossConfig(name=name)).metrics for name in LOSS_NAMES}
    families = ("token_ratio_var", "seq_ratio_var", "group_weight_var")
    for name in LOSS_NAMES:  # the same batch gives the same evidence whichever loss is trained
        assert [outs[name][k] for k in families] == pytest.approx([outs["gepo"][k] for k in families])
    assert outs["grpo"]["is_weight_var"] == pytest.approx(outs["grpo"]["token_ratio_var"])
    assert outs["gspo"]["is_weight_var"] == pytest.approx(outs["gspo"]["seq_ratio_var"])
    assert outs["gepo"]["is_weight_var"] == pytest.approx(outs["gepo"]["group_weight_var"])
    on_policy = policy_loss(blp.clone(), blp, mask, rewards, LossConfig()).metrics
    assert on_policy["token_ratio_var"] == 0.0 and on_policy["seq_ratio_var"] == 0.0
    assert on_policy["group_weight_var"] > 0.0  # GEPO's weight is not 1 even on-policy
