"""Data stage: format readers, preprocessing (clean, cut, split) and validation, on tiny files."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from datafiles import write_records
from rlhf_lightning.config import ConfigError, FieldMapping, from_dict
from rlhf_lightning.data import formats
from rlhf_lightning.data.formats import DataError, Issue, read_preferences, read_prompts
from rlhf_lightning.data.preprocess import (
    PreparedData,
    clean_text,
    fit_conversations,
    fit_responses,
    preprocess,
    split_by_prompt,
)
from rlhf_lightning.data.text import is_blank
from rlhf_lightning.data.validate import DataValidationError, validate

FIXTURES = Path(__file__).parent / "fixtures"
PROBLEMS = FIXTURES / "preferences_with_problems.jsonl"

# Includes strings pandas would take for missing values or numbers, and text needing CSV quoting.
RECORDS = [
    {"input_text": "Review a small cafe.", "candidate_0": "Lovely coffee.", "candidate_1": "Cold and rude.", "choice": 0},
    {"input_text": "Review a museum.", "candidate_0": "Dull.", "candidate_1": "Fascinating rooms.", "choice": 1},
    {"input_text": "NA", "candidate_0": "None", "candidate_1": "007", "choice": 1},
    {"input_text": 'Ünïcödé, "quotes", commas\nand a newline', "candidate_0": "", "candidate_1": "ok, fine", "choice": 1},
]
EXPECTED = [
    {"prompt": "Review a small cafe.", "chosen": "Lovely coffee.", "rejected": "Cold and rude."},
    {"prompt": "Review a museum.", "chosen": "Fascinating rooms.", "rejected": "Dull."},
    {"prompt": "NA", "chosen": "007", "rejected": "None"},
    {"prompt": 'Ünïcödé, "quotes", commas\nand a newline', "chosen": "ok, fine", "rejected": ""},
]




def tiny_cfg(**data) -> object:
    return from_dict({"policy": {"model": "tiny:llama"}, "data": data})


def locations(issues: list[Issue]) -> list[tuple[str, str]]:
    return [(i.location, i.field) for i in issues]


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz", "p.json", "p.parquet", "p.csv", "p.csv.gz"])
def test_every_file_format_reads_to_the_same_rows(tmp_path, name):
    path = write_records(tmp_path / name, RECORDS)
    result = read_preferences([str(path)])
    assert result.problems == []
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in result.rows] == EXPECTED
    assert [r["source"] for r in result.rows] == [f"{path}:{n}" for n in range(1, 5)]
    assert result.labels == Counter({0: 1, 1: 3})
    prompts = read_prompts([str(path)])  # a preference file is also a prompt file
    assert [r["prompt"] for r in prompts.rows] == [r["prompt"] for r in EXPECTED]


def test_row_problems_are_all_collected_with_file_line_and_field():
    result = read_preferences([str(PROBLEMS)])
    where = str(PROBLEMS)
    assert locations(result.problems) == [
        (f"{where}:2", "record"),
        (f"{where}:3", "choice"),
        (f"{where}:4", "choice"),
        (f"{where}:6", "input_text"),
        (f"{where}:6", "choice"),
        (f"{where}:7", "record"),
    ]
    text = [str(p) for p in result.problems]
    assert text[0].startswith(f"{where}:2: record: malformed JSON")
    assert "missing" in text[1] and "0 if candidate_0 is preferred" in text[1]
    assert "got 2" in text[2] and "got True" in text[4]  # a boolean is not a label
    assert "expected a string, got int" in text[3]
    # Every valid row survives, in order; the blank line 5 is not a record.
    assert [r["source"] for r in result.rows] == [f"{where}:{n}" for n in (1, 8, 9, 10)]
    assert (result.records, result.invalid) == (9, 5)


def test_csv_and_parquet_problems_point_at_their_row(tmp_path):
    bad = [dict(RECORDS[0]), dict(RECORDS[1], choice="yes"), dict(RECORDS[2], choice=5)]
    csv = tmp_path / "p.csv"
    pd.DataFrame(bad).to_csv(csv, index=False)
    assert locations(read_preferences([str(csv)]).problems) == [(f"{csv}:2", "choice"), (f"{csv}:3", "choice")]
    parquet = write_records(tmp_path / "p.parquet", [RECORDS[0], dict(RECORDS[1], candidate_1=None)])
    result = read_preferences([str(parquet)])
    assert locations(result.problems) == [(f"{parquet}:2", "candidate_1")]
    assert len(result.rows) == 1


def test_non_utf8_bytes_are_a_problem_of_their_record_only(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + b'{"input_text": "caf\xe9"}\n')
    result = read_preferences([str(jsonl)])
    assert locations(result.problems) == [(f"{jsonl}:2", "record")]
    assert "not valid UTF-8" in str(result.problems[0]) and len(result.rows) == 1
    csv = tmp_path / "p.csv"  # CSV records are numbered from the first row after the header
    csv.write_bytes(b"input_text,candidate_0,candidate_1,choice\nok,a,b,0\ncaf\xe9,a,b,1\n")
    result = read_preferences([str(csv)])
    assert [str(p) for p in result.problems] == [f"{csv}:2: input_text: not valid UTF-8 (byte 0xe9; re-save the "
                                                 "file as UTF-8)"]
    assert [r["source"] for r in result.rows] == [f"{csv}:1"]
    js = tmp_path / "p.json"
    js.write_bytes(b'[{"prompt": "ok", "chosen": "a", "rejected": "b"},\n {"prompt": "x", "chosen": "\xff", "rejected": "b"}]')
    result = read_preferences([str(js)])
    assert locations(result.problems) == [(f"{js}:2", "chosen")] and len(result.rows) == 1


@pytest.mark.parametrize("content, name, match", [
    (None, "missing.jsonl", r"missing\.jsonl: file not found \(fix the path in data\.preferences"),
    (None, "nothing-*.jsonl", r"nothing-\*\.jsonl: no file matches this pattern"),
    (b"x", "p.txt", r"p\.txt: unknown file type \(name it \.jsonl, \.json, \.parquet or \.csv"),
    (b'{"a": 1}\n{"a": 2}\n', "p.json", r"p\.json:2: malformed JSON: Extra data .*name one-object-per-line files \.jsonl"),
    (b'{"a": 1}', "p.json", r"p\.json: expected a JSON list of objects, got a dict"),
    (b"input_text,choice\nx,1\n", "p.csv", r"p\.csv: column\(s\) \['candidate_0', 'candidate_1'\] missing for the Vertex"),
    (b"a,b\nx,1\n", "p.csv", r"p\.csv: columns \['a', 'b'\] match no known format"),
    (b"not parquet", "p.parquet", r"p\.parquet: not a readable Parquet file"),
    (b"not gzip", "p.jsonl.gz", r"p\.jsonl\.gz:1: cannot read"),
    (b"", "p.jsonl", r"p\.jsonl: no records \(the file is empty"),
    (b"\n \n", "p.jsonl", r"p\.jsonl: no records"),
    (b"[]", "p.json", r"p\.json: no records"),
    (b"", "p.csv", r"p\.csv: empty CSV file"),
])
def test_file_level_failures_are_problems_with_the_path(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    good = write_records(tmp_path / "good.jsonl", RECORDS[:2])
    result = read_preferences([str(path), str(good)])
    assert len(result.problems) == 1 and re.search(match, str(result.problems[0]))
    assert result.problems[0].field == "" and result.problems[0].location.startswith(str(path))
    assert len(result.rows) == 2  # the other file's rows are still read
    with pytest.raises(DataError, match=match):  # the single-file API raises
        if content is None:
            formats._expand_one(str(path), "data.preferences")
        else:
            formats._read_file(str(path), "preferences", "auto", FieldMapping(), formats.ReadResult())


def test_globs_expand_sorted_and_read_each_file_once(tmp_path):
    for i in range(2):
        write_records(tmp_path / f"part-{i}.jsonl", RECORDS[i : i + 1])
    result = read_preferences([str(tmp_path / "part-1.jsonl"), str(tmp_path / "part-*.jsonl")])
    assert result.files == [str(tmp_path / "part-1.jsonl"), str(tmp_path / "part-0.jsonl")]
    assert len(result.rows) == 2


# ------------------------------------------------------------------------------------------ preprocess


def test_clean_text_reports_each_reason():
    assert clean_text("  cafe\u0301 \r\nok\x00  go\tnow\n    indented ") == ("café \nok go\tnow\n    indented",
        ["unicode_nfc", "line_endings", "control_chars", "spaces", "ends"])
    assert clean_text("already clean") == ("already clean", [])


INVISIBLE = "\u200b\u200d\ufeff\u00ad"  # zero-width space and joiner, byte-order mark, soft hyphen


@pytest.mark.parametrize("text, blank", [
    ("", True),
    (" \t\n\u00a0\u3000", True),  # ordinary and no-break whitespace
    ("\u200b", True), ("\u200c", True), ("\u200d", True), ("\u2060", True), ("\ufeff", True),
    ("\u00ad", True), ("\x00", True), ("\x07", True), ("\u2028\u2029", True),  # Zl, Zp
    ("\u200e\u202e", True),  # other format characters (bidi marks)
    (" \u200b \ufeff\n", True), ("\t\u00ad  \x07", True),  # mixed with spaces
    (INVISIBLE + "\u200c\u2060\x00\x07 \n\u200e", True),  # every class at once
    ("a", False), (INVISIBLE + "a" + INVISIBLE, False),
    ("\U0001F468\u200d\U0001F469\u200d\U0001F467", False),  # a family emoji joined by ZWJs
    ("\u200d\U0001F44D\u200b", False),  # one emoji among invisibles
    ("co\u00adoperate", False),  # a soft hyphen inside a word
    ("\u0301", False),  # a lone combining mark draws something
])
def test_is_blank_means_no_visible_character(text, blank):
    assert is_blank(text) is blank


def test_invisible_only_text_is_an_empty_text_at_its_line(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(6)]
    rows[3]["chosen"] = INVISIBLE
    rows[4]["prompt"] = "\x00\x07 \u2060"  # controls go in cleaning, the word joiner stays
    rows[5]["rejected"] = "co\u00adoperate \U0001F468\u200d\U0001F469"  # visible: kept as it is
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = tiny_cfg(preferences=[str(path)], prompts=[str(FIXTURES / "prompts.jsonl")])
    report = validate(preprocess(cfg, str(tmp_path / "out")), cfg)
    empty = [(i.location, i.field, i.message) for i in report.errors if i.kind == "empty_text"]
    assert empty == [
        (f"{path}:4", "chosen", "empty or whitespace-only text: only invisible characters (U+200B, U+200D, U+FEFF, "
                                "U+00AD) (write the text or remove the record)"),
        (f"{path}:5", "prompt", "empty or whitespace-only text: only invisible characters (U+2060) (write the "
                                "text or remove the record)"),
    ]
    assert not [i for i in report.errors if i.kind == "tie"]
    with pytest.raises(DataValidationError, match=re.escape(f"{path}:4: chosen: empty or whitespace-only text")):
        report.raise_if_errors("report.json")

    # Dropped instead, they are counted as empty texts; the visible text with a ZWJ and a soft hyphen stays.
    data = preprocess(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, drop_invalid_rows=True)),
                      str(tmp_path / "dropped"))
    c = data.counts
    assert c["preferences.dropped.empty_text"] == 2 and c["preferences.kept"] == 4
    assert c["preferences.read"] == c["preferences.kept"] + sum(v for k, v in c.items()
                                                                 if k.startswith("preferences.dropped."))
    assert "co\u00adoperate \U0001F468\u200d\U0001F469" in {r["rejected"] for r in data.pref_train + data.pref_eval}


def test_prompts_keep_their_end_and_responses_their_start():
    from rlhf_lightning.models.loading import load_tokenizer

    tok = load_tokenizer("tiny:llama")
    text = " ".join(f"filler{i}" for i in range(60)) + " So, what do you think of the cafe?"
    def fit_prompts(texts, max_tokens):  # single user messages
        convs, chats, lengths = fit_conversations(tok, [[{"role": "user", "content": t}] for t in texts], max_tokens)
        return [c[-1]["content"] for c in convs], chats, lengths

    (cut,), (chat,), (before,) = fit_prompts([text], 24)
    assert before > 24 and text.endswith(cut) and cut.endswith("of the cafe?")
    assert len(tok(chat, add_special_tokens=False)["input_ids"]) <= 24
    (short,), _ = fit_prompts(["Hi."], 24)[:2]
    assert short == "Hi."
    (resp,), (n,) = fit_responses(tok, [text], 10)
    assert n > 10 and text.startswith(resp) and len(tok(resp, add_special_tokens=False)["input_ids"]) <= 10


def test_split_by_prompt_never_shares_a_prompt_and_is_seeded():
    rows = [{"prompt": f"p{i % 10}", "source": f"f:{i}"} for i in range(40)]
    train, held = split_by_prompt(rows, 0.2, seed=3)
    assert len(train) + len(held) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in held}) == 2
    assert split_by_prompt(list(reversed(rows)), 0.2, seed=3)[1] == list(reversed(held))  # order-independent
    assert split_by_prompt(rows[:4], 0.2, seed=0)[1] and split_by_prompt(rows[:1], 0.5, seed=0)[1] == []


@pytest.fixture(scope="module")
def prepared_user_files(tmp_path_factory):
    """Preprocess of user files: the problem fixture plus a second file with cleaning cases, duplicates
    and over-long text; RL prompts without an eval file (so they are split)."""
    tmp = tmp_path_factory.mktemp("user")
    long_prompt = " ".join(f"filler{i}" for i in range(80)) + " Which cafe is best?"
    extra = [
        {"input_text": "Review a cafe\u0301.", "candidate_0": "Nice  place.", "candidate_1": "Bad\r\nplace.", "choice": 0},
        {"input_text": "Review a cafe\u0301.", "candidate_0": "Nice  place.", "candidate_1": "Bad\r\nplace.", "choice": 0},
        {"input_text": long_prompt, "candidate_0": "Short.", "candidate_1": " ".join(["words"] * 80), "choice": 1},
        {"input_text": "Cut makes a tie.", "candidate_0": "same " * 40 + "A", "candidate_1": "same " * 40 + "B", "choice": 0},
        {"input_text": "Review a quiet museum.", "candidate_0": "Grand.", "candidate_1": "Meh.", "choice": 0},
    ]
    write_records(tmp / "extra.csv", extra)
    cfg = tiny_cfg(preferences=[str(PROBLEMS), str(tmp / "extra.csv")], prompts=[str(FIXTURES / "prompts.jsonl")],
                   prompt_length=32, target_length=16, eval_fraction=0.25)
    return cfg, preprocess(cfg, str(tmp / "out")), long_prompt


def test_preprocess_counts_every_row_and_writes_parquet(prepared_user_files):
    cfg, data, long_prompt = prepared_user_files
    c = data.counts
    for role in ("preferences", "prompts"):
        dropped = sum(v for k, v in c.items() if k.startswith(f"{role}.dropped."))
        assert c[f"{role}.read"] == c[f"{role}.kept"] + dropped  # nothing lost silently
    assert c["preferences.read"] == 14 and c["preferences.dropped.invalid"] == 5
    assert c["preferences.dropped.duplicate"] == 1 and c["preferences.dropped.tie_after_truncation"] == 1
    assert c["preferences.changed.unicode_nfc"] == 2  # both copies, before the duplicate is dropped
    assert c["preferences.changed.line_endings"] == 2 and c["preferences.changed.spaces"] >= 3
    assert c["preferences.changed.truncated_prompt"] == 1 and c["preferences.changed.truncated_response"] >= 1
    assert (c["preferences.choice_0"], c["preferences.choice_1"]) == (6, 3)
    assert c["prompts.read"] == 6 and c["prompts.dropped.duplicate"] == 1 and c["prompts.kept"] == 5
    assert c["pref_train.rows"] + c["pref_eval.rows"] == c["preferences.kept"] == 7
    assert c["rl_prompts.rows"] + c["eval_prompts.rows"] == 5 and c["eval_prompts.rows"] >= 1

    cut = next(r for r in data.pref_train + data.pref_eval if r["prompt"].endswith("Which cafe is best?"))
    assert cut["prompt"] != long_prompt and long_prompt.endswith(cut["prompt"])
    assert any(r["prompt"] == "Review a café." and r["rejected"] == "Bad\nplace." for r in data.pref_train + data.pref_eval)
    assert not {r["prompt"] for r in data.pref_train} & {r["prompt"] for r in data.pref_eval}
    assert data.sources["preferences"] == [str(PROBLEMS), cfg.data.preferences[1]]
    assert [str(p) for p in data.problems] == [str(p) for p in read_preferences([str(PROBLEMS)]).problems]
    for name, rows in (("pref_train", data.pref_train), ("rl_prompts", data.rl_prompts), ("eval_prompts", data.eval_prompts)):
        stored = pq.read_table(data.files[name]).to_pylist()
        # A prompt row's `extra` columns (any JSON value) are stored as JSON text.
        assert [{**r, "extra": json.loads(r["extra"])} if "extra" in r else r for r in stored] == rows
    assert set(data.rl_prompts[0]) == {"prompt", "prompt_chat", "source", "messages", "extra"}
    assert data.rl_prompts[0]["prompt_chat"].startswith("<|im_start|>user\n")


def test_validate_reports_every_problem_with_its_location(prepared_user_files, tmp_path):
    cfg, data, _ = prepared_user_files
    report = validate(data, cfg)
    where = str(PROBLEMS)
    errors = locations(report.errors)
    assert errors[:6] == locations(data.problems)  # reading problems come first, all of them
    assert (f"{where}:8", "chosen") in errors  # a tie once cleaned ("same  answer" vs "same answer ")
    assert (f"{where}:9", "prompt") in errors  # whitespace-only prompt
    assert not report.ok
    messages = " | ".join(str(w) for w in report.warnings)
    extra = cfg.data.preferences[1]
    assert f"{extra}:2: record: duplicate (same text) of {extra}:1: dropped" in messages
    assert "data.target_length=16" in messages and "data.prompt_length=32" in messages
    # The cut rows are named: the long prompt (extra.csv record 3), the long responses (3, and 4 whose cut
    # made a tie).
    (cut_prompt,) = [w for w in report.warnings if w.kind == "truncated_prompt"]
    assert cut_prompt.message.endswith(f"; at {extra}:3")
    (cut_response,) = [w for w in report.warnings if w.kind == "truncated_response"]
    assert f"; at {extra}:3, {extra}:4" in cut_response.message
    assert "MOST ROWS WERE CUT" not in messages  # 2 of 8 pairs
    assert "also in" in messages  # "Review a quiet museum." is a preference prompt and an RL/eval prompt

    path = report.write_json(tmp_path / "report" / "validation.json")
    saved = json.loads(Path(path).read_text())
    assert saved["ok"] is False and len(saved["errors"]) == len(report.errors)
    assert saved["stats"]["rows"]["pref_train"] == len(data.pref_train)
    assert saved["stats"]["cut_rows"]["preferences.changed.truncated_prompt"] == [f"{extra}:3"]
    with pytest.raises(DataValidationError) as exc:
        report.raise_if_errors(path)
    text = str(exc.value)
    assert f"{where}:2: record: malformed JSON" in text and f"full report: {path}" in text
    assert len(text.splitlines()) <= 1 + 10 + 2  # header, first 10, "... and N more", path
    assert "| pref_train |" in report.markdown()


def test_most_rows_cut_is_said_first_and_loudly(tmp_path):
    from rlhf_lightning.data.validate import summary

    rows = [{"prompt": f"Review place {i}.", "chosen": "good " * 30, "rejected": "bad " * 30} for i in range(9)]
    rows.append({"prompt": "Review place 9.", "chosen": "Fine.", "rejected": "Bad."})
    path = write_records(tmp_path / "long.jsonl", rows)
    cfg = tiny_cfg(preferences=[str(path)], prompts=[str(path)], target_length=8)
    report = validate(preprocess(cfg, str(tmp_path / "out")), cfg)
    text = summary(report, "report.json")
    loud = [line for line in text.splitlines() if line.startswith("  !! ")]
    assert loud == [f"  !! MOST ROWS WERE CUT (90% of the preferences): 9 pair(s) had a response longer than "
                    f"data.target_length=8 tokens, cut keeping its start (raise data.target_length to keep them "
                    f"whole); at {path}:1, {path}:2, {path}:3, {path}:4, {path}:5 and 4 more (the report's "
                    "stats.cut_rows has them all)"]
    assert text.index("!! MOST ROWS") < text.index("warnings (")  # before the list many warnings may push it out of


def test_strict_turns_warnings_into_errors(prepared_user_files):
    cfg, data, _ = prepared_user_files
    loose = validate(data, cfg)
    strict = validate(data, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, strict=True)))
    assert strict.warnings == [] and len(strict.errors) == len(loose.errors) + len(loose.warnings)


def test_label_imbalance_and_contradictions_warn():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "source": "f:1"},
             {"prompt": "p", "chosen": "b", "rejected": "a", "source": "f:2"}]
    data = PreparedData(pref_train=pairs, pref_eval=[], rl_prompts=[], eval_prompts=[],
                        counts={"preferences.choice_0": 90, "preferences.choice_1": 10}, files={},
                        sources={"preferences": ["f"]})
    report = validate(data, tiny_cfg())
    warnings = {(w.location, w.field): w.message for w in report.warnings}
    assert "0 in 90 of 100 pairs" in warnings[("preferences (f)", "choice")]
    assert "labelled the other way at f:2" in warnings[("f:1", "chosen")]
    assert {i.location for i in report.errors} == {"pref_eval", "rl_prompts", "eval_prompts"}  # empty splits


def test_preprocess_requires_prompts_with_user_preferences():
    with pytest.raises(ConfigError, match="data.prompts: empty while data.preferences is set"):
        preprocess(tiny_cfg(preferences=[str(PROBLEMS)]), "unused")


def test_builtin_task_end_to_end(tmp_path):
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "data": {"builtin": {
        "n_preference_prompts": 16, "responses_per_prompt": 2, "n_rl_prompts": 8, "n_eval_prompts": 8,
        "max_new_tokens": 8, "output_dir": str(tmp_path / "builtin")}}})
    data = preprocess(cfg, str(tmp_path / "out"))
    c = data.counts
    assert c["preferences.read"] == 16 and c["prompts.read"] == 8 and c["eval_prompts.read"] == 8
    assert c["pref_train.rows"] + c["pref_eval.rows"] == c["preferences.kept"]
    assert (c["rl_prompts.rows"], c["eval_prompts.rows"]) == (8, 8)
    assert c["preferences.choice_0"] + c["preferences.choice_1"] == 16
    assert sorted(data.files) == ["eval_prompts", "pref_eval", "pref_train", "rl_prompts"]
    assert all(Path(p).exists() for p in data.files.values())
    assert data.sources["preferences"][0].endswith("preferences.jsonl")

    report = validate(data, cfg)
    assert not [w for w in report.warnings if "also in" in w.message]  # the task's prompt sets are disjoint
    assert report.stats["token_lengths"]["preferences.chosen"]["n"] == c["preferences.kept"]
    fig = report.histogram_figure()
    fig.savefig(tmp_path / "lengths.png")
    assert (tmp_path / "lengths.png").stat().st_size > 0
    assert report.markdown().startswith("### Data validation")


def test_builtin_task_ranks_several_responses_per_prompt(tmp_path):
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "data": {"builtin": {
        "n_preference_prompts": 12, "responses_per_prompt": 3, "n_rl_prompts": 4, "n_eval_prompts": 4,
        "max_new_tokens": 8, "output_dir": str(tmp_path / "builtin")}}})
    data = preprocess(cfg, str(tmp_path / "out"))
    assert data.counts["preferences.read"] == 12 * 3  # K(K-1)/2 = 3 pairs per prompt
    rows = [json.loads(line) for line in Path(data.sources["preferences"][0]).read_text().splitlines()]
    by_prompt = Counter(r["input_text"] for r in rows)
    assert len(by_prompt) == 12 and set(by_prompt.values()) == {3}
    # The three pairs of a prompt are the pairs of one ranking: consistent, never a cycle.
    for prompt in by_prompt:
        wins = Counter()
        for r in (r for r in rows if r["input_text"] == prompt):
            wins[r["candidate_0"] if r["choice"] == 0 else r["candidate_1"]] += 1
        assert sorted(wins.values()) == [1, 2]
    # A prompt's pairs stay on one side of the train/held-out split.
    train = {r["prompt"] for r in data.pref_train}
    assert train and not train & {r["prompt"] for r in data.pref_eval}
    stats = json.loads(Path(data.sources["preferences"][0]).with_name("stats.json").read_text())
    assert (stats["pairs"], stats["prompts"]) == (36, 12)
