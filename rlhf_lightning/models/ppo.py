"""PPO of a LoRA policy against a trained reward model: a LightningModule with manual optimisation.

One `training_step` is one iteration on a batch of prompts, in four named phases:

1. rollout       sample `samples_per_prompt` responses per prompt with the current policy (prompts
                 left-padded, as `generate` needs), seeded per iteration so a CPU run repeats exactly;
2. score_and_kl  the reward of the decoded (prompt, response) text (`rewards.Rewards`: the reward model's
                 score normalised by its measured mean and std, and reward functions, weighted),
                 minus the missing-EOS penalty; log-probs of the response
                 tokens under the policy and the reference (the same PeftModel with its adapter
                 disabled) and from them the per-token KL, computed once for the penalty and the
                 logged figures; values and entropy. When one minibatch holds the whole rollout, the
                 policy's forward keeps its graph and is also the first update step's;
3. advantages    the estimator: `gae` (per-token rewards -kl_coef * KL plus the score at the last token,
                 GAE over a learned value head, whitened) or `rloo` / `grpo` (sequence reward minus a
                 baseline from the other samples of the same prompt, no value head);
4. ppo_epochs    minibatches x epochs of the clipped policy loss (+ vf_coef * clipped value loss for
                 gae), gradient clipping, early stop once the approximate KL leaves the trust region.

After the update the adaptive controller moves kl_coef towards `kl_target` (when set).

Log-probs are computed for the response tokens only (`logits_to_keep`): the LM head (49152 wide for
SmolLM2) is most of the cost of a forward pass on these small models.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from statistics import fmean

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn

from rlhf_lightning import judge
from rlhf_lightning.config import GenerationConfig, PolicyConfig, PPOConfig, RewardConfig, RLHFConfig
from rlhf_lightning.models.generation import Sampled, sample
from rlhf_lightning.models.loading import (enable_gradient_checkpointing, load_policy, policy_tokenizer,
                                           release_cached_memory, resolve_model, stop_token_ids)
from rlhf_lightning.models.logprobs import ended_with_eos, response_forward, token_logprobs
from rlhf_lightning.models.losses import (
    AdaptiveKLController,
    gae,
    group_normalised_advantages,
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
from rlhf_lightning.models.rewards import MODEL_TERM, Rewards
from rlhf_lightning.models.sampling import ResumableLoader, SeededOrder
from rlhf_lightning.models.trainer import build_trainer

VALUE_HEAD_FILE = "value_head.pt"
HISTORY_FILE = "ppo_history.json"


@dataclass
class Scored:
    """What phase 2 measures about one rollout (no gradients)."""

    terms: dict[str, torch.Tensor]  # {term: (B,)} each reward term's raw values (`Rewards.score`)
    reward: torch.Tensor  # (B,) their weighted total (`Rewards.total`)
    score: torch.Tensor  # (B,) the total minus the missing-EOS penalty: the reward PPO maximises
    ended: torch.Tensor  # (B,) bool, the response produced an end token
    logp: torch.Tensor  # (B, R) log-probs of the response tokens under the rollout policy
    ref_logp: torch.Tensor  # (B, R) the same under the reference (adapter disabled)
    kl: torch.Tensor  # (B, R) per-token KL(policy || reference) estimate: the penalty and the logged KL
    values: torch.Tensor | None  # (B, R) value predictions before each response token; None without value head
    entropy: torch.Tensor  # (B, R) entropy of the policy's next-token distribution
    # (logp, values) with their autograd graph when the first update reuses this forward (`shares_forward`)
    graph: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass
class Experience:
    """One rollout with everything the PPO update needs. Prompts left-padded, responses right-padded."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    logp: torch.Tensor  # (B, R) rollout-time log-probs (the "old" policy of the ratio)
    advantages: torch.Tensor  # (B, R) per-token advantages
    values: torch.Tensor | None = None  # (B, R) rollout-time values (centre of the value clip); gae only
    returns: torch.Tensor | None = None  # (B, R) value targets; gae only

    def __getitem__(self, rows: torch.Tensor) -> Experience:
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                             for f in fields(self)})


class PPOModule(L.LightningModule):
    """LoRA policy (+ scalar value head for gae), trained by PPO against a frozen reward model and reward
    functions."""

    def __init__(self, policy: PolicyConfig, ppo: PPOConfig, reward_model_dir: str | None, gold_judge: bool = False,
                 gradient_checkpointing: bool = False, generation: GenerationConfig | None = None,
                 reward: RewardConfig | None = None):
        """`reward_model_dir`: the reward model (`RewardScorer.load`; None with `reward.model_weight: null`);
        `reward`: the reward terms and weights (the reward model's score alone by default). `gold_judge`: also score the rollouts with the built-in task's gold judge, for monitoring
        only (`ppo/gold_score`); it never enters the reward. `gradient_checkpointing`: the policy
        recomputes its layers' activations in the backward pass (`trainer.gradient_checkpointing`).
        `generation`: where rollouts are generated (HF `generate` by default; `backend: vllm` starts an
        engine when the fit starts and hands it the adapter before every rollout)."""
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # several optimiser steps per rollout
        # Checkpoints hold only the trainable weights (on_save_checkpoint): 4-bit base weights do not reload.
        self.strict_loading = False
        self.ppo = ppo
        self.gold_judge = gold_judge
        self.policy = load_policy(policy)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        self.tokenizer = policy_tokenizer(policy)  # left padding for generate
        self.value_head: nn.Linear | None = None
        if ppo.estimator == "gae":
            # fp32 even over a bf16/4-bit policy: values are regression targets of a few units.
            self.value_head = nn.Linear(self.policy.config.hidden_size, 1, dtype=torch.float32)
            # Zero init: the first values are 0, so the first advantages are the plain returns.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # A plain attribute, not a submodule: the frozen reward model stays out of checkpoints and optimiser.
        self.rewards = Rewards.load(reward or RewardConfig(), reward_model_dir)
        self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        self.history: list[dict[str, float]] = []
        self.generation = generation or GenerationConfig()
        self.engine = None  # engines.VLLMEngine while a fit runs with backend vllm

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["engine"] = None  # a running engine's processes belong to this process
        if self.hparams.policy.quantization == "4bit" and "policy" in state["_modules"]:
            # bitsandbytes' 4-bit weights do not survive pickling, which is how ddp_spawn hands the module
            # to its workers: they arrive as plain Parameters whose quantisation state stays on the
            # parent's GPU. So the base is left out and each process builds its own (configure_model),
            # with the adapter and everything else that trains as they are here.
            modules = dict(state["_modules"])
            state["_policy_weights"] = trainable_weights(modules.pop("policy"))
            state["_modules"] = modules
        return state

    def release_quantized_base(self) -> None:
        """Before ddp_spawn starts its workers, a 4-bit module lets go of its base: each worker builds its
        own (configure_model) from the trainable weights kept here, so the parent's copy would only
        hold memory on the first GPU beside rank 0's own (5-6 GB for an 8B base) for the whole fit."""
        if self.hparams.policy.quantization != "4bit" or "policy" not in self._modules:
            return
        self._policy_weights = trainable_weights(self._modules.pop("policy"))
        release_cached_memory()

    def configure_model(self) -> None:
        weights = self.__dict__.pop("_policy_weights", None)
        if weights is None:  # built in __init__, in this process
            return
        # Rebuilt in this (worker) process: the base in nf4 on this process's device, the trainable
        # weights as the parent had them.
        self.policy = load_policy(self.hparams.policy)
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        missing = set(weights) - {n for n, p in self.policy.named_parameters() if p.requires_grad}
        assert not missing, f"rebuilt policy lacks {sorted(missing)[:3]}"
        self.policy.load_state_dict(weights, strict=False)

    def on_fit_start(self) -> None:
        self.rewards.to(self.device)
        if self.generation.backend == "vllm" and self.engine is None:
            from rlhf_lightning.models.engines import VLLMEngine

            # The base as published (the engine loads it in its own dtype, unquantised under 4-bit: the
            # rollouts then come from the full-precision base + adapter, the log-probs PPO trains on from
            # the nf4 one the trainer holds).
            # One engine per training process, on that process's device (with several, each samples its
            # own share of the prompts with the adapter DDP keeps equal on every rank: `check_adapter`).
            self.engine = VLLMEngine(resolve_model(self.hparams.policy.model), self.generation,
                                     lora_rank=self.hparams.policy.lora.r, seed=self.ppo.seed + self.global_rank,
                                     device=self.device, local_rank=self.local_rank,
                                     local_ranks=self.trainer.num_devices)

    def on_fit_end(self) -> None:
        self.close_engine()

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]  # LoRA (+ value head)
        return torch.optim.AdamW(trainable, lr=self.ppo.learning_rate)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logp, values, logits) of the response tokens: (B, R), (B, R) or None without a value head, (B, R, V)."""
        logits, hidden = response_forward(self.policy, prompt_ids, prompt_mask, response_ids, response_mask,
                                          self.ppo.temperature)  # (B, R, V), (B, R, H)
        values = None if self.value_head is None else fp32_values(self.value_head, hidden)  # (B, R)
        return token_logprobs(logits, response_ids), values, logits

    # -- phase 1 ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, chat_prompts: list[str], seed: int | None = None) -> Sampled:
        """One response per entry of `chat_prompts` (which repeats each prompt samples_per_prompt times)."""
        self.policy.eval()  # no dropout while sampling: rollout and update must see the same policy
        # Outside autocast (bf16-mixed): decoding runs one token at a time, where casting every weight to
        # bf16 at every step costs more than it saves (benchmarks/generation.py on 2 CPU cores with AMX:
        # 109 response tokens/s in fp32, 99 under bf16 autocast, batch 16). The log-probs PPO uses come
        # from phase 2's forward, under the trainer's precision.
        if self.engine is not None:
            # The adapter as it is now, after the last update (or as a checkpoint restored it), under a
            # new id every time: what the engine samples is the policy being trained.
            self.engine.sync(self.policy)
            return self.engine.sample(self.tokenizer, chat_prompts, max_new_tokens=self.ppo.max_new_tokens,
                                      temperature=self.ppo.temperature, seed=seed,
                                      stop_ids=stop_token_ids(self.policy, self.tokenizer), device=self.device)
        with torch.autocast(self.device.type, enabled=False):
            return sample(self.policy, self.tokenizer, chat_prompts, max_new_tokens=self.ppo.max_new_tokens,
                          temperature=self.ppo.temperature, seed=seed)

    # -- phase 2 ---------------------------------------------------------------------------------------
    def shares_forward(self, rows: int) -> bool:
        """Whether phase 2's policy forward can also be the first update's: one minibatch holds the whole
        rollout of `rows` rows, so that the first update step sees exactly the rollout's policy, and no
        dropout makes a training forward differ from the one the old log-probs come from."""
        dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.policy.modules())
        dropout |= bool(getattr(self.policy.config, "attention_dropout", 0.0))  # functional, in Llama-like models
        return self.ppo.minibatch_size >= rows and not dropout

    @torch.no_grad()
    def score_and_kl(self, rows: list[dict], sampled: Sampled, keep_graph: bool = False) -> Scored:
        """`keep_graph` (only where `shares_forward`): the policy's forward keeps its autograd graph in
        `Scored.graph`, and the first update step backpropagates through it instead of running the same
        forward again (on the benchmark workload, one update epoch of one minibatch, the update phase's time
        fell from 25 to 15 s of an 89 s fit).
        `rows`: the prompt row of each response ({prompt, extra, source}: what the reward functions read)."""
        ended = ended_with_eos(sampled, stop_token_ids(self.policy, self.tokenizer))  # (B,)
        terms = self.rewards.score([r["prompt"] for r in rows], sampled.texts, rows)  # {term: (B,)}
        reward = self.rewards.total(terms).to(self.device)  # (B,)
        score = missing_eos_penalty(reward, ended, self.ppo.missing_eos_penalty)  # (B,)
        # In minibatch-sized chunks: the (rows, R, V) logits of a whole k-sample rollout would not fit
        # comfortably in memory with a 49152-token vocabulary.
        logp, ref_logp, values, entropy = [], [], [], []
        graph = None
        for chunk in torch.arange(len(rows), device=self.device).split(self.ppo.minibatch_size):
            inputs = (sampled.prompt_ids[chunk], sampled.prompt_mask[chunk], sampled.response_ids[chunk],
                      sampled.response_mask[chunk])
            if keep_graph:  # one chunk: the whole rollout (shares_forward)
                self.policy.train()  # as phase 4 runs it; without dropout the same numbers as eval mode
                with torch.enable_grad():
                    lp, v, logits = self(*inputs)  # (B, R), (B, R) | None, (B, R, V)
                graph = (lp, v)
                lp, v, logits = lp.detach(), None if v is None else v.detach(), logits.detach()
            else:
                lp, v, logits = self(*inputs)  # (b, R), (b, R) | None, (b, R, V)
            logp.append(lp)
            values.append(v)
            entropy.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))  # (b, R)
            with self.policy.disable_adapter():
                ref_logp.append(self(*inputs)[0])  # (b, R)
        values_all = None if self.value_head is None else torch.cat(values)  # (B, R)
        logp_all, ref_all = torch.cat(logp), torch.cat(ref_logp)  # (B, R) each
        return Scored(terms, reward, score, ended, logp_all, ref_all, per_token_kl(logp_all, ref_all), values_all,
                      torch.cat(entropy), graph)

    # -- phase 3 ---------------------------------------------------------------------------------------
    def advantages(self, scored: Scored, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages, returns or None), (B, R) each, by the configured estimator at the current kl_coef."""
        kl_coef = self.kl_ctl.value
        if self.ppo.estimator == "gae":
            rewards = kl_penalised_rewards(scored.score, scored.kl, mask, kl_coef)  # (B, R)
            advantages, returns = gae(rewards, scored.values, mask, self.ppo.gamma, self.ppo.lam)  # (B, R) x 2
            # Whitening: the policy step size no longer depends on the reward scale or its drift.
            return masked_whiten(advantages, mask), returns
        seq = sequence_rewards(scored.score, scored.kl, mask, kl_coef)  # (B,)
        k = self.ppo.samples_per_prompt
        per_seq = rloo_advantages(seq, k) if self.ppo.estimator == "rloo" else group_normalised_advantages(seq, k)
        return per_seq.unsqueeze(1) * mask, None  # every token of a response shares its advantage: (B, R)

    # -- phase 4 ---------------------------------------------------------------------------------------
    def ppo_epochs(self, exp: Experience, first: tuple[torch.Tensor, torch.Tensor | None] | None = None
                   ) -> dict[str, float]:
        """Clipped PPO updates over minibatches of the rollout; returns the mean losses and fractions,
        the number of optimiser steps taken and whether the approximate-KL bound stopped the iteration.
        `first`: phase 2's (logp, values) with their graph (`Scored.graph`), used by the first step."""
        opt = self.optimizers()
        self.policy.train()
        totals: dict[str, list[float]] = defaultdict(list)
        steps, stopped = 0, False
        for _ in range(self.ppo.ppo_epochs):
            for rows in torch.randperm(exp.logp.shape[0], device=self.device).split(self.ppo.minibatch_size):
                mb = exp[rows]
                if first is not None:  # the policy has not moved since phase 2's forward of every row
                    logp, values = first[0][rows], None if first[1] is None else first[1][rows]
                    first = None
                else:
                    logp, values, _ = self(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
                pg_loss, clip_fraction, approx_kl = ppo_policy_loss(
                    logp, mb.logp, mb.advantages, mb.response_mask, self.ppo.clip_range)
                # Measured before this minibatch's step: past the bound, the ratio clip no longer keeps the
                # policy near the one that sampled the rollout, so the remaining updates are skipped.
                # Under DDP every process decides on the largest value, so all stop together (a process
                # that went on alone would wait forever in the gradient all-reduce).
                if _max_over_processes(approx_kl) > self.ppo.max_approx_kl:
                    stopped = True
                    break
                loss = pg_loss
                stats = {"policy_loss": pg_loss, "clip_fraction": clip_fraction, "approx_kl": approx_kl}
                if values is not None:
                    vf_loss, vf_clip_fraction = value_loss(
                        values, mb.values, mb.returns, mb.response_mask, self.ppo.clip_range_value)
                    loss = loss + self.ppo.vf_coef * vf_loss
                    stats |= {"value_loss": vf_loss, "value_clip_fraction": vf_clip_fraction}
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()  # clipped in on_before_optimizer_step, once the gradients are unscaled
                steps += 1
                for name, value in stats.items():
                    totals[name].append(value.item())
            if stopped:
                break
        return {**{name: fmean(v) for name, v in totals.items()}, "updates": float(steps),
                "early_stop": float(stopped)}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The precision plugin calls this inside `opt.step()`, after 16-mixed's GradScaler unscaled the
        # gradients and before the step: clipped any earlier, the norm would be that of the scaled
        # gradients (x65 536 at first), the clip would always fire, and every update would shrink to noise.
        self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")

    def check_adapter(self, batch_idx: int) -> None:
        """Every process must sample from the same policy: DDP's all-reduce keeps the trainable weights
        equal on every rank, and this proves it before each rollout, at the cost of one small gather.
        Each rank sends one checksum per trainable tensor; a rank whose adapter differs (a hand-over, a
        resume or a precision path gone wrong) stops the fit on every rank together, naming the rank
        and the tensor, instead of training on silently diverging policies."""
        if self.trainer.world_size <= 1:
            return
        names, sums = zip(*((n, weight_checksum(p)) for n, p in self.named_parameters() if p.requires_grad))
        gathered = self.all_gather(torch.stack(sums))  # (world, T) int64
        differ = (gathered != gathered[0]).nonzero().tolist()
        if differ:
            rank, tensor = differ[0]
            raise RuntimeError(f"PPO iteration {batch_idx}: rank {rank}'s trainable weights differ from rank 0's "
                               f"({len(differ)} tensor(s), first {names[tensor]}): the processes would sample and "
                               "train different policies")

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        k = self.ppo.samples_per_prompt
        rows = [{"prompt": p, "extra": e, "source": s} for p, e, s in zip(batch["prompt"], batch["extra"], batch["source"])
                for _ in range(k)]  # (B,) consecutive groups of k
        chats = [c for c in batch["prompt_chat"] for _ in range(k)]
        self.check_adapter(batch_idx)
        # Seeded per iteration, not by the global stream: a run repeats on CPU even if something
        # else (a callback, the prompt sampler) draws random numbers in between. Each process draws its
        # own samples (rank 0's seeds are a one-process run's), also where two got the same prompt.
        seed = self.ppo.seed * 1_000_003 + batch_idx + 100_003 * self.global_rank
        sampled = self.rollout(chats, seed=seed)
        if self.engine is not None:
            self.engine.sleep()  # its GPU memory back to training until the next rollout (GPU only)
        scored = self.score_and_kl(rows, sampled, keep_graph=self.shares_forward(len(chats)))
        mask = sampled.response_mask  # (B, R)
        advantages, returns = self.advantages(scored, mask)
        kl_coef = self.kl_ctl.value  # the coefficient this rollout was penalised with
        exp = Experience(sampled.prompt_ids, sampled.prompt_mask, sampled.response_ids, mask, scored.logp,
                         advantages, scored.values, returns)
        losses = self.ppo_epochs(exp, first=scored.graph)
        scored.graph = None  # the first step consumed it (or the iteration stopped before it)
        seq_kls = (scored.kl * mask).sum(1)  # (B,) per sequence
        seq_kl = seq_kls.mean().item()  # this process's, for the statistics (averaged below)
        # Every process moves kl_coef by the KL of all processes' rollouts: from its own, each would
        # drift its own way, and a checkpoint would keep only rank 0's. n_steps stays one process's rows
        # (see PPOConfig.kl_horizon).
        pooled_kl, rows = pooled_sequence_kl(seq_kls, lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        self.kl_ctl.update(pooled_kl, n_steps=rows)

        stats = {
            "reward": scored.reward.mean().item(),  # the weighted total; then each term as it came
            **{f"reward/{term}": values.mean().item() for term, values in scored.terms.items()},
            **({"reward/model_normalised": self.rewards.scorer.normalise(scored.terms[MODEL_TERM]).mean().item()}
               if MODEL_TERM in scored.terms else {}),
            "score": scored.score.mean().item(),
            "kl": seq_kl,
            "kl_per_token": masked_mean(scored.kl, mask).item(),
            "kl_coef": kl_coef,
            "entropy": masked_mean(scored.entropy, mask).item(),
            "response_length": mask.sum(1).float().mean().item(),
            "eos_rate": scored.ended.float().mean().item(),
            **losses,
        }
        if self.gold_judge:  # monitoring only: the over-optimisation curve's ground truth
            stats["gold_score"] = fmean(judge.gold_scores(sampled.texts))
        if self.trainer.world_size > 1:  # each process rolled out its own prompts: report them all
            gathered = self.all_gather(torch.tensor(list(stats.values()), device=self.device))  # (world, K)
            stats = dict(zip(stats, gathered.float().mean(0).tolist()))
        stats = {f"ppo/{k}": v for k, v in stats.items()}
        self.history.append({"iteration": batch_idx, **stats})
        on_bar = {"ppo/reward", "ppo/kl"}
        for keys, prog_bar in ((on_bar, True), (stats.keys() - on_bar, False)):
            self.log_dict({k: stats[k] for k in keys}, on_step=True, on_epoch=False, prog_bar=prog_bar,
                          batch_size=mask.shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only LoRA + value head: the frozen base is re-loaded from its reference, and 4-bit base
        # weights (absmax, quant_map) would not load back anyway. Lightning adds the optimiser state,
        # the loops' progress (the iteration) and the prompt loader's position.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["kl_coef"] = self.kl_ctl.value
        checkpoint["ppo_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_ctl.value = checkpoint.get("kl_coef", self.kl_ctl.value)
        self.history = list(checkpoint.get("ppo_history", []))

    def on_train_start(self) -> None:
        # Resumed from a checkpoint: the metrics of the iterations it holds go to this attempt's loggers
        # first, at their own steps, so the stage's metric history reads 0..N-1 once each (the killed
        # attempt may have logged iterations after its last checkpoint, which this one redoes).
        for entry in self.history:
            metrics = {k: v for k, v in entry.items() if k != "iteration"}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=entry["iteration"])


def fp32_values(value_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The value head on the policy's last hidden states, computed in fp32 also under bf16/16-mixed
    autocast (which would cast an nn.Linear's input and weight back to half precision): values are
    regression targets of a few units whose GAE differences and value loss half precision would round."""
    # hidden: (B, R, H) -> (B, R) float32
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return value_head(hidden.float()).squeeze(-1)


def weight_checksum(weight: torch.Tensor) -> torch.Tensor:
    """An int64 checksum of a tensor's exact bits, computed where it lives: the bit patterns weighted by
    position (a swap of two values changes it), summed with int64's wrap-around. Equal tensors give equal
    checksums; a one-ulp difference anywhere changes it."""
    flat = weight.detach().contiguous().flatten()
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    position = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 1_000_003 + 1
    return (bits.to(torch.int64) * position).sum()


def _max_over_processes(value: torch.Tensor) -> float:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def collate_prompts(rows: list[dict]) -> dict[str, list]:
    """`prompt_chat` (template applied) goes to the policy, the raw `prompt` to the reward terms with the
    row's `extra` columns (reward functions) and `source` (what a failing function's error names)."""
    return {"prompt": [row["prompt"] for row in rows], "prompt_chat": [row["prompt_chat"] for row in rows],
            "extra": [row.get("extra") or {} for row in rows], "source": [row.get("source", "") for row in rows]}


def prompt_loader(rows: list[dict], ppo: PPOConfig) -> ResumableLoader:
    """Exactly `iterations` batches of `rollout_batch_size` prompts per process, each prompt once per pass
    before any repeats, resumable from a checkpoint. The loader shards the prompts over processes
    itself (Lightning's DistributedSampler would drop `iterations`)."""
    sampler = SeededOrder(len(rows), ppo.iterations * ppo.rollout_batch_size, ppo.seed)
    return ResumableLoader(rows, sampler, batch_size=ppo.rollout_batch_size, collate_fn=collate_prompts)


@dataclass
class PPOResult:
    adapter_dir: str
    """peft adapter directory (`save_pretrained`), with the value head (gae) in value_head.pt."""
    metrics: dict[str, float]
    """The last iteration's statistics."""
    history: list[dict[str, float]]
    """Statistics of every iteration (plus the held-out monitor's, when it ran that iteration)."""


def fit_ppo(module: PPOModule, cfg: RLHFConfig, rl_prompts: list[dict], out_dir: str, logger=None,
            callbacks: list[Callback] | None = None, ckpt_path: str | None = None) -> PPOResult | None:
    """Run PPO on an existing module and save the adapter (+ value head) in out_dir/adapter (None on a
    node other than node 0 of a run over several: `hardware.node_world`). `callbacks`
    may include a checkpoint callback (checkpoints.PeriodicCheckpoint); `ckpt_path` resumes from one of
    its checkpoints: weights, optimiser, KL controller, iteration, prompt order, RNG and history."""
    if not rl_prompts:
        raise ValueError("PPO: no RL prompts")
    out = Path(out_dir)
    history_file = out / HISTORY_FILE
    history_file.unlink(missing_ok=True)
    adapter_dir = out / "adapter"
    trainer = build_trainer(cfg.trainer, "ppo", max_epochs=1, logger=logger if logger is not None else False,
                            log_every_n_steps=1,
                            callbacks=[*(callbacks or []), _SaveResults(history_file, adapter_dir)],
                            default_root_dir=out, use_distributed_sampler=False)
    if getattr(trainer.strategy.launcher, "_start_method", None) == "spawn":
        module.release_quantized_base()
    # Our own checkpoints: they hold the config dataclasses as hyperparameters.
    trainer.fit(module, prompt_loader(rl_prompts, cfg.ppo), ckpt_path=ckpt_path, weights_only=False)

    if trainer.node_rank != 0:  # another machine's processes trained beside node 0's, which has the results
        return None
    # Under ddp_spawn training ran in worker processes: Lightning moves the weights back into `module`
    # (those it still holds: a 4-bit module released its base), not what the module collected, so the
    # history and the adapter come back through rank 0's files.
    history = json.loads(history_file.read_text())
    return PPOResult(str(adapter_dir), dict(history[-1]), history)


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (the adapter), on the CPU, by name."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


class _SaveResults(Callback):
    """Rank 0 writes the module's per-iteration history to `history` and the adapter (+ value head) to
    `adapter_dir` when training ends, in the process that trained (one process, or ddp_spawn's rank 0)."""

    def __init__(self, history: Path, adapter_dir: Path):
        self.history, self.adapter_dir = history, adapter_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: PPOModule) -> None:
        if trainer.is_global_zero:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.history.write_text(json.dumps(pl_module.history))
            pl_module.policy.save_pretrained(self.adapter_dir)
            if pl_module.value_head is not None:
                torch.save(pl_module.value_head.state_dict(), self.adapter_dir / VALUE_HEAD_FILE)


def train_ppo(cfg: RLHFConfig, rl_prompts: list[dict], reward_model_dir: str | None, out_dir: str, logger=None,
              gold_judge: bool = False, callbacks: list[Callback] | None = None,
              ckpt_path: str | None = None) -> PPOResult | None:
    """PPO from a fresh adapter against the reward model in `reward_model_dir` (`RewardScorer.load`) and
    the reward functions, as `cfg.reward` weighs them;
    `logger` is a Lightning logger (e.g. MLFlowLogger) or None;
    `gold_judge` logs the built-in task's gold score of the rollouts (monitoring only); `callbacks`
    e.g. monitor.HeldoutMonitor or a checkpoint callback; `ckpt_path`: resume from that checkpoint."""
    L.seed_everything(cfg.ppo.seed)
    module = PPOModule(cfg.policy, cfg.ppo, reward_model_dir, gold_judge, cfg.trainer.gradient_checkpointing,
                       cfg.generation, cfg.reward)
    try:
        return fit_ppo(module, cfg, rl_prompts, out_dir, logger, callbacks, ckpt_path)
    finally:
        module.close_engine()  # also when the fit stopped on an error
