"""Log-probabilities of response tokens under a causal LM, with the inputs `generate` saw.

Shared by PPO (rollout log-probs, the update's ratio, values from the last hidden state) and the
evaluation (KL of the policy to its reference on the same tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel

from rlhf_lightning.models.generation import Sampled, is_stop
from rlhf_lightning.models.losses import last_token_index


def response_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits / temperature, last hidden state) at the positions that predict the response tokens,
    with the same inputs `generate` saw. Only R+1 positions go through the LM head."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+R)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)  # (B, P+R)
    # Left padding: positions count real tokens only, as `generate` does. Models with absolute
    # position embeddings (GPT-2) would otherwise see short prompts shifted by their padding; RoPE
    # is invariant to the shift only up to rounding.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+R)
    R = response_ids.shape[1]
    # The decoder stack and the LM head called apart: the head runs on R positions only, and the last
    # hidden state (the value head's input) comes without keeping every layer's states, as
    # `output_hidden_states` would (which also came back None in ddp_spawn workers). The LoRA layers
    # live inside the decoder, so `disable_adapter()` still gives the reference. Models whose
    # causal-LM wrapper rescales logits (softcapping, logit_scale) would need that applied here.
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state  # (B, P+R, H) after the final norm
    # The state at position t predicts token t+1: positions P-1 .. P+R-2 score the R response tokens.
    hidden = hidden[:, -R - 1 : -1]  # (B, R, H)
    # Dividing by the temperature matches the sampling distribution.
    logits = base.get_output_embeddings()(hidden).float() / temperature  # (B, R, V)
    return logits, hidden


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position."""
    # logits: (B, R, V), token_ids: (B, R)
    return logits.log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)


def sequence_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                      response_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens under `model` at sampling temperature `temperature`: (B, R).
    Used by evaluation for KL(policy || reference) on the same tokens PPO sees."""
    logits, _ = response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature)
    return token_logprobs(logits, response_ids)


def ended_with_eos(sampled: Sampled, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """(B,) bool: the last real response token is an end token (any of `eos_token_id`; else
    max_new_tokens cut the response off)."""
    rows = torch.arange(sampled.response_ids.shape[0], device=sampled.response_ids.device)
    return is_stop(sampled.response_ids[rows, last_token_index(sampled.response_mask)], eos_token_id)
