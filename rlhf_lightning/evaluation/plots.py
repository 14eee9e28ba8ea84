"""Figures of the PPO stage (matplotlib, headless): its training curves and the over-optimisation plot.

Logged to MLflow and shown on the reinforce step's Metaflow card by the pipeline.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on a training machine; figures go to files and cards
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def training_curves_figure(history: list[dict]):
    """PPO's per-iteration statistics, one small plot each (reward, KL and its coefficient, losses, ...)."""
    keys = [k for k in ("ppo/reward", "ppo/kl", "ppo/kl_coef", "ppo/value_loss", "ppo/clip_fraction",
                        "ppo/approx_kl", "ppo/entropy", "ppo/response_length", "ppo/eos_rate")
            if history and k in history[0]]
    cols = min(len(keys), 5)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        ax.plot([h[key] for h in history])
        ax.set_title(key + (" (estimate; can dip below 0)" if key == "ppo/kl" else ""), fontsize=9)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return fig


def overoptimisation_figure(history: list[dict]):
    """Left: gold score, the reward PPO maximised (the learned reward normalised, plus any reward functions,
    weighted: the scale PPO saw) and KL over the PPO iterations on one plot; rollouts as lines, the held-out monitor's evaluations as markers. Gold falling while the
    learned reward keeps rising is reward over-optimisation (Gao et al. 2023). Right, when the monitor
    ran: held-out win rates against the reference by both judges."""
    held = [h for h in history if "heldout/kl" in h]
    fig, axes = plt.subplots(1, 2 if held else 1, figsize=(12 if held else 7.5, 4.2), squeeze=False)
    ax = axes[0][0]
    it = [h["iteration"] + 1 for h in history]
    hx = [h["iteration"] + 1 for h in held]
    ax.plot(it, [h["ppo/reward"] for h in history], color="tab:blue", label="reward (rollouts)")
    if "ppo/gold_score" in history[0]:
        ax.plot(it, [h["ppo/gold_score"] for h in history], color="tab:green", label="gold score (rollouts)")
    if held:
        ax.plot(hx, [h["heldout/reward"] for h in held], "o", color="tab:blue", label="reward (held-out)")
        if "heldout/gold_score" in held[0]:
            ax.plot(hx, [h["heldout/gold_score"] for h in held], "s", color="tab:green", label="gold score (held-out)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("score")
    kl_ax = ax.twinx()
    kl_ax.plot(it, [h["ppo/kl"] for h in history], color="tab:red", label="KL to reference (rollouts)")
    if held:
        kl_ax.plot(hx, [h["heldout/kl"] for h in held], "^", color="tab:red", label="KL (held-out)")
    kl_ax.set_ylabel("KL (nats per sequence)", color="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    kl_handles, kl_labels = kl_ax.get_legend_handles_labels()
    ax.legend(handles + kl_handles, labels + kl_labels, fontsize=7, loc="upper left")
    ax.set_title("Gold score, reward and KL over PPO")
    if held:
        wr = axes[0][1]
        for key, label in (("heldout/gold_win_rate", "gold judge"), ("heldout/rm_win_rate", "reward model"),
                           ("heldout/reward_win_rate", "total reward")):
            if key in held[0]:
                wr.errorbar(hx, [h[key] for h in held], yerr=[h[key + "_ci95"] for h in held], marker="o",
                            capsize=3, label=label)
        wr.axhline(0.5, color="grey", lw=0.8, ls=":")
        wr.set_xlabel("PPO iteration")
        wr.set_ylabel("win rate vs reference (held-out)")
        wr.legend(fontsize=7)
    fig.tight_layout()
    return fig
