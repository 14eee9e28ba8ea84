"""Evaluation: win rates, distinct-n and the promotion decision by hand; the tiny policy compared with
its reference and with a champion on the same seeds; the held-out monitor and the over-optimisation plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
import torch

from rlhf_lightning import stats
from rlhf_lightning.evaluation import compare as evaluation
from rlhf_lightning.evaluation import gates
from rlhf_lightning.evaluation import plots
from rlhf_lightning.config import from_dict
from rlhf_lightning.models.generation import chat_prompt
from rlhf_lightning.models.loading import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["Write a one-sentence review of a small cafe.", "Describe a museum to a friend in one sentence.",
           "Give a short opinion about a busy bakery in Lisbon."]


def test_win_rate_counts_ties_half():
    # wins 1, 0, 0.5, 1 -> 0.625; half-width 1.96 * sqrt(0.625 * 0.375 / 4) = 0.4744...
    p, ci = stats.win_rate([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0])
    assert p == 0.625
    assert ci == pytest.approx(1.96 * math.sqrt(0.625 * 0.375 / 4))
    with pytest.raises(ValueError):
        stats.win_rate([], [])


def test_win_rate_interval_accounts_for_samples_of_one_prompt():
    """Pairs grouped by prompt: wins 1,1 | 0,0 | 1,0 -> p 0.5; cluster totals (2-1, 0-1, 1-1) = (1, -1, 0);
    variance 3/2 * (1 + 1 + 0) / 6^2 = 1/12; half-width 1.96 * sqrt(1/12) = 0.5658, wider than the
    0.4001 of six independent pairs, because two prompts won or lost both their samples."""
    a, b = [1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 1]
    p, ci = stats.win_rate(a, b, groups=["x", "x", "y", "y", "z", "z"])
    assert p == 0.5 and ci == pytest.approx(1.96 * math.sqrt(1 / 12))
    assert stats.win_rate(a, b)[1] == pytest.approx(1.96 * math.sqrt(0.25 / 6))
    # One sample per prompt: the cluster formula is the independent one with a k/(k-1) factor.
    _, ci1 = stats.win_rate(a, b, groups=list(range(6)))
    assert ci1 == pytest.approx(1.96 * math.sqrt(6 / 5 * 0.25 / 6))
    with pytest.raises(ValueError, match="one group per pair"):
        stats.win_rate(a, b, groups=["x"])


def test_distinct_n_by_hand():
    texts = ["the cafe was great", "The cafe was bad"]
    # unigrams: the, cafe, was, great, the, cafe, was, bad -> 5 distinct of 8
    assert stats.distinct_n(texts, 1) == 5 / 8
    # bigrams: (the cafe) (cafe was) (was great) (the cafe) (cafe was) (was bad) -> 4 of 6
    assert stats.distinct_n(texts, 2) == 4 / 6
    assert stats.distinct_n(["hi"], 2) == 0.0


def test_mean_difference_by_hand():
    # differences 1, 3, 2 -> mean 2, sample variance ((1-2)^2 + (3-2)^2 + 0) / 2 = 1, half-width 1.96 / sqrt(3)
    mean, ci = stats.mean_difference([2.0, 4.0, 2.0], [1.0, 1.0, 0.0])
    assert mean == 2.0 and ci == pytest.approx(1.96 / math.sqrt(3))
    assert math.isnan(stats.mean_difference([1.0], [0.0])[1])
    with pytest.raises(ValueError, match="paired difference"):
        stats.mean_difference([1.0], [])


def test_served_agreement_by_hand():
    # identical answers: 1 of 2; served - evaluated rewards: -1, -3 -> mean -2, sd sqrt(2), in rm std 2: -1
    m = evaluation.served_agreement(["a", "b"], ["a", "c"], [1.0, 4.0], [0.0, 1.0], rm_std=2.0)
    assert m["served_greedy_match"] == 0.5 and m["served_n"] == 2
    assert m["served_rm_score"] == 0.5 and m["evaluated_greedy_rm_score"] == 2.5
    assert m["served_rm_gap"] == -1.0
    assert m["served_rm_gap_ci95"] == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2) / 2.0)


def metrics(gold_wr=0.7, rm_wr=0.9, champion_gold_wr=None):
    m = {"eval/gold_win_rate": gold_wr, "eval/gold_win_rate_ci95": 0.05, "eval/rm_win_rate": rm_wr,
         "eval/rm_win_rate_ci95": 0.04, "eval/n": 256.0, "eval/kl": 2.5}
    if champion_gold_wr is not None:
        m |= {"eval/champion_gold_win_rate": champion_gold_wr, "eval/champion_gold_win_rate_ci95": 0.06}
    return m


def test_promotion_needs_the_margin_against_the_reference():
    ok = gates.promotion_decision(metrics(gold_wr=0.56), margin=0.05, judge="gold")
    assert ok.promote and ok.judge == "gold"
    assert "vs reference 0.560 ± 0.050 > 0.550" in ok.reason and "promote to champion" in ok.reason
    no = gates.promotion_decision(metrics(gold_wr=0.55), margin=0.05, judge="gold")
    assert not no.promote and "<= 0.550" in no.reason and "stays candidate" in no.reason
    m = metrics(gold_wr=0.562) | {"eval/gold_win_rate_ci95": 0.084, "eval/n": 24.0}  # past the margin by luck
    lucky = gates.promotion_decision(m, margin=0.05, judge="gold")
    assert not lucky.promote and "0.562 ± 0.084 > 0.550 but its 95% interval reaches 0.5" in lucky.reason


def test_promotion_needs_the_margin_against_the_champion_too():
    d = gates.promotion_decision(metrics(gold_wr=0.8, champion_gold_wr=0.52), margin=0.05, judge="gold",
                                      champion="v3")
    assert not d.promote
    assert "vs reference 0.800" in d.reason and "vs champion v3 0.520 ± 0.060 <= 0.550" in d.reason
    d = gates.promotion_decision(metrics(gold_wr=0.8, champion_gold_wr=0.6), margin=0.05, judge="gold",
                                      champion="v3")
    assert d.promote


def test_a_served_model_that_answers_worse_than_the_evaluated_one_stays_candidate():
    """A 4-bit run: promoted on its win rates alone, held back when the served (full-precision, merged)
    answers score clearly lower than the evaluated (nf4) ones; a drop within its noise does not count."""
    worse = metrics() | {"eval/served_rm_gap": -0.8, "eval/served_rm_gap_ci95": 0.3}
    d = gates.promotion_decision(worse, margin=0.05, judge="gold", served_max_drop=0.5)
    assert not d.promote and "served vs evaluated reward -0.80 ± 0.30 std < -0.50" in d.reason
    assert gates.promotion_decision(worse, margin=0.05, judge="gold").promote  # no limit given: not read
    noisy = metrics() | {"eval/served_rm_gap": -0.8, "eval/served_rm_gap_ci95": 0.9}  # interval reaches 0
    assert gates.promotion_decision(noisy, margin=0.05, judge="gold", served_max_drop=0.5).promote
    close = metrics() | {"eval/served_rm_gap": -0.1, "eval/served_rm_gap_ci95": 0.05}
    d = gates.promotion_decision(close, margin=0.05, judge="gold", served_max_drop=0.5)
    assert d.promote and "served vs evaluated reward -0.10 ± 0.05 std (allowed down to -0.50)" in d.reason


def test_without_a_gold_judge_the_reward_model_decides():
    d = gates.promotion_decision(metrics(gold_wr=0.0, rm_wr=0.9), margin=0.05, judge="rm")
    assert d.promote and d.judge == "rm" and d.reason.startswith("rm win rate")


def test_reward_model_gate_raises_with_what_to_try():
    gates.check_reward_model({"eval_accuracy": 0.6}, 0.6, n_pairs=40)  # passes at the threshold
    with pytest.raises(gates.GateError) as err:
        gates.check_reward_model({"eval_accuracy": 0.52}, 0.6, n_pairs=40)
    message = str(err.value)
    assert "0.520 < reward_model.min_eval_accuracy 0.600" in message and "40 pairs" in message
    for hint in ("n_preference_prompts", "reward_model.epochs", "annotator_beta", "reward_model.backbone"):
        assert hint in message
    with pytest.raises(gates.GateError, match=r"accuracy 0\.520 ± 0\.041 < "):
        gates.check_reward_model({"eval_accuracy": 0.52, "eval_accuracy_ci95": 0.041}, 0.6, n_pairs=40)


def rows(tok) -> list[dict]:
    return [{"prompt": p, "prompt_chat": chat_prompt(tok, p)} for p in PROMPTS]


def tiny_cfg(**evaluation_cfg):
    return from_dict({"policy": {"model": "tiny:llama"},
                      "evaluation": {"max_new_tokens": 6, "samples_per_prompt": 2, "batch_size": 4, **evaluation_cfg}})


def test_evaluate_against_reference_and_champion(tiny_policy, reward_model_dir):
    """The adapter as its own champion: same weights, same seeds -> identical texts, every comparison
    a tie (win rate exactly 0.5), so it is not promoted over itself. Against the reference (adapter
    off) the randomised adapter samples different text."""
    _, adapter_dir, _ = tiny_policy
    cfg = tiny_cfg(promotion_margin=0.0)
    result = evaluation.evaluate(cfg, rows(load_tokenizer("tiny:llama")), adapter_dir, reward_model_dir,
                                 champion=(adapter_dir, "v1"))
    m = result.metrics
    assert m["eval/n"] == 6
    assert m["eval/champion_gold_win_rate"] == 0.5 and m["eval/champion_rm_win_rate"] == 0.5
    assert m["eval/champion_gold_score"] == m["eval/gold_score"]
    # k1 estimate on 6 samples: unbiased but noisy (it can be negative); per token = per sequence / length
    assert m["eval/kl"] != 0 and m["eval/kl_per_token"] == pytest.approx(m["eval/kl"] / m["eval/response_length"])
    for key in ("gold_win_rate", "rm_win_rate", "gold_score", "ref_gold_score", "rm_score", "ref_rm_score",
                "response_length", "eos_rate", "distinct_1", "distinct_2", "ref_distinct_2"):
        assert f"eval/{key}" in m, key
    assert not result.promote and "vs champion v1 0.500" in result.reason
    assert [s["policy"] == s["champion"] for s in result.samples] == [True] * 6
    assert any(s["policy"] != s["reference"] for s in result.samples)


def test_evaluation_on_two_devices_is_one_devices_evaluation(tiny_policy, reward_model_dir, capsys):
    """trainer.devices: 2 (two CPU processes here, a core each): each samples and scores its share of the
    rows' batches, seeded as one device seeds them, so the texts, scores and metrics are one device's."""
    _, adapter_dir, _ = tiny_policy
    prompts = rows(load_tokenizer("tiny:llama")) * 2  # 12 rows: 3 batches of 4, shared 2 and 1
    one = evaluation.evaluate(tiny_cfg(), prompts, adapter_dir, reward_model_dir, champion=(adapter_dir, "v1"))
    cfg = tiny_cfg()
    cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 2
    two = evaluation.evaluate(cfg, prompts, adapter_dir, reward_model_dir, champion=(adapter_dir, "v1"))
    assert "evaluation: 12 rows sampled on 2 devices at once" in capsys.readouterr().out
    assert [s["policy"] for s in two.samples] == [s["policy"] for s in one.samples]
    assert [s["reference"] for s in two.samples] == [s["reference"] for s in one.samples]
    assert len({s["policy"] for s in one.samples}) > 1  # not one text everywhere
    for a, b in zip(one.samples, two.samples):
        assert b["policy_rm"] == pytest.approx(a["policy_rm"], abs=1e-5)
    assert set(two.metrics) == set(one.metrics)
    for key, value in one.metrics.items():
        assert two.metrics[key] == pytest.approx(value, abs=1e-5), key
    assert two.promote == one.promote
    # One batch for two devices: no device is started for nothing (it would have no rows to score).
    cfg.evaluation.batch_size = 16
    alone = evaluation.evaluate(cfg, prompts, adapter_dir, reward_model_dir)
    assert "devices at once" not in capsys.readouterr().out and alone.metrics["eval/n"] == 12


def test_heldout_monitor_feeds_the_overoptimisation_plot(tmp_path, reward_model_dir):
    from rlhf_lightning.models.ppo import train_ppo
    from rlhf_lightning.evaluation.monitor import HeldoutMonitor

    cfg = from_dict({
        "policy": {"model": "tiny:llama"},
        "ppo": {"iterations": 4, "rollout_batch_size": 2, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
                "learning_rate": 1e-2},
        "evaluation": {"max_new_tokens": 6, "every_n_iterations": 2, "monitor_prompts": 2},
        "trainer": {"accelerator": "cpu"},
    })
    tok = load_tokenizer("tiny:llama")
    monitor = HeldoutMonitor(rows(tok), cfg.evaluation, gold=True)
    logger = CSVLogger(str(tmp_path), name="log")
    history = train_ppo(cfg, rows(tok), reward_model_dir, str(tmp_path), logger=logger, gold_judge=True,
                        callbacks=[monitor]).history
    # every 2nd iteration and the last: iterations 1 and 3 (0-based)
    assert ["heldout/kl" in h for h in history] == [False, True, False, True]
    assert history[3]["heldout/n"] == 2 and "heldout/gold_win_rate" in history[3]
    # Logged at those iterations only (not repeated, stale, at the iterations between).
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("heldout/kl")]
    assert sorted(int(r["step"]) for r in logged) == [1, 3]
    fig = plots.overoptimisation_figure(history)
    assert len(fig.axes) == 3  # scores + KL twin axis, win rates
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_side_by_side_shows_the_best_and_worst_answers_then_others():
    from rlhf_lightning.evaluation.compare import side_by_side, side_by_side_markdown

    samples = [{"prompt": f"p{i}", "policy": f"pol{i}", "reference": f"ref{i}", "policy_rm": 0.0, "reference_rm": 0.0,
                "policy_gold": g, "reference_gold": 0.0} for i, g in enumerate([0.5, -0.9, 0.1, 0.9, -0.2, 0.0, 0.3])]
    rows = side_by_side(samples, n=2)
    assert [(r["case"], r["prompt"]) for r in rows] == [("best", "p3"), ("best", "p0"), ("worst", "p1"),
                                                         ("worst", "p4"), ("sample", "p2"), ("sample", "p5")]
    assert rows[0] == {"case": "best", "prompt": "p3", "reference": "ref3", "policy": "pol3", "gold reference": 0.0,
                       "gold policy": 0.9, "gold gain": 0.9, "rm reference": 0.0, "rm policy": 0.0, "rm gain": 0.0}
    # Without a gold judge the reward model ranks them; every sample shown at most once.
    no_gold = [{k: v for k, v in s.items() if "gold" not in k} | {"policy_rm": -i} for i, s in enumerate(samples)]
    rows = side_by_side(no_gold, n=5)
    assert rows[0]["prompt"] == "p0" and "rm gain" in rows[0] and len({r["prompt"] for r in rows}) == len(rows) == 7
    table = side_by_side_markdown([{"case": "best", "prompt": "a|b\nc"}])
    assert table.splitlines() == ["| case | prompt |", "|---|---|", "| best | a\\|b c |"]


def test_a_4bit_run_checks_what_is_served_against_what_was_evaluated(tiny_policy, reward_model_dir,
                                                                     registered_policy):
    """Evaluated on the nf4 base, served full precision with the adapter merged: the check's served answers
    are the registered version's own greedy answers (the pyfunc model `mlflow models serve` runs), its
    evaluated answers the 4-bit policy's, and its figures are computed from the two."""
    import mlflow
    import pandas as pd

    from rlhf_lightning.models.generation import sample
    from rlhf_lightning.models.loading import load_policy
    from rlhf_lightning.models.reward_model import RewardScorer

    _, adapter_dir, _ = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama", "quantization": "4bit"},
                     "evaluation": {"max_new_tokens": 6, "samples_per_prompt": 1, "batch_size": 4,
                                    "served_check_prompts": 2}})
    tok = load_tokenizer("tiny:llama")
    result = evaluation.evaluate(cfg, rows(tok), adapter_dir, reward_model_dir)
    m = result.metrics

    served = mlflow.pyfunc.load_model(registered_policy.model_uri).predict(
        pd.DataFrame({"prompt": PROMPTS[:2]}), params={"max_new_tokens": 6, "temperature": 0.0})
    assert [r["served"] for r in result.served] == served["response"].tolist()
    nf4 = load_policy(cfg.policy, adapter_dir, trainable=False)
    evaluated = sample(nf4, tok, [r["prompt_chat"] for r in rows(tok)[:2]], max_new_tokens=6, temperature=0.0).texts
    assert [r["evaluated"] for r in result.served] == evaluated
    scorer = RewardScorer.load(reward_model_dir)
    # The total reward: the reward model's score normalised (its weight 1, no reward functions).
    expected = scorer.normalise(scorer.score(PROMPTS[:2], served["response"].tolist())).tolist()
    assert [r["reward served"] for r in result.served] == [round(x, 3) for x in expected]
    assert m["eval/served_n"] == 2
    assert m["eval/served_greedy_match"] == sum(e == s for e, s in zip(evaluated, served["response"])) / 2
    assert m["eval/served_rm_gap"] == pytest.approx(
        sum(r["reward served"] - r["reward evaluated"] for r in result.served) / 2, abs=2e-3)
    assert "served vs evaluated reward" in result.reason


def test_the_served_form_is_unquantised_and_merged(tiny_policy):
    import bitsandbytes as bnb

    _, adapter_dir, _ = tiny_policy
    model = evaluation.served_policy(from_dict({"policy": {"model": "tiny:llama", "quantization": "4bit"}}).policy,
                                     adapter_dir)
    assert not [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not [n for n, _ in model.named_parameters() if "lora" in n]
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the CPU's serving dtype
