"""Batched sampling from a causal LM, shared by data generation, PPO rollouts and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_lightning.models.progress import progress


def chat_prompt(tokenizer, user_text: str) -> str:
    """The user's message wrapped in the model's chat template, ready for generation."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )


@dataclass
class Sampled:
    """One batch of generations. Prompts are left-padded, responses right-padded."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded with pad after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    texts: list[str]  # decoded responses without special tokens


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it.

    Built from positions, not from `ids != pad`: SmolLM2's pad token *is* its EOS token, so a pad
    comparison would hide every real end token."""
    is_eos = (response_ids == eos_token_id).long()  # (B, R)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


@torch.no_grad()
def sample(model, tokenizer, chat_prompts: list[str], *, max_new_tokens: int, temperature: float,
           seed: int | None = None) -> Sampled:
    """Sample one response per prompt (temperature 0 = greedy)."""
    assert tokenizer.padding_side == "left", "batched generation of decoder models needs left padding"
    enc = tokenizer(chat_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
    )
    response = out[:, enc["input_ids"].shape[1]:]
    mask = response_mask_from_ids(response, tokenizer.eos_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Sampled(enc["input_ids"], enc["attention_mask"], response, mask, [t.strip() for t in texts])


def sample_texts(model, tokenizer, chat_prompts: list[str], *, max_new_tokens: int, temperature: float,
                 batch_size: int, seed: int, desc: str = "generate") -> list[str]:
    """Responses for many prompts, in batches, with a progress bar; seeded per batch so that two
    models given the same seed see the same random stream."""
    out: list[str] = []
    for i in progress(range(0, len(chat_prompts), batch_size), desc=desc, unit="batch"):
        batch = chat_prompts[i : i + batch_size]
        out.extend(sample(model, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed + i).texts)
    return out
