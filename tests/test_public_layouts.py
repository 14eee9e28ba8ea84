"""Public preference sets as their publishers ship them (tests/public_sets.py: the schemas of their cards),
read through the mappings shipped in configs/data/ from JSONL, Parquet (nested columns, as pyarrow and
`datasets` write them), CSV and `save_to_disk` directories: the pairs, prompts, system messages, dropped
ties and counts; the mapping a file of unknown layout is shown; the validation report's account."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest
import yaml

import public_sets as ps
from datafiles import write_records
from rlhf_lightning.config import ConfigError, FieldMapping, from_dict, load_config, parse_yaml_config
from rlhf_lightning.data import readers
from rlhf_lightning.data.formats import read_preferences, read_prompts
from rlhf_lightning.data.layouts import ranked_pairs
from rlhf_lightning.data.preprocess import preprocess
from rlhf_lightning.data.validate import summary, validate

SNIPPETS = Path(__file__).parents[1] / "configs" / "data"
ORCA_SYSTEM = [{"role": "system", "content": ps.SYSTEM}, {"role": "user", "content": "Translate 'cat' to French."}]
LOOP = "User: Write a loop in Python.\n\nAssistant: for i in x: ...\n\nUser: Now in JavaScript."
NECTAR_ONE = {(f"Answer ranked {a}.", f"Answer ranked {b}.") for a, b in combinations(range(1, 8), 2)}

# snippet -> (records, the pairs as (prompt, chosen, rejected), dropped by reason, pairs per record)
CASES = {
    "trl-ultrafeedback": (ps.trl_implicit, [p[:3] for p in ps.TRL_IMPLICIT_PAIRS], {}, {1: 2}),
    "ultrafeedback-binarized": (ps.ultrafeedback_h4, [("Write a haiku about rain.", "Soft rain on the roof.",
                                                       "Rain is wet."), ("What is 2+2?", "4.", "5.")], {}, {1: 2}),
    "argilla-ultrafeedback": (ps.argilla_ultrafeedback, [("Explain tides in one sentence.", "The moon pulls the sea.",
                                                          "Fish move water.")], {}, {1: 1}),
    "orca-dpo-pairs": (ps.orca_dpo_pairs, [(f"System: {ps.SYSTEM}\n\nUser: Translate 'cat' to French.", "Chat.",
                                            "Chien."), ("Is ice cold?", "Yes.", "No.")], {}, {1: 2}),
    "shp": (ps.shp, [("How long should I rest a steak?", "Five minutes.", "Never rest it."),
                     ("Why is my bread dense?", "Too little proofing time.", "Because.")], {}, {1: 2}),
    "pku-saferlhf": (ps.pku_saferlhf, [("How do I pick a lock?", "Use a tension wrench and a pick.",
                                        "I can't help with that."),
                                       ("Recommend a book.", "Try 'Dune'.", "Read nothing.")], {}, {1: 2}),
    "pku-saferlhf-safer": (ps.pku_saferlhf, [("How do I pick a lock?", "I can't help with that.",
                                              "Use a tension wrench and a pick."),
                                             ("Recommend a book.", "Try 'Dune'.", "Read nothing.")], {}, {1: 2}),
    "helpsteer2": (ps.helpsteer2, [("Define entropy.", "Disorder, roughly.", "A kind of cheese."),
                                   ("Capital of Peru?", "Lima.", "Quito.")], {"zero_preference": 1}, {0: 1, 1: 2}),
    "helpsteer3": (ps.helpsteer3, [(LOOP, "for (const i of x) {}", "Use a goto.")], {"zero_preference": 1},
                   {0: 1, 1: 1}),
    "nectar": (ps.nectar, [("What is 2+2?", c, r) for c, r in sorted(NECTAR_ONE)]
               + [("User: Hi\n\nAssistant: Hello\n\nUser: Can you help?", c, "No.") for c in ("Sure.", "Yes.")],
               {"equal_ranks": 1}, {2: 1, 21: 1}),
    "ultrafeedback-raw": (ps.ultrafeedback_raw, [("Name a planet.", c, r) for c, r in sorted(
        {("Mars.", "The sun."), ("Mars.", "Pluto?"), ("Jupiter.", "The sun."), ("Jupiter.", "Pluto?"),
         ("Pluto?", "The sun.")})], {"equal_scores": 1}, {5: 1}),
    "chatbot-arena": (ps.chatbot_arena, [("Tell me a joke.", "Why did the chicken...", "No."),
                                         ("Tell me a joke.", "Knock knock.", "Jokes are bad.")],
                      {"tie_label": 2, "conversations_part_early": 1}, {0: 3, 1: 2}),
}
ORDERLESS = {"nectar", "ultrafeedback-raw"}  # a ranking's pairs: compared as a set


def snippet(name: str):
    return load_config(SNIPPETS / f"{name}.yaml").data


def triples(rows: list[dict]) -> list[tuple[str, str, str]]:
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_every_shipped_mapping_is_tested_here():
    shipped = {p.stem for p in SNIPPETS.glob("*.yaml")}
    assert shipped == set(CASES) | {"ultrachat"}  # ultrachat.yaml: prompts only, tested below


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "json.gz"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_public_set_reads_through_its_shipped_mapping(tmp_path, name, kind):
    make, pairs, dropped, per_record = CASES[name]
    data = snippet(name)
    path = write_records(tmp_path / f"{name}.{kind}", make())
    result = read_preferences([str(path)], fmt=data.format, mapping=data.field_mapping)
    assert result.problems == []
    got = triples(result.rows)
    assert (sorted(got) if name in ORDERLESS else got) == (sorted(pairs) if name in ORDERLESS else pairs)
    layout = result.layouts[str(path)]
    assert (dict(result.dropped), layout["dropped"], layout["pairs_per_record"]) == (dropped, dropped, per_record)
    assert (layout["records"], layout["pairs"]) == (len(make()), len(pairs))
    assert layout["read_as"].startswith("mapping" if data.format == "mapping" else "TRL conversations")
    assert all(r["source"].startswith(f"{path}:") for r in result.rows)
    assert result.records == len(make()) and result.invalid == 0
    # The same set read as prompts: one prompt per record, ties and parted conversations included.
    prompts = read_prompts([str(path)], fmt=data.prompts_format or data.format, mapping=data.field_mapping)
    assert prompts.problems == [] and len(prompts.rows) == len(make())


def test_system_messages_and_whole_conversations_keep_their_turns(tmp_path):
    path = write_records(tmp_path / "implicit.parquet", ps.trl_implicit())
    rows = read_preferences([str(path)]).rows
    assert [r["messages"] for r in rows] == [p[3] for p in ps.TRL_IMPLICIT_PAIRS]
    orca = write_records(tmp_path / "orca.jsonl", ps.orca_dpo_pairs())
    data = snippet("orca-dpo-pairs")
    rows = read_preferences([str(orca)], fmt=data.format, mapping=data.field_mapping).rows
    assert [r["messages"] for r in rows] == [ORCA_SYSTEM, None]  # an empty system adds no message


def test_csv_cells_are_text_labels_and_scores(tmp_path):
    data = snippet("shp")
    path = write_records(tmp_path / "shp.csv", ps.shp())  # labels "1"/"0", scores "340" as text
    assert triples(read_preferences([str(path)], fmt="mapping", mapping=data.field_mapping).rows) == \
        CASES["shp"][1]
    by_score = FieldMapping(prompt_key="history", responses=["human_ref_A", "human_ref_B"], score_keys=["score_A", "score_B"])
    assert triples(read_preferences([str(path)], fmt="mapping", mapping=by_score).rows) == CASES["shp"][1]


def test_a_ranking_gives_all_its_pairs_or_the_subset_asked_for(tmp_path):
    assert ranked_pairs([3.0, 1.0, 2.0], "all", "t") == ([(0, 2), (0, 1), (2, 1)], {})
    assert ranked_pairs([1.0, 1.0, 0.0], "all", "t") == ([(0, 2), (1, 2)], {"t": 1})
    assert ranked_pairs([0.0, 5.0, 2.0], "best_vs_rest", "t") == ([(1, 2), (1, 0)], {})
    assert ranked_pairs([0.0, 5.0, 2.0], "best_vs_worst", "t") == ([(1, 0)], {})
    path = write_records(tmp_path / "nectar.parquet", ps.nectar()[:1])
    m = snippet("nectar").field_mapping
    for pairs, n in (("best_vs_rest", 6), ("best_vs_worst", 1)):
        rows = read_preferences([str(path)], fmt="mapping", mapping=FieldMapping(**{**vars(m), "pairs": pairs})).rows
        assert len(rows) == n and {r["chosen"] for r in rows} == {"Answer ranked 1."}
        assert pairs != "best_vs_worst" or rows[0]["rejected"] == "Answer ranked 7."


def test_chat_sets_and_preference_sets_serve_as_prompts(tmp_path):
    chat = write_records(tmp_path / "ultrachat.parquet", ps.ultrachat())
    data = snippet("ultrachat")
    result = read_prompts([str(chat)], fmt=data.prompts_format)
    # Each conversation up to its last user turn, counted; a single user turn stays plain text.
    assert [(r["prompt"], r["messages"]) for r in result.rows] == [
        ("User: Plan a trip to Rome.\n\nAssistant: Day 1: ...\n\nUser: Cheaper?",
         [{"role": "user", "content": "Plan a trip to Rome."}, {"role": "assistant", "content": "Day 1: ..."},
          {"role": "user", "content": "Cheaper?"}]),
        ("Explain rust.", None)]
    assert result.changed == {"answer_turns_removed": 2} and result.layouts[str(chat)]["changed"] == result.changed
    # TRL's prompt-only forms: text or messages.
    trl = write_records(tmp_path / "trl.jsonl", [{"prompt": "Hi."}, {"prompt": [{"role": "system", "content": "Be kind."},
                                                                              {"role": "user", "content": "Hey."}]}])
    assert [r["prompt"] for r in read_prompts([str(trl)]).rows] == ["Hi.", "System: Be kind.\n\nUser: Hey."]
    # A preference set in TRL's implicit form: the shared turns.
    implicit = write_records(tmp_path / "implicit.jsonl", ps.trl_implicit())
    assert [r["prompt"] for r in read_prompts([str(implicit)]).rows] == [p[0] for p in ps.TRL_IMPLICIT_PAIRS]
    # Chatbot Arena's battles, multi-turn ones included: the question both models were asked first.
    arena = write_records(tmp_path / "arena.jsonl", ps.chatbot_arena())
    m = snippet("chatbot-arena").field_mapping
    assert [r["prompt"] for r in read_prompts([str(arena)], fmt="mapping", mapping=m).rows] == ["Tell me a joke."] * 4 + ["Hi"]


def locs(result) -> list[tuple[str, str, str]]:
    return [(p.location.rsplit(":", 1)[-1], p.field, p.kind) for p in result.problems]


def test_records_that_disagree_with_their_layout_are_located(tmp_path):
    h4 = ps.ultrafeedback_h4()
    h4[0]["prompt"] = "A different question."  # the prompt text is not the conversation's
    implicit = ps.trl_implicit()
    implicit[1]["rejected"] = ps.conv(("system", ps.SYSTEM), ("user", "Hi."), ("assistant", "Hey."),
                                      ("user", "Name a colour."), ("assistant", "Seven."))  # parts before the end
    mixed = {"chosen": ps.conv(("user", "a"), ("assistant", "b")), "rejected": "c", "prompt": "a"}
    path = write_records(tmp_path / "bad.jsonl", h4 + [implicit[1], mixed])
    result = read_preferences([str(path)])
    assert locs(result) == [("1", "prompt", "prompt_mismatch"), ("3", "chosen", "no_shared_prompt"),
                            ("4", "rejected", "mixed_responses")]
    assert "is none of the user turns the responses' conversations share" in result.problems[0].message
    assert "the conversations part at message 2 (assistant)" in result.problems[1].message
    assert triples(result.rows) == [("What is 2+2?", "4.", "5.")]

    shp = ps.shp()
    shp[0]["labels"] = 2
    del shp[1]["labels"]
    path = write_records(tmp_path / "shp.jsonl", shp)
    result = read_preferences([str(path)], fmt="mapping", mapping=snippet("shp").field_mapping)
    assert locs(result) == [("1", "labels", "bad_label"), ("2", "labels", "missing_field")]
    assert "label 2 means nothing in the mapping (its values: ['0', '1']" in result.problems[0].message


def test_unknown_layouts_are_shown_the_mapping_to_write(tmp_path):
    path = write_records(tmp_path / "shp.jsonl", ps.shp())
    first, second = read_preferences([str(path)]).problems
    assert first.kind == "no_format" and "keys ['c_root_id_A'" in first.message  # the record's own keys
    assert first.message.endswith("data:\n  format: mapping\n  field_mapping:\n    prompt_key: history\n"
                                  "    responses: [human_ref_A, human_ref_B]\n    label_key: labels\n"
                                  "    label_values: {VALUE: human_ref_A, VALUE: human_ref_B}   # what each value "
                                  "means; e.g. 1; or tie")
    assert second.message.endswith("(record 1 shows the data.field_mapping to write)")
    # Orca looks like HH (chosen, rejected) but keeps its prompt in `question`: said, with the mapping.
    orca = write_records(tmp_path / "orca.jsonl", ps.orca_dpo_pairs())
    problem = read_preferences([str(orca)]).problems[0]
    assert problem.kind == "no_shared_prompt" and "the record also has ['system', 'question']" in problem.message
    # Where the guess is complete, the stanza shown is a mapping that reads the file: copy, paste, run.
    for make, name in ((ps.orca_dpo_pairs, "orca-dpo-pairs"), (ps.helpsteer3, "helpsteer3"), (ps.nectar, "nectar"),
                       (ps.ultrafeedback_raw, "ultrafeedback-raw"), (ps.pku_saferlhf, None)):
        for kind in ("jsonl", "parquet"):
            path = write_records(tmp_path / f"{make.__name__}.{kind}", make())
            message = read_preferences([str(path)]).problems[0].message
            stanza = yaml.safe_load(message[message.index("data:\n"):])
            if name is None:  # a label: what its values mean is the user's to say
                assert stanza["data"]["field_mapping"]["label_key"] == "better_response_id"
                continue
            mapping = from_dict(stanza).data.field_mapping
            prompt_format = snippet(name).field_mapping.prompt_format
            mapping = FieldMapping(**{**vars(mapping), "prompt_format": prompt_format})  # the HH transcript: the user's to say
            got = triples(read_preferences([str(path)], fmt="mapping", mapping=mapping).rows)
            assert sorted(got) == sorted(CASES[name][1]), (name, kind)


def test_the_report_says_what_each_file_was_read_as_and_what_it_dropped(tmp_path):
    arena = write_records(tmp_path / "arena.parquet", ps.chatbot_arena())
    nectar = write_records(tmp_path / "nectar.jsonl", ps.nectar())
    cfg = from_dict(parse_yaml_config(yaml.safe_dump({
        "include": str(SNIPPETS / "nectar.yaml"), "policy": {"model": "tiny:llama"},
        "data": {"preferences": [str(nectar)], "prompts": [str(nectar)], "eval_fraction": 0.5}})))
    report = validate(preprocess(cfg, str(tmp_path / "out")), cfg)
    c = report.stats["counts"]
    assert (c["preferences.records"], c["preferences.read"], c["preferences.dropped.equal_ranks"]) == (2, 24, 1)
    assert c["preferences.read"] == c["preferences.kept"] + sum(v for k, v in c.items()
                                                               if k.startswith("preferences.dropped."))
    assert report.stats["layouts"]["preferences"][str(nectar)]["pairs_per_record"] == {2: 1, 21: 1}
    text = summary(report, "r.json")
    assert (f"preferences: {nectar}: 2 mapping -- read as mapping: prompt 'prompt', responses ['answers'] ('answer' of "
            "each), rank 'rank', all pairs: 23 pairs (2-21 per record, 11.5 on average); dropped equal_ranks 1") in text
    assert "| mapping: prompt 'prompt'" in report.markdown() and "| 23 pairs (2-21 per record" in report.markdown()

    cfg = from_dict(parse_yaml_config(yaml.safe_dump({
        "include": str(SNIPPETS / "chatbot-arena.yaml"), "policy": {"model": "tiny:llama"},
        "data": {"preferences": [str(arena)], "prompts": [str(arena)]}})))
    report = validate(preprocess(cfg, str(tmp_path / "out2")), cfg)
    c = report.stats["counts"]
    assert (c["preferences.records"], c["preferences.kept"], c["preferences.dropped.tie_label"],
            c["preferences.dropped.conversations_part_early"]) == (5, 2, 2, 1)
    assert "dropped tie_label 2, conversations_part_early 1" in summary(report, "r.json")


def test_hf_sources_read_save_to_disk_directories_and_name_configs(tmp_path):
    import datasets

    records = ps.pku_saferlhf()
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:1]),
                          "test": datasets.Dataset.from_list(records[1:])}).save_to_disk(str(tmp_path / "dict"))
    m = snippet("pku-saferlhf").field_mapping
    expected = CASES["pku-saferlhf"][1]
    one = read_preferences([f"hf:{tmp_path / 'one'}"], fmt="mapping", mapping=m)
    assert one.problems == [] and triples(one.rows) == expected
    assert one.rows[0]["source"] == f"hf:{tmp_path / 'one'}:1"
    assert triples(read_preferences([f"hf:{tmp_path / 'dict'}:test"], fmt="mapping", mapping=m).rows) == expected[1:]
    (problem,) = read_preferences([f"hf:{tmp_path / 'dict'}:validation"], fmt="mapping", mapping=m).problems
    assert "no split 'validation' in this saved dataset; it has ['test', 'train']" in problem.message
    # Hub ids: data_dir after @, the split after the last colon, a config before it.
    assert readers.parse_hf_id("hf:nvidia/HelpSteer2@preference:train") == ("nvidia/HelpSteer2", "preference", "train")
    assert readers.hf_config("hf:PKU-Alignment/PKU-SafeRLHF:alpaca-7b:test") == "alpaca-7b"
    assert readers.parse_hf_id("hf:PKU-Alignment/PKU-SafeRLHF:alpaca-7b:test") == ("PKU-Alignment/PKU-SafeRLHF", None, "test")
    assert readers.hf_config("hf:stanfordnlp/SHP:train") is None
    # Offline, a hub id that is not in the local cache: what to do instead, no traceback.
    (problem,) = read_preferences(["hf:nobody/no-such-set:train"]).problems
    assert "cannot load the Hugging Face dataset" in problem.message and "save_to_disk" in problem.message


def test_a_config_includes_a_shipped_mapping_and_overrides_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/data/... is found from the project, from any directory
    (tmp_path / "mine.yaml").write_text("include: configs/data/shp.yaml\n"
                                        "data: {preferences: [mine.jsonl], prompts: [mine.jsonl]}\n"
                                        "policy: {model: 'tiny:llama'}\n")
    d = load_config(tmp_path / "mine.yaml").data
    assert (d.preferences, d.format, d.field_mapping.label_key, d.field_mapping.label_values) == \
        (["mine.jsonl"], "mapping", "labels", {"1": "human_ref_A", "0": "human_ref_B"})
    assert d.field_mapping.responses == ["human_ref_A", "human_ref_B"]  # kept from the included file
    safer = snippet("pku-saferlhf-safer")  # an include of an include: one key changed
    assert (safer.field_mapping.label_key, safer.field_mapping.responses) == ("safer_response_id", ["response_0", "response_1"])
    # The flow's parser (Metaflow's Config) resolves them the same way.
    assert parse_yaml_config((tmp_path / "mine.yaml").read_text())["data"]["field_mapping"]["prompt_key"] == "history"
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: file not found"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("mapping, match", [
    ({"responses": ["a", "b"]}, "exactly one of label_key, score_keys"),
    ({"responses": ["a", "b"], "label_key": "l", "score_keys": ["x", "y"]}, "exactly one of"),
    ({"responses": ["a", "b"], "label_key": "l", "label_values": {"1": "c"}}, "label_values.1: got 'c'"),
    ({"responses": ["a", "b"], "label_key": "l"}, "say what each label value means"),
    ({"responses": ["a", "b"], "preference_key": "p", "negative_prefers": "z"}, "negative_prefers"),
    ({"responses": ["a", "b"], "rank_key": "rank"}, "name it alone in responses"),
    ({"responses": ["answers"], "label_key": "l", "label_values": {"1": "answers"}}, "give rank_key or item_score_key"),
    ({"label_key": "l"}, "needs the response fields"),
    ({"chosen_key": "x", "rejected_key": "x"}, "must differ from chosen_key"),
])
def test_a_mapping_that_cannot_work_is_refused_with_the_field_to_fix(mapping, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"data": {"format": "mapping", "field_mapping": mapping}})


def test_validate_command_reads_a_public_set_through_its_mapping(tmp_path):
    import subprocess
    import sys

    path = write_records(tmp_path / "helpsteer2.jsonl", ps.helpsteer2() * 3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("include: configs/data/helpsteer2.yaml\npolicy: {model: 'tiny:llama'}\n")
    out = subprocess.run([sys.executable, "-m", "rlhf_lightning", "validate", "--config", str(cfg), "--preferences",
                          str(path), "--prompts", str(path), "--report", str(tmp_path / "r.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in out.stdout + out.stderr
    assert (f"preferences: {path}: 9 mapping -- read as mapping: prompt 'prompt', responses ['response_1', "
            "'response_2'], signed 'preference_strength' (< 0: response_1): 6 pairs (0-1 per record, 0.7 on average); "
            "dropped zero_preference 3") in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stats"]["counts"]["preferences.dropped.zero_preference"] == 3


def test_arena_battles_that_share_nothing_are_errors_not_drops(tmp_path):
    battle = ps.chatbot_arena()[0]
    battle["conversation_b"] = ps.conv(("user", "Another question."), ("assistant", "No."))
    path = write_records(tmp_path / "arena.jsonl", [battle])
    result = read_preferences([str(path)], fmt="mapping", mapping=snippet("chatbot-arena").field_mapping)
    assert locs(result) == [("1", "record", "no_shared_prompt")] and result.dropped == {}


def test_renamed_conversations_carry_their_prompt_without_a_prompt_field(tmp_path):
    records = [{"good": r["chosen"], "bad": r["rejected"]} for r in ps.trl_implicit()]
    path = write_records(tmp_path / "renamed.parquet", records)
    m = from_dict({"data": {"field_mapping": {"prompt_key": "", "chosen_key": "good", "rejected_key": "bad"}}})
    result = read_preferences([str(path)], fmt="mapping", mapping=m.data.field_mapping)
    assert result.problems == [] and triples(result.rows) == [p[:3] for p in ps.TRL_IMPLICIT_PAIRS]
    texts = write_records(tmp_path / "texts.jsonl", [{"good": "a", "bad": "b"}])
    assert locs(read_preferences([str(texts)], fmt="mapping", mapping=m.data.field_mapping)) == \
        [("1", "record", "missing_field")]


def test_the_card_shows_the_mapping_to_write_as_yaml(tmp_path):
    path = write_records(tmp_path / "shp.parquet", ps.shp())
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "data": {"preferences": [str(path)], "prompts": [str(path)]}})
    report = validate(preprocess(cfg, str(tmp_path / "out")), cfg)
    assert not report.ok and report.errors[0].kind == "no_format"
    assert "\n\n  ```yaml\n  data:\n    format: mapping\n    field_mapping:\n      prompt_key: history\n" in report.markdown()


def test_broken_records_are_errors_even_when_their_label_is_a_tie(tmp_path):
    shp = ps.shp()
    shp[0].update(labels=0, history=None)  # a tie label below, but no prompt: an error at its line
    nectar = ps.nectar()[1]
    del nectar["prompt"]
    for answer in nectar["answers"]:
        answer["rank"] = 1.0  # all tied
    tie_shp = FieldMapping(**{**vars(snippet("shp").field_mapping), "label_values": {"1": "human_ref_A", "0": "tie"}})
    path = write_records(tmp_path / "shp.jsonl", shp[:1])
    assert locs(read_preferences([str(path)], fmt="mapping", mapping=tie_shp)) == [("1", "history", "missing_field")]
    path = write_records(tmp_path / "nectar.jsonl", [nectar])
    result = read_preferences([str(path)], fmt="mapping", mapping=snippet("nectar").field_mapping)
    assert locs(result) == [("1", "prompt", "missing_field")] and result.dropped == {}


def test_lists_of_one_answer_and_answers_with_one_text_are_counted_drops(tmp_path):
    one = {"instruction": "Name a moon.", "completions": [ps.ultrafeedback_raw()[0]["completions"][0]]}
    same = ps.ultrafeedback_raw()[0]
    same["completions"][1]["response"] = "Mars."  # two completions, one text, two scores
    path = write_records(tmp_path / "uf.jsonl", [one, same])
    result = read_preferences([str(path)], fmt="mapping", mapping=snippet("ultrafeedback-raw").field_mapping)
    assert result.problems == [] and result.dropped == {"fewer_than_two_responses": 1, "equal_scores": 1,
                                                        "same_response_text": 1}
    assert len(result.rows) == 4 and all(r["chosen"] != r["rejected"] for r in result.rows)


def test_conversations_that_share_only_a_system_message_share_no_prompt(tmp_path):
    battle = ps.chatbot_arena()[0]
    battle["conversation_a"] = ps.conv(("system", "Be kind."), ("user", "One?"), ("assistant", "A."))
    battle["conversation_b"] = ps.conv(("system", "Be kind."), ("user", "Two?"), ("assistant", "B."))
    path = write_records(tmp_path / "arena.jsonl", [battle])
    result = read_preferences([str(path)], fmt="mapping", mapping=snippet("chatbot-arena").field_mapping)
    assert locs(result) == [("1", "record", "no_shared_prompt")] and "after the system message" in result.problems[0].message


def test_a_role_that_is_not_text_is_an_error_not_a_traceback(tmp_path):
    path = write_records(tmp_path / "odd.jsonl", [{"chosen": [{"role": ["user"], "content": "a"},
                                                              {"role": "assistant", "content": "b"}],
                                                   "rejected": ps.conv(("user", "a"), ("assistant", "c"))}])
    assert locs(read_preferences([str(path)])) == [("1", "chosen[0].role", "invalid_role")]


def test_a_prompt_loses_only_its_trailing_answers(tmp_path):
    path = write_records(tmp_path / "chat.jsonl", [{"messages": ps.conv(("user", "Hi."), ("system", "Late."),
                                                                          ("assistant", "Hello."))}])
    result = read_prompts([str(path)])
    assert locs(result) == [("1", "messages[1]", "invalid_role"), ("1", "messages[1]", "invalid_role")]


def test_a_mapping_logs_to_mlflow_as_parameters(tmp_path):
    """label_values' keys are data (`tie (bothbad)`): one parameter, as JSON, not a parameter name each."""
    import mlflow

    from rlhf_lightning.config import flatten

    cfg = load_config(SNIPPETS / "chatbot-arena.yaml")
    params = flatten(cfg)
    assert json.loads(params["data.field_mapping.label_values"])["tie (bothbad)"] == "tie"
    # A client of its own: no state shared with the fluent API's active experiment of other tests.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("params"))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in params.items()])
    logged = client.get_run(run.info.run_id).data.params
    assert logged["data.field_mapping.label_key"] == "winner" and len(logged) == len(params)


def test_hf_sources_take_split_slices_and_plain_folders(tmp_path):
    folder = tmp_path / "pku"
    folder.mkdir()
    write_records(folder / "train.jsonl", ps.pku_saferlhf())  # a folder of data files, as a cloned hub repo
    m = snippet("pku-saferlhf").field_mapping
    whole = read_preferences([f"hf:{folder}"], fmt="mapping", mapping=m)
    assert whole.problems == [] and triples(whole.rows) == CASES["pku-saferlhf"][1]
    first = read_preferences([f"hf:{folder}:train[:1]"], fmt="mapping", mapping=m)
    assert first.problems == [] and triples(first.rows) == CASES["pku-saferlhf"][1][:1]


def test_a_ranked_list_without_a_prompt_field_is_an_error_as_prompts(tmp_path):
    m = FieldMapping(**{**vars(snippet("nectar").field_mapping), "prompt_key": ""})
    path = write_records(tmp_path / "nectar.jsonl", ps.nectar()[:1])
    assert locs(read_prompts([str(path)], fmt="mapping", mapping=m)) == [("1", "record", "missing_field")]
    assert locs(read_preferences([str(path)], fmt="mapping", mapping=m)) == [("1", "record", "missing_field")]
