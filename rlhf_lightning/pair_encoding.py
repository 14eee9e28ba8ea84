"""Encoding (prompt, response) text pairs for a reward model: what the reward model trained here reads.

Self-contained (torch and tokenizers only, no `rlhf_lightning` import): the registered reward model
(serving/reward_pyfunc.py) ships this file beside it, so that it scores exactly as training measured it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer


class PairEncoder:
    """(prompt, response) texts -> padded model inputs of at most `max_length` tokens.

    The response is encoded first and keeps its head if it alone is too long; the prompt keeps its *tail*
    in the room that is left. Then the tokenizer's own pair template adds its special tokens
    ([CLS] p [SEP] r [SEP] and token types for BERT). Responses are prefixed with a newline: decoder
    tokenizers have no pair template and would glue the two texts together; WordPiece drops it."""

    def __init__(self, tokenizer, max_length: int, pad_to_multiple_of: int = 1,
                 separator: str = "\n"):
        """`tokenizer`: a transformers fast tokenizer. `separator`: put before each response (a published pair model, trained on the tokenizer's own
        pair encoding, gets "")."""
        self.separator = separator
        # A private copy of the Rust tokenizer with truncation and padding off: we cut by hand.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        self.pad_id = tokenizer.pad_token_id
        self.max_length, self.multiple = max_length, pad_to_multiple_of
        self.with_token_types = "token_type_ids" in tokenizer.model_input_names

    def __call__(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encodings = []
        for p, r in zip(self.backend.encode_batch(prompts, add_special_tokens=False),
                        self.backend.encode_batch([self.separator + text for text in responses],
                                                  add_special_tokens=False)):
            r.truncate(self.room, direction="right")
            p.truncate(self.room - len(r.ids), direction="left")
            encodings.append(self.backend.post_process(p, r, add_special_tokens=True))
        longest = max(len(e.ids) for e in encodings)
        # Rounded up to `pad_to_multiple_of` (fewer distinct widths: see reward_model.TRAIN_PAD_MULTIPLE),
        # never past max_length (unless one row already is).
        width = min(-(-longest // self.multiple) * self.multiple, max(longest, self.max_length))

        def padded(rows: list[list[int]], value: int) -> torch.Tensor:  # right padding -> (B, T)
            return torch.tensor([row + [value] * (width - len(row)) for row in rows])

        batch = {
            "input_ids": padded([e.ids for e in encodings], self.pad_id),  # (B, T)
            "attention_mask": padded([[1] * len(e.ids) for e in encodings], 0),  # (B, T)
        }
        if self.with_token_types:
            batch["token_type_ids"] = padded([e.type_ids for e in encodings], 0)  # (B, T)
        return batch
