"""Estimators and losses against hand-computed values, and a bandit that each algorithm must solve."""

from __future__ import annotations

import math

import pytest
import torch

from engine.algorithms import ALGORITHMS, AlgoConfig, compute_advantages, policy_loss
from engine.algorithms import advantages as adv
from engine.algorithms.kl import kl_estimate
from engine.algorithms.logprobs import token_logprobs
from engine.algorithms.losses import aggregate, clipped_policy_loss, kimi_loss, stale_token_weights, value_loss

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0]])


def test_group_advantages_by_hand() -> None:
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv.grpo(REWARDS).flatten().tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], abs=1e-5)
    assert adv.dr_grpo(REWARDS).flatten().tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert adv.rloo(REWARDS).flatten().tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_grpo_group_of_equal_rewards_has_no_signal() -> None:
    assert adv.grpo(torch.ones(2, 4)).abs().max().item() == 0.0


def test_rloo_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        adv.rloo(torch.ones(3, 1))


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    a, ret = adv.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert a.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert ret.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0])
    a, _ = adv.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert a.flatten().tolist() == pytest.approx([0.225, 0.25, 0.3])
    # Padding after the sequence changes nothing and gets no advantage.
    a_pad, _ = adv.gae(
        torch.tensor([[0.0, 0.0, 1.0, 0.0]]),
        torch.tensor([[0.5, 0.6, 0.7, 9.0]]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        gamma=1.0,
        lam=0.5,
    )
    assert a_pad.flatten().tolist() == pytest.approx([0.225, 0.25, 0.3, 0.0])


def test_reinforce_pp_kl_penalty_and_global_normalisation() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.1, 0.2, 5.0], [0.0, 0.0, 0.3]])
    out = adv.reinforce_pp(torch.tensor([1.0, 0.0]), kl, mask, kl_coef=1.0)
    returns = torch.tensor([[1 - 0.3, 1 - 0.2, 0.0], [-0.3, -0.3, -0.3]])  # reward-to-go minus KL ahead
    m = returns[mask.bool()]
    expected = (returns - m.mean()) / (m.var(unbiased=False).sqrt() + 1e-6) * mask
    assert torch.allclose(out, expected, atol=1e-5)
    assert out[mask.bool()].mean().abs().item() < 1e-5


def test_aggregation_modes() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(v, m, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(v, m, "seq_sum", norm_tokens=2.0).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(v, m, "mean")  # type: ignore[arg-type]


def test_kimi_gradient_on_two_sample_group() -> None:
    logp = torch.tensor([[-0.4, -0.6, -9.0], [-1.5, -0.5, -9.0]], requires_grad=True)
    old = torch.tensor([[-0.5, -0.7, 0.0], [-1.0, -0.8, 0.0]])  # sequence sums -1.2 and -1.8
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    kimi_loss(logp, old, torch.tensor([[1.0, 0.0]]), mask, tau=0.5).backward()
    # d loss / d logp_jt = -(1/k) [(r_j - mean r) - tau (log pi_j - log pi_old_j)]
    g0 = -(0.5 - 0.5 * (-1.0 + 1.2)) / 2
    g1 = -(-0.5 - 0.5 * (-2.0 + 1.8)) / 2
    assert torch.allclose(logp.grad, torch.tensor([[g0, g0, 0.0], [g1, g1, 0.0]]))


def test_clipping_stops_the_gradient_beyond_the_trust_region() -> None:
    old = torch.zeros(1, 1)
    for logp0, a, has_grad in [(0.5, 1.0, False), (0.5, -1.0, True), (-0.5, -1.0, False), (0.1, 1.0, True)]:
        logp = torch.tensor([[logp0]], requires_grad=True)
        clipped_policy_loss(logp, old, torch.tensor([a]), torch.ones(1, 1)).backward()
        assert (logp.grad.abs().item() > 0) == has_grad, (logp0, a)


def test_stale_tokens_weigh_their_truncated_importance_ratio() -> None:
    # versions: two tokens of version 3 (stale), one of 4 (current), then padding (-1).
    versions = torch.tensor([[3, 3, 4, -1]])
    old = torch.tensor([[-1.0, -0.5, -2.0, 0.0]])
    rollout = torch.tensor([[-1.5, -2.0, -1.0, 0.0]])
    weights = stale_token_weights(old, rollout, versions, current_version=4, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[math.exp(0.5), 2.0, 1.0, 1.0]]))  # exp(1.5) is capped at 2
    # The weights scale each token's gradient (ratio 1: inside the clip range).
    logp = old.clone().requires_grad_(True)
    clipped_policy_loss(
        logp,
        old,
        torch.tensor([1.0]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        aggregation="token_mean",
        token_weights=weights,
    ).backward()
    assert torch.allclose(logp.grad, -weights * torch.tensor([[1.0, 1.0, 1.0, 0.0]]) / 3)


def test_value_loss_clips() -> None:
    loss = value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), clip=0.5)
    assert loss.item() == pytest.approx(0.5 * max((2 - 3) ** 2, (0.5 - 3) ** 2))


def test_kl_estimators() -> None:
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_x = ref - logp
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx((-log_x).tolist())
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx((log_x**2 / 2).tolist())
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx((log_x.exp() - log_x - 1).tolist())
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_and_k3_nonnegative() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.0]), 0)
    q = torch.softmax(torch.tensor([0.3, 0.5, 0.1, -1.0]), 0)
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[x], q.log()[x]
    k3 = kl_estimate(logp, ref, "k3")
    assert k3.min().item() >= 0
    assert k3.mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_estimate(logp, ref, "k1").mean().item() == pytest.approx(exact, rel=0.05)


def test_token_logprobs() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    got = token_logprobs(logits, torch.tensor([[0, 2]]))
    want = torch.tensor([[2 - math.log(math.exp(2) + 1 + math.exp(-1)), -math.log(3)]])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"name": "sac"}, "algo.name"),
        ({"name": "grpo", "kl_estimator": "k9"}, "kl_estimator"),
        ({"name": "grpo", "aggregation": "mean"}, "aggregation"),
        ({"name": "kimi", "aggregation": "token_mean"}, "does not apply to kimi"),
        ({"name": "kimi", "tau": 0.0}, "tau"),
        ({"name": "grpo", "clip_high": 1.5}, "clip_high"),
    ],
)
def test_config_errors_name_the_key(over: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AlgoConfig(**over)


# --- bandit: a softmax policy over actions; each "response" is one token -------------------------
ACTION_REWARDS = torch.tensor([0.0, 0.2, 1.0, 0.0, 0.3])
BEST = 2


def _bandit(cfg: AlgoConfig, iterations: int = 60, groups: int = 8, group_size: int = 4, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(len(ACTION_REWARDS), requires_grad=True)
    value = torch.zeros(1, requires_grad=True)  # PPO's critic: one state
    ref_logits = logits.detach().clone()
    opt = torch.optim.Adam([logits, value], lr=0.1)
    n = groups * group_size
    mask = torch.ones(n, 1)
    for _ in range(iterations):
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(logits, 0), n, replacement=True, generator=g)
            rewards = ACTION_REWARDS[actions]
            old_logp = torch.log_softmax(logits, 0)[actions][:, None]
            ref_logp = torch.log_softmax(ref_logits, 0)[actions][:, None]
            advantages = compute_advantages(
                cfg, rewards, mask, group_size, old_logp=old_logp, ref_logp=ref_logp, values=value.expand(n, 1)
            )
            old_values = value.expand(n, 1).clone()
        for _ in range(2):  # two steps per batch, so ratios leave 1 and clipping is exercised
            logp = torch.log_softmax(logits, 0)[actions][:, None]
            loss = policy_loss(
                cfg, logp, old_logp, advantages, mask, rewards=rewards, group_size=group_size, ref_logp=ref_logp
            )
            if cfg.needs_critic:
                returns = advantages + old_values
                loss = loss + value_loss(value.expand(n, 1), old_values, returns, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.softmax(logits, 0)[BEST].item()


@pytest.mark.parametrize(
    "cfg",
    [
        AlgoConfig(name="kimi", tau=0.1),
        AlgoConfig(name="grpo"),
        AlgoConfig(name="grpo", kl_coef=0.01, kl_estimator="k3"),
        AlgoConfig(name="dr_grpo"),
        AlgoConfig(name="rloo"),
        AlgoConfig(name="reinforce_pp", kl_coef=0.01),
        AlgoConfig(name="ppo", lam=1.0),
    ],
    ids=["kimi", "grpo", "grpo-kl", "dr_grpo", "rloo", "reinforce_pp", "ppo"],
)
def test_bandit_converges_to_the_rewarded_action(cfg: AlgoConfig) -> None:
    assert _bandit(cfg) > 0.9


def test_every_algorithm_has_a_bandit_case() -> None:
    ids = {"kimi", "grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"}
    assert set(ALGORITHMS) == ids
