"""The losses against values computed by hand (the arithmetic is written out in the comments)."""

import math
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pytest

from rlhf_lightning.models.losses import (
    AdaptiveKLController,
    bradley_terry_loss,
    gae,
    group_normalised_advantages,
    kl_coef_factor,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    missing_eos_penalty,
    per_token_kl,
    pooled_sequence_kl,
    ppo_policy_loss,
    rloo_advantages,
    sequence_rewards,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), T(b, dtype=torch.float32), atol=tol, rtol=0)


def test_masked_mean():
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_mean(x, mask), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1


def test_masked_whiten_ignores_padding():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3, std 0.8164966; padding -> 0
    close(masked_whiten(x, mask), [[-1.2247449, 0.0, 1.2247449, 0.0]])


def test_bradley_terry_loss():
    # -(log sigmoid(1) + log sigmoid(0)) / 2 = (0.3132617 + 0.6931472) / 2
    close(bradley_terry_loss(T([1.0, 0.0]), T([0.0, 0.0])), 0.5032044)


def test_per_token_kl_and_penalised_rewards():
    logp = T([[-1.0, -2.0, -0.5, -3.0]])
    ref_logp = T([[-1.5, -2.0, -1.0, -9.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    close(per_token_kl(logp, ref_logp), [[0.5, 0.0, 0.5, 6.0]])
    # -0.1 * kl on real tokens; the score 2.0 lands on the last real token (index 2): -0.05 + 2 = 1.95
    rewards = kl_penalised_rewards(T([2.0]), per_token_kl(logp, ref_logp), mask, kl_coef=0.1)
    close(rewards, [[-0.05, 0.0, 1.95, 0.0]])


def test_gae_1x3_by_hand():
    rewards = T([[0.0, 0.0, 1.0]])
    values = T([[0.5, 0.4, 0.8]])
    mask = T([[1.0, 1.0, 1.0]])
    # gamma 0.9, lam 0.5 (gamma * lam = 0.45); the value after the last token is 0.
    # t=2: delta = 1 + 0.9*0   - 0.8 =  0.2    A2 = 0.2
    # t=1: delta = 0 + 0.9*0.8 - 0.4 =  0.32   A1 = 0.32 + 0.45*0.2  = 0.41
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14   A0 = -0.14 + 0.45*0.41 = 0.0445
    # returns = A + V = [0.5445, 0.81, 1.0]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.0445, 0.41, 0.2]])
    close(returns, [[0.5445, 0.81, 1.0]])


def test_gae_padding_ends_the_episode():
    # Same case with a padded 4th token holding junk: it must neither leak into the real tokens
    # (its value is not bootstrapped) nor get an advantage of its own.
    rewards = T([[0.0, 0.0, 1.0, 5.0]])
    values = T([[0.5, 0.4, 0.8, 9.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.0445, 0.41, 0.2, 0.0]])
    close(returns, [[0.5445, 0.81, 1.0, 0.0]])


def test_ppo_policy_loss_by_hand():
    old_logp = T([[0.0, 0.0, 0.0, 0.0]])
    logp = T([[math.log(1.5), math.log(0.5), 0.0, 7.0]])  # ratios 1.5, 0.5, 1.0, (padding)
    advantages = T([[1.0, 1.0, -2.0, 3.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # clip 0.2: token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5;
    # token 2: max(2, 2) = 2.  loss = (-1.2 - 0.5 + 2) / 3 = 0.1, clip fraction 1/3.
    # approx_kl = mean((r - 1) - log r) = ((0.5 - 0.4054651) + (-0.5 + 0.6931472) + 0) / 3 = 0.0958940
    loss, clip_fraction, approx_kl = ppo_policy_loss(logp, old_logp, advantages, mask, clip_range=0.2)
    close(loss, 0.1)
    close(clip_fraction, 1.0 / 3.0)
    close(approx_kl, 0.0958940)


def test_ppo_policy_loss_gradient_is_zero_when_clipped():
    logp = T([[math.log(1.5)]], requires_grad=True)
    loss, _, _ = ppo_policy_loss(logp, T([[0.0]]), T([[1.0]]), T([[1.0]]), clip_range=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_value_loss_by_hand():
    old_values = T([[0.0, 0.0, 1.0, 0.0]])
    values = T([[0.5, -0.1, 1.0, 4.0]])
    returns = T([[1.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # clip 0.2: token 0: V_clip = 0.2, errors (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    #           token 1: V_clip = -0.1, errors 0.01 vs 0.01 -> 0.01;  token 2: 1.0 vs 1.0 -> 1.0
    # loss = 0.5 * (0.64 + 0.01 + 1.0) / 3 = 0.275, clip fraction 1/3
    loss, clip_fraction = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss, 0.275)
    close(clip_fraction, 1.0 / 3.0)


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert masked_mean(T([[3.0]]), T([[0.0]])).item() == 0.0


def test_rloo_by_hand():
    # Two prompts x 3 samples. Prompt 1: rewards 1, 2, 3; the others' means are 2.5, 2, 1.5.
    # Prompt 2: all 4 -> every sample is exactly its baseline.
    close(rloo_advantages(T([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]), k=3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # k = 2: each sample against the other one: 1 - 3 = -2, 3 - 1 = 2.
    close(rloo_advantages(T([1.0, 3.0]), k=2), [-2.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(T([1.0, 3.0]), k=1)


def test_group_normalised_by_hand():
    # Prompt 1: mean 2, Bessel std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1 -> (r - 2) / (1 + 1e-4).
    # Prompt 2: all equal -> std 0 -> advantages 0 (no division by zero).
    close(group_normalised_advantages(T([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]), k=3),
          [-1.0 / 1.0001, 0.0, 1.0 / 1.0001, 0.0, 0.0, 0.0])
    # k = 2: [0, 2]: mean 1, std sqrt((1 + 1) / 1) = 1.4142136 -> -+0.7070568 (eps 1e-4)
    close(group_normalised_advantages(T([0.0, 2.0]), k=2), [-0.7070568, 0.7070568])


def test_sequence_rewards_by_hand():
    logp = T([[-1.0, -2.0, -0.5, -3.0]])
    ref_logp = T([[-1.5, -2.0, -1.0, -9.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # KL of the real tokens 0.5 + 0 + 0.5 = 1 (padding's 6 ignored): 2 - 0.1 * 1 = 1.9,
    # the same total as the per-token rewards of test_per_token_kl_and_penalised_rewards: -0.05 + 0 + 1.95
    close(sequence_rewards(T([2.0]), per_token_kl(logp, ref_logp), mask, kl_coef=0.1), [1.9])


def test_missing_eos_penalty():
    close(missing_eos_penalty(T([1.0, 1.0]), T([True, False]), penalty=0.5), [1.0, 0.5])


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=100)
    # KL 9 vs target 6: error 9/6 - 1 = 0.5 -> clipped to 0.2; 0.1 * (1 + 0.2 * 10/100) = 0.102
    assert ctl.update(kl=9.0, n_steps=10) == pytest.approx(0.102)
    # KL 5.4: error -0.1 (inside the clip); 0.102 * (1 - 0.1 * 10/100) = 0.10098
    assert ctl.update(kl=5.4, n_steps=10) == pytest.approx(0.10098)
    # KL 0 (policy == reference): error -1 -> clipped to -0.2; 0.10098 * (1 - 0.2 * 50/100) = 0.090882
    assert ctl.update(kl=0.0, n_steps=50) == pytest.approx(0.090882)


def test_fixed_kl_controller_never_moves():
    ctl = AdaptiveKLController(kl_coef=0.05, target=None, horizon=100)
    assert ctl.update(kl=100.0, n_steps=1000) == 0.05 and ctl.value == 0.05


def test_kl_controller_stays_positive_on_a_rollout_of_many_horizons():
    """192 rows (48 prompts x 4 samples) against a horizon of 32 at KL 1 vs target 5: Ziegler's linear step
    1 - 0.2 x 192 / 32 = -0.2 would turn 0.1 into -0.02 (a reward for leaving the reference); the step is
    floored at 0.5, so each such update halves the coefficient and it stays positive."""
    assert kl_coef_factor(kl=1.0, target=5.0, n_steps=192, horizon=32) == 0.5
    assert kl_coef_factor(kl=1.0, target=5.0, n_steps=10_000, horizon=32) == 0.5
    ctl = AdaptiveKLController(kl_coef=0.1, target=5.0, horizon=32)
    assert ctl.update(kl=1.0, n_steps=192) == pytest.approx(0.05)
    for _ in range(20):
        assert ctl.update(kl=0.0, n_steps=10 * 192) > 0
    # Below the floor's reach the rule is unchanged: 1 + 0.2 x 64 / 32 = 1.4 up, 1 - 0.2 x 64 / 32 = 0.6 down.
    assert kl_coef_factor(kl=50.0, target=5.0, n_steps=64, horizon=32) == pytest.approx(1.4)
    assert kl_coef_factor(kl=0.0, target=5.0, n_steps=64, horizon=32) == pytest.approx(0.6)


def test_pooled_sequence_kl_weighs_every_response_once():
    """Two processes, the other holding sequence KLs [6] and this one [1, 2, 3]: the pooled mean is
    (1 + 2 + 3 + 6) / 4 = 3 (not the mean of the means, (2 + 6) / 2 = 4), rows per process 4 / 2 = 2."""
    other = torch.stack([T(6.0), T(1.0), T(1.0)])  # (KL sum, rows, processes) of the other process
    assert pooled_sequence_kl(T([1.0, 2.0, 3.0]), lambda t: t + other) == (3.0, 2.0)
    assert pooled_sequence_kl(T([1.0, 2.0, 3.0]), lambda t: t) == (2.0, 3.0)  # one process


# Each process's sequence KLs: alone, rank 0 (mean 5.0, error 0) would keep 0.1 and rank 1 (mean 6.0,
# error +0.2) would move to 0.1 x (1 + 0.2 x 2 / 32) = 0.10125.
GLOO_KLS = ([4.5, 5.5], [5.5, 6.5])


def _kl_controller_rank(rank: int, port: int, out_dir: str) -> None:
    """One process of the gloo test: pool the KL over both, update a fresh controller, write kl_coef."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        kl, rows = pooled_sequence_kl(T(GLOO_KLS[rank]), reduce_sum)
        ctl = AdaptiveKLController(kl_coef=0.1, target=5.0, horizon=32)
        ctl.update(kl, n_steps=rows)
        with open(f"{out_dir}/rank{rank}", "w") as f:
            f.write(repr(ctl.value))
    finally:
        dist.destroy_process_group()


def test_kl_coef_is_the_same_on_two_gloo_processes(tmp_path):
    """Two real processes with different local KLs end with the same kl_coef: the one the pooled mean
    KL (4.5 + 5.5 + 5.5 + 6.5) / 4 = 5.5 gives, error 5.5 / 5 - 1 = 0.1, over 2 rows per process:
    0.1 x (1 + 0.1 x 2 / 32) = 0.100625."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_kl_controller_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    coefs = [float((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert coefs[0] == coefs[1] == pytest.approx(0.100625)
