"""Sampling: the inverse-CDF sampler draws from softmax(logits / T); batches are cut by prompt length."""

from __future__ import annotations

import torch

from rlhf_lightning.config import PolicyConfig
from rlhf_lightning.models.generation import InverseCdfSampler, length_sorted_batches, sample_texts
from rlhf_lightning.models.loading import load_base_causal_lm, load_tokenizer


def test_inverse_cdf_sampler_draws_from_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2  # a peaked distribution: the largest probability is ~0.9 at T 0.7
    logits[0, 7] = float("-inf")  # a token that must never be drawn
    n = 100_000
    scores = InverseCdfSampler(0.7)(None, logits.expand(n, -1).clone())  # (n, V)
    assert ((scores == 0).sum(-1) == 1).all() and torch.isinf(scores).sum() == n * 39  # one finite entry a row
    freq = torch.bincount(scores.argmax(-1), minlength=40).float() / n
    expected = torch.softmax(logits[0] / 0.7, -1)
    # Binomial standard error is at most sqrt(0.25 / n) = 0.0016: 4 of them.
    assert (freq - expected).abs().max() < 0.0065
    assert freq[7] == 0
    # A different temperature is a different distribution: the check above is not vacuous.
    assert (expected - torch.softmax(logits[0], -1)).abs().max() > 0.02


def test_inverse_cdf_sampler_is_seeded_by_torch():
    logits = torch.randn(8, 30)
    torch.manual_seed(3)
    a = InverseCdfSampler(1.0)(None, logits.clone()).argmax(-1)
    torch.manual_seed(3)
    b = InverseCdfSampler(1.0)(None, logits.clone()).argmax(-1)
    assert torch.equal(a, b)


def test_batches_are_cut_by_length_and_answers_keep_the_prompts_order():
    tok = load_tokenizer("tiny:llama")
    texts = ["a cafe " * k for k in (9, 1, 5, 2, 8, 3, 7)]
    batches = length_sorted_batches(tok, texts, 3)
    assert [i for i, _ in batches] == [0, 3, 6]
    assert [rows for _, rows in batches] == [[1, 3, 5], [2, 6, 4], [0]]
    model = load_base_causal_lm(PolicyConfig(model="tiny:llama")).eval()
    # Greedy answers depend on the prompt only: sorted batches must put each answer back at its prompt.
    one = [sample_texts(model, tok, [t], max_new_tokens=4, temperature=0.0, batch_size=1, seed=0)[0] for t in texts]
    assert sample_texts(model, tok, texts, max_new_tokens=4, temperature=0.0, batch_size=3, seed=0) == one


def _always(model, token: int) -> None:
    """Make the LM head emit `token` at every step (zero weights, a one-hot bias)."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token] = 10.0
    model.set_output_embeddings(head)


def test_end_tokens_read_from_the_files_are_the_loaded_models_even_without_a_generation_config(tmp_path):
    """A vLLM engine's stop tokens come from the model's files (its weights are never loaded in the
    step): with no generation_config.json they are the ones transformers derives from config.json."""
    import json
    import shutil

    from rlhf_lightning.models.loading import resolve_model, stop_token_ids, stop_token_ids_from_files

    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model("tiny:llama"), model_dir)
    tok = load_tokenizer(str(model_dir))
    (model_dir / "generation_config.json").unlink()
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, 7]  # as Llama 3 lists its end tokens in config.json
    (model_dir / "config.json").write_text(json.dumps(config))
    model = load_base_causal_lm(PolicyConfig(model=str(model_dir)))
    assert stop_token_ids_from_files(str(model_dir), tok) == stop_token_ids(model, tok) == sorted({tok.eos_token_id, 7})


def test_every_stop_token_of_the_model_ends_a_response():
    """Models list several end tokens in generation_config (Gemma's <end_of_turn> beside the tokenizer's
    <eos>, Llama 3's <|eot_id|>): sampling, the response mask and the EOS statistic stop at any of them."""
    from rlhf_lightning.models.generation import sample
    from rlhf_lightning.models.loading import stop_token_ids
    from rlhf_lightning.models.logprobs import ended_with_eos

    tok = load_tokenizer("tiny:llama")
    model = load_base_causal_lm(PolicyConfig(model="tiny:llama")).eval()
    end_of_turn = tok.convert_tokens_to_ids("a")  # any ordinary token, made an end token by the config
    _always(model, end_of_turn)
    chats = [tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)]
    model.generation_config.eos_token_id = tok.eos_token_id  # the tokenizer's eos only: runs to the limit
    s = sample(model, tok, chats, max_new_tokens=4, temperature=0.0)
    assert s.response_mask.tolist() == [[1, 1, 1, 1]] and not ended_with_eos(s, stop_token_ids(model, tok))[0]
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]  # as Gemma/Llama 3 ship it
    assert stop_token_ids(model, tok) == sorted({tok.eos_token_id, end_of_turn})
    s = sample(model, tok, chats, max_new_tokens=4, temperature=0.0)
    assert s.response_ids.tolist() == [[end_of_turn]] and s.response_mask.tolist() == [[1]]  # generate stopped
    assert ended_with_eos(s, stop_token_ids(model, tok)).tolist() == [True] and s.texts == [""]
    # A pad token that is an end token (SmolLM2, Llama 3 with pad = eos) never cuts a response short:
    # the first end token stays inside the mask.
    tok.pad_token = "a"
    s = sample(model, tok, chats, max_new_tokens=4, temperature=0.0)
    assert s.response_mask.tolist() == [[1]] and ended_with_eos(s, stop_token_ids(model, tok)).tolist() == [True]
