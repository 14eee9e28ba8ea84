"""The RLHF losses as small pure functions on tensors (unit-tested on hand-computed values).

Shapes: B = batch rows, T = response tokens. `mask` is 1 on real response tokens (up to and including
the first EOS) and 0 on padding; every token-level mean is taken over the real tokens of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from rlhf_lightning.config import KL_ERROR_CLIP, KL_MIN_FACTOR


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (all of them, or along `dim`)."""
    # x, mask: (B, T)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (population) variance over the masked positions; padding is set to 0."""
    # x, mask: (B, T)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask  # (B, T)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen preferred) with P = sigmoid(r_chosen - r_rejected), averaged over the pairs."""
    # r_chosen, r_rejected: (B,)
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(policy || reference) at each sampled token: log pi(a) - log ref(a).

    Unbiased for the sequence KL when the tokens were sampled from the policy; summed over a
    response it is the log-ratio of the whole sequence."""
    # logp, ref_logp: (B, T)
    return logp - ref_logp


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of `mask`."""
    # mask: (B, T) -> (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    return (positions * mask).argmax(dim=1)


def kl_penalised_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every token (`kl`: `per_token_kl`), plus the sequence score at
    the last real token.

    The reward model judges whole responses, so its score arrives once, when the response ends; the
    KL penalty is paid token by token where it is incurred."""
    # score: (B,); kl, mask: (B, T)
    rewards = -kl_coef * kl * mask  # (B, T)
    last = last_token_index(mask)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)  # (B,)
    rewards[rows, last] += score
    return rewards  # (B, T)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns = advantages + values).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}.
    Padding is zeroed first, so the value after the last real token is 0 (the episode ends there)."""
    # rewards, values, mask: (B, T)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask  # (B, T), (B, T)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate -> (loss, clip_fraction, approx_kl).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))): the pessimistic bound stops the
    update from moving a token's probability further than the clip range in the advantageous direction.
    approx_kl is the k3 estimator (ratio - 1) - log(ratio) of KL(old || new): >= 0, low variance."""
    # logp, old_logp, advantages, mask: (B, T)
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss -> (loss, clip_fraction).

    loss = 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, -eps, eps):
    like the policy, the value head may not jump far from its rollout-time predictions in one update."""
    # values, old_values, returns, mask: (B, T)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)  # (B, T)
    unclipped_error = (values - returns) ** 2  # (B, T)
    clipped_error = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


# ---------------------------------------------------------------- sequence-level estimators
# rloo and grpo score whole responses: the sequence reward (score - kl_coef * sequence KL) gets a
# baseline from the other samples of the same prompt, and the advantage is shared by every token of
# the response. Rows are grouped by prompt in consecutive blocks of k (`rollout` repeats each prompt k
# times), so (B,) -> (B / k, k) puts one prompt per row.


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean of the other k - 1 rewards of the same prompt.

    Unbiased (the baseline does not depend on the sample it corrects) and needs no value head
    (Ahmadian et al. 2024, "Back to Basics")."""
    # rewards: (B,) with B = groups * k
    if k < 2:
        raise ValueError(f"rloo needs at least 2 samples per prompt, got {k}")
    grouped = rewards.view(-1, k)  # (G, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)  # (G, k)
    return (grouped - baseline).reshape(-1)  # (B,)


def group_normalised_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's baseline: A_i = (r_i - mean_group) / (std_group + eps), std with Bessel's correction as
    in DeepSeekMath / trl. A group whose samples all score the same gives 0, not a division by 0."""
    # rewards: (B,) with B = groups * k
    if k < 2:
        raise ValueError(f"grpo needs at least 2 samples per prompt, got {k}")
    grouped = rewards.view(-1, k)  # (G, k)
    mean = grouped.mean(1, keepdim=True)  # (G, 1)
    std = grouped.std(1, keepdim=True)  # (G, 1)
    return ((grouped - mean) / (std + eps)).reshape(-1)  # (B,)


def sequence_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """score - kl_coef * KL of the whole response (the sum of the per-token k1 terms `kl`): the reward the
    sequence-level estimators compare; the same total as `kl_penalised_rewards` summed over tokens."""
    # score: (B,); kl, mask: (B, T)
    return score - kl_coef * (kl * mask).sum(1)  # (B,)


def missing_eos_penalty(score: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of responses that never produced an end token.

    The reward model judges the visible text and cannot tell a finished answer from one the length
    limit cut off; without this, PPO can drift towards rambling that never ends."""
    # score: (B,); ended: (B,) bool
    return score - penalty * (~ended).to(score.dtype)  # (B,)


def kl_coef_factor(kl: float, target: float, n_steps: float, horizon: float) -> float:
    """What one update multiplies kl_coef by: 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon,
    never below `KL_MIN_FACTOR` (0.5).

    Unclamped, a rollout of 5 horizons or more (n_steps >= horizon / 0.2) with a KL far below the target
    gives a factor <= 0: the coefficient would vanish or turn negative, and the penalty would become a
    reward for leaving the reference. The floor keeps it positive whatever the rollout size; why a halving,
    and why PPOConfig refuses horizons short enough to reach it: see `KL_MIN_FACTOR`."""
    error = min(max(kl / target - 1.0, -KL_ERROR_CLIP), KL_ERROR_CLIP)
    return max(1.0 + error * n_steps / horizon, KL_MIN_FACTOR)


def pooled_sequence_kl(seq_kl: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[float, float]:
    """(mean sequence KL over the rollouts of all processes, rows per process) for the KL controller.

    `seq_kl` is this process's per-response KL; `reduce_sum` sums a tensor over the processes (the
    identity with one). Every process feeds the controller the same numbers, so kl_coef stays identical
    on all of them (a checkpoint holds one process's). The mean weighs every response once, also if
    the processes' rollouts differed in size."""
    # seq_kl: (B,)
    local = torch.stack([seq_kl.sum(), seq_kl.new_tensor(float(seq_kl.shape[0])), seq_kl.new_tensor(1.0)])  # (3,)
    kl_sum, rows, processes = reduce_sum(local).tolist()  # (3,): summed over the processes
    return kl_sum / rows, rows / processes


class AdaptiveKLController:
    """The InstructGPT / trlX controller: kl_coef follows a proportional rule towards a target KL.

        error   = clip(kl / target - 1, -0.2, 0.2)
        kl_coef = kl_coef * max(1 + error * n_steps / horizon, 0.5)

    The clip bounds a single correction at 20% of the horizon's worth, and `kl_coef_factor` keeps every
    factor >= `KL_MIN_FACTOR`, so the coefficient stays positive. `n_steps` is the number of rollout
    samples of one process (PPOModule passes the KL averaged over all processes, `pooled_sequence_kl`).
    With target None the coefficient stays fixed."""

    def __init__(self, kl_coef: float, target: float | None, horizon: int):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: float) -> float:
        """Feed the rollout's mean sequence KL (nats); return the coefficient for the next rollout."""
        if self.target is not None:
            self.value *= kl_coef_factor(kl, self.target, n_steps, self.horizon)
        return self.value
