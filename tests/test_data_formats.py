"""Every preference format from every file kind reaches the same canonical rows; bad input is reported
with its location and never loses the valid rows; the real HH harmless-base file; S3 through moto."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from datafiles import write_records
from rlhf_lightning.config import FieldMapping, from_dict
from rlhf_lightning.data import formats
from rlhf_lightning.data.formats import read_preferences, read_prompts, split_hh
from rlhf_lightning.data.preprocess import fit_conversations, preprocess
from rlhf_lightning.data.validate import validate

HH_FILE = Path(__file__).parents[2] / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"

TURNS = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
         {"role": "user", "content": "Another one?"}]
# The canonical rows every format below must produce: one single-turn pair, one multi-turn pair.
CANON = [
    {"prompt": "Review a small cafe.", "chosen": "Lovely coffee.", "rejected": "Cold and rude.", "messages": None},
    {"prompt": "User: Name a fruit.\n\nAssistant: An apple.\n\nUser: Another one?", "chosen": "A pear.",
     "rejected": "No.", "messages": TURNS},
]


def vertex_records() -> list[dict]:
    authors = [{"author": {"user": "user", "assistant": "model"}[m["role"]], "content": m["content"]} for m in TURNS]
    return [{"input_text": "Review a small cafe.", "candidate_0": "Cold and rude.", "candidate_1": "Lovely coffee.",
             "choice": 1},
            {"messages": authors, "candidate_0": "A pear.", "candidate_1": "No.", "choice": 0}]


def trl_records() -> list[dict]:
    return [{"prompt": "Review a small cafe.", "chosen": "Lovely coffee.", "rejected": "Cold and rude."},
            {"prompt": TURNS, "chosen": [{"role": "assistant", "content": "A pear."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]


def hh_records() -> list[dict]:
    one = "\n\nHuman: Review a small cafe.\n\nAssistant:"
    many = "\n\nHuman: Name a fruit.\n\nAssistant: An apple.\n\nHuman: Another one?\n\nAssistant:"
    return [{"chosen": one + " Lovely coffee.", "rejected": one + " Cold and rude."},
            {"chosen": many + " A pear.", "rejected": many + " No."}]


def mapping_records() -> list[dict]:
    return [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": i} for i, r in enumerate(trl_records())]


MAPPING = FieldMapping(prompt_key="question", chosen_key="good", rejected_key="bad")
RECORDS = {"vertex": vertex_records, "trl": trl_records, "hh": hh_records, "mapping": mapping_records}


def canon(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected", "messages")} for r in rows]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json.gz", "parquet", "csv", "csv.gz"])
@pytest.mark.parametrize("fmt", ["vertex", "trl", "hh", "mapping"])
def test_every_format_from_every_file_kind_reaches_the_same_rows(tmp_path, fmt, kind):
    records = RECORDS[fmt]()
    expected = CANON
    if kind.startswith("csv") and fmt != "hh":  # CSV cells are text: no message lists
        records, expected = records[:1], CANON[:1]
    if kind == "parquet" and fmt in ("trl", "mapping"):  # a Parquet column has one type: all conversational
        keys = list(records[0])[:3]
        records[0] = {keys[0]: [{"role": "user", "content": records[0][keys[0]]}],
                      **{k: [{"role": "assistant", "content": records[0][k]}] for k in keys[1:]}}
    path = write_records(tmp_path / f"p.{kind}", records)
    for setting in (["auto", fmt] if fmt != "mapping" else ["mapping"]):
        result = read_preferences([str(path)], fmt=setting, mapping=MAPPING)
        assert result.problems == []
        assert canon(result.rows) == expected
        assert [r["source"] for r in result.rows] == [f"{path}:{n}" for n in range(1, len(expected) + 1)]
        assert result.formats == {str(path): {fmt: len(expected)}}
        prompts = read_prompts([str(path)], fmt=setting, mapping=MAPPING)  # a preference file is a prompt file
        assert [(r["prompt"], r["messages"]) for r in prompts.rows] == [(r["prompt"], r["messages"]) for r in expected]


def test_prompt_only_formats_and_vertex_context(tmp_path):
    path = write_records(tmp_path / "p.jsonl", [{"prompt": "Hi."}, {"prompt": "Hello."}])
    assert [r["prompt"] for r in read_prompts([str(path)]).rows] == ["Hi.", "Hello."]
    path = write_records(tmp_path / "v.jsonl", [{"input_text": "Hi.", "context": "Be brief."},
                                         {"messages": [{"author": "user", "content": "Hey."}]}])
    rows = read_prompts([str(path)]).rows
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
    assert rows[0]["prompt"] == "System: Be brief.\n\nUser: Hi."
    assert rows[1] == {"prompt": "Hey.", "messages": None, "source": f"{path}:2", "extra": {}}


def locs(result) -> list[tuple[str, str, str]]:
    return [(p.location.rsplit(":", 1)[-1], p.field, p.kind) for p in result.problems]


def test_bad_records_of_every_class_are_located_and_valid_rows_kept(tmp_path):
    good = vertex_records()[0]
    lines = [
        json.dumps(good),                                                                        # 1 ok
        '{"input_text": "cut off", "candidate_0": "a"',                                          # 2 malformed
        json.dumps({"input_text": "x", "candidate_0": "a", "candidate_1": "b"}),                 # 3 no choice
        json.dumps({"input_text": "x", "candidate_0": "a", "candidate_1": 5, "choice": 0}),      # 4 wrong type
        json.dumps({"input_text": "x", "candidate_0": "a", "candidate_1": "b", "choice": "1"}),  # 5 choice "1"
        json.dumps({"messages": [{"author": "bot", "content": "x"}], "candidate_0": "a",
                    "candidate_1": "b", "choice": 0}),                                           # 6 bad author
        json.dumps({"messages": [{"author": "user", "content": "x"}, {"author": "model", "content": "y"}],
                    "candidate_0": "a", "candidate_1": "b", "choice": 0}),                       # 7 ends with model
        json.dumps({"input_text": "x", "messages": [], "candidate_0": "a", "candidate_1": "b",
                    "choice": 0}),                                                               # 8 both
        json.dumps({"prompt": "a TRL record", "chosen": "a", "rejected": "b"}),                  # 9 mixed
        json.dumps({"question": "?", "answer": "!"}),                                            # 10 no format
        json.dumps(dict(good, input_text="second good")),                                       # 11 ok
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = read_preferences([str(path)])
    assert locs(result) == [
        ("2", "record", "malformed_json"), ("3", "choice", "missing_field"), ("4", "candidate_1", "wrong_type"),
        ("5", "choice", "bad_choice"), ("6", "messages[0].author", "invalid_role"),
        ("7", "messages[1]", "invalid_role"), ("8", "messages", "ambiguous"), ("9", "record", "mixed_formats"),
        ("10", "record", "no_format"),
    ]
    text = [str(p) for p in result.problems]
    assert "invalid role 'bot' (use one of ['model', 'user'])" in text[4]
    assert "a TRL record in a file read as Vertex (from record 1): one format per file" in text[7]
    assert [r["source"] for r in result.rows] == [f"{path}:1", f"{path}:11"]
    assert result.formats == {str(path): {"vertex": 8, "trl": 1, "none": 1}}

    trl = write_records(tmp_path / "t.jsonl", [
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "chosen": "a",
         "rejected": "b"},
        {"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"prompt": "x", "chosen": "a"},
    ])
    assert locs(read_preferences([str(trl)])) == [
        ("1", "prompt[0].role", "invalid_role"), ("2", "prompt[1]", "invalid_role"), ("2", "prompt[1]", "invalid_role"),
        ("3", "chosen", "invalid_role"), ("4", "rejected", "missing_field")]


def test_openai_messages_prompts_read_like_vertex_ones(tmp_path):
    """{"messages": [{"role", "content"}]}: the shape `serve`, `infer` and OpenAI's chat format use."""
    path = write_records(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hey."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, *TURNS]},
        {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
    ])
    result = read_prompts([str(path)])
    # A conversation that ends with the answer (a chat set, as UltraChat publishes it) prompts for its last
    # user turn: cut back to it, and counted.
    assert [(r["prompt"], r["messages"]) for r in result.rows] == [
        ("Hey.", None), ("System: Be brief.\n\n" + CANON[1]["prompt"], [{"role": "system", "content": "Be brief."}, *TURNS]),
        ("Hi.", None)]
    assert result.problems == [] and result.changed == {"answer_turns_removed": 1}
    # As a preference's prompt it stays an error: the candidates must answer the user's last turn.
    prefs = write_records(tmp_path / "prefs.jsonl", [{"messages": [{"role": "user", "content": "Hi."},
                                                                   {"role": "assistant", "content": "Hello."}],
                                                      "candidate_0": "a", "candidate_1": "b", "choice": 0}])
    result = read_preferences([str(prefs)])
    assert locs(result) == [("1", "messages[1]", "invalid_role")]
    assert "the last turn of a prompt must be the user's" in str(result.problems[0])


def test_semicolon_and_tab_csv_files_are_sniffed(tmp_path):
    rows = [{"prompt": "Review a cafe; briefly.", "chosen": "Lovely, warm.", "rejected": "Cold."},
            {"prompt": "Review a park.", "chosen": "Green.", "rejected": "Dirty; noisy."}]
    for sep, name in ((";", "semi.csv"), ("\t", "tab.csv"), (",", "comma.csv")):
        path = tmp_path / name
        pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
        result = read_preferences([str(path)])
        assert result.problems == [], name
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in result.rows] == \
            [(r["prompt"], r["chosen"], r["rejected"]) for r in rows], name
    assert formats.csv_delimiter("prompt;chosen;rejected") == ";"
    assert formats.csv_delimiter("prompt") == ","  # one column: nothing to sniff, the default


def test_a_json_array_saved_as_jsonl_is_one_error(tmp_path):
    records = trl_records()[:1] * 3
    for text in (json.dumps(records), json.dumps(records, indent=2)):
        path = tmp_path / "array.jsonl"
        path.write_text(text)
        result = read_preferences([str(path)])
        assert len(result.problems) == 1 and result.rows == []
        problem = result.problems[0]
        assert problem.location == f"{path}:1" and problem.kind == "json_array_in_jsonl"
        assert "one JSON array, not JSON Lines (rename the file to .json" in problem.message


def test_a_misspelt_key_is_named_with_the_key_it_misspells(tmp_path):
    good = trl_records()[0]
    path = write_records(tmp_path / "typo.jsonl", [
        good,
        {"Prompt": "Review a park.", "chosen": "Green.", "rejected": "Dirty."},      # 2: read as HH before
        {"prompt": "Review a zoo.", "chosen": "Fun.", "rejectd": "Smelly."},         # 3
        {"prompt": "Review a bar.", "chosen": "Cosy.", "rejected": "Loud.", "Id": 7},  # 4: an extra key is fine
    ])
    result = read_preferences([str(path)])
    assert locs(result) == [("2", "Prompt", "misspelt_key"), ("3", "rejectd", "misspelt_key")]
    assert "unknown key 'Prompt': did you mean 'prompt'? (keys are case-sensitive" in str(result.problems[0])
    assert [r["source"] for r in result.rows] == [f"{path}:1", f"{path}:4"]
    assert result.formats == {str(path): {"trl": 2, "none": 2}}  # not "1 hh": it is a TRL record misspelt
    # The first record decides nothing when it is the misspelt one.
    first = write_records(tmp_path / "first.jsonl", [{"Prompt": "a", "chosen": "b", "rejected": "c"}, good])
    assert locs(read_preferences([str(first)])) == [("1", "Prompt", "misspelt_key")]
    # Columns too.
    csv = tmp_path / "typo.csv"
    pd.DataFrame([{"Prompt": "a", "chosen": "b", "rejected": "c"}]).to_csv(csv, index=False)
    (problem,) = read_preferences([str(csv)]).problems
    assert "did you mean 'prompt'" in problem.message
    csv.write_text("Prompt,Chosen,rejected\na,b,c\n")  # no format at all: the file-level error says it
    (problem,) = read_preferences([str(csv)]).problems
    assert "did you mean 'prompt' for 'Prompt'?" in problem.message and problem.kind == "no_format"


def test_bom_one_megabyte_lines_and_explicit_format(tmp_path):
    big = "word " * 210_000  # ~1 MB of text in one line
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(trl_records()[0]).encode() + b"\n"
                     + json.dumps({"prompt": big, "chosen": "a", "rejected": "b"}).encode() + b"\n"
                     + b'{"prompt": "' + big.encode() + b'\n'  # a 1 MB line cut off before its end
                     + json.dumps({"prompt": "last", "chosen": "a", "rejected": "b"}).encode() + b"\n")
    result = read_preferences([str(path)])
    assert [r["source"] for r in result.rows] == [f"{path}:{n}" for n in (1, 2, 4)]
    (problem,) = result.problems
    assert problem.location == f"{path}:3" and len(str(problem)) < 300  # located, and not 1 MB long
    assert "of a 1050012-character line" in problem.message
    for kind in ("csv", "json"):
        bom = tmp_path / f"bom.{kind}"
        write_records(bom, trl_records()[:1])
        bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
        assert canon(read_preferences([str(bom)]).rows) == CANON[:1]
    # An explicit format reads every record as that format: no guessing, precise missing fields.
    vertex = write_records(tmp_path / "v.jsonl", vertex_records()[:1])
    assert locs(read_preferences([str(vertex)], fmt="trl")) == [("1", "prompt", "missing_field"),
                                                                 ("1", "chosen", "missing_field"),
                                                                 ("1", "rejected", "missing_field")]


def test_hh_split_at_the_last_shared_assistant_turn():
    problems: list = []
    turns, chosen, rejected = split_hh("\n\nHuman: Hi\n\nAssistant: Hello there", "\n\nHuman: Hi\n\nAssistant: Hey", "f:1", problems)
    assert (turns, chosen, rejected, problems) == ([{"role": "user", "content": "Hi"}], "Hello there", "Hey", [])
    # Parting inside an earlier turn: the chosen transcript goes on, so the two answer different conversations.
    assert split_hh("\n\nHuman: Hi\n\nAssistant: A\n\nHuman: more\n\nAssistant: B", "\n\nHuman: Hi\n\nAssistant: C",
                    "f:2", problems) is None
    assert split_hh("\n\nHuman: Hi", "\n\nHuman: Yo\n\nAssistant: B", "f:3", problems) is None
    assert [(p.location, p.field, p.kind) for p in problems] == [("f:2", "chosen", "no_shared_prompt"),
                                                                  ("f:3", "record", "no_shared_prompt")]
    assert "goes on for 2 more turn(s)" in problems[0].message


def tiny_cfg(**data):
    return from_dict({"policy": {"model": "tiny:llama"}, "data": data})


def test_conversations_render_every_turn_and_lose_leading_turns_first():
    from rlhf_lightning.models.loading import load_tokenizer

    tok = load_tokenizer("tiny:llama")
    long = [{"role": "user", "content": "filler " * 40}, {"role": "assistant", "content": "ok " * 10}] + TURNS
    (whole, cut), (chat_whole, chat_cut), (n_whole, n_cut) = fit_conversations(tok, [TURNS, long], 64)
    assert whole == TURNS and chat_whole.count("<|im_start|>") == 4  # 3 turns + the generation prompt
    assert n_whole <= 64 < n_cut and cut == TURNS  # the two leading turns went, whole
    assert len(tok(chat_cut, add_special_tokens=False)["input_ids"]) <= 64


@pytest.mark.skipif(not HH_FILE.exists(), reason="the shared HH file is not beside the repository")
def test_real_hh_harmless_base_file_is_reported_as_it_really_is(tmp_path):
    result = read_preferences([str(HH_FILE)])
    assert (result.records, len(result.rows)) == (2312, 2307) and result.formats == {str(HH_FILE): {"hh": 2312}}
    # Five pairs part before the last turn: one transcript goes on with more turns.
    assert [(p.location.rsplit(":", 1)[1], p.field, p.kind) for p in result.problems] == [
        ("1255", "chosen", "no_shared_prompt"), ("1689", "chosen", "no_shared_prompt"),
        ("1951", "rejected", "no_shared_prompt"), ("1953", "chosen", "no_shared_prompt"),
        ("2037", "chosen", "no_shared_prompt")]

    cfg = tiny_cfg(preferences=[str(HH_FILE)], prompts=[str(HH_FILE)], prompt_length=128, target_length=64)
    report = validate(preprocess(cfg, str(tmp_path)), cfg)
    lines = lambda kind, issues: sorted(int(i.location.rsplit(":", 1)[1]) for i in issues if i.kind == kind)  # noqa: E731
    assert lines("no_shared_prompt", report.errors) == [1255, 1689, 1951, 1953, 2037]  # once, not per role
    assert lines("empty_text", report.errors) == [87, 517, 926, 1104]  # empty chosen responses
    assert report.stats["errors_by_kind"] == {"no_shared_prompt": 5, "empty_text": 4}  # no ties in this file
    assert lines("same_role_twice", report.warnings) == [668, 764, 1320, 1850]
    assert lines("duplicate", report.warnings) == [1453, 1484]  # prompts asked twice (as RL prompts)
    assert len({i.location for i in report.warnings if i.kind == "speaker_in_response"}) == 32
    md = report.markdown()  # the card: tables of formats, counts by reason, problems by kind, lengths
    assert "| no_shared_prompt | 5 | 0 |" in md and "| empty_text | 4 | 0 |" in md and "hh: 2312" in md
    assert "| preferences | 2312 | 2307 | invalid 5 |" in md
    assert "over the limit" in report.histogram_figure().axes[0].get_title()

    dropped = validate(preprocess(cfg := tiny_cfg(preferences=[str(HH_FILE)], prompts=[str(HH_FILE)],
                                                  drop_invalid_rows=True), str(tmp_path)), cfg)
    assert dropped.ok and dropped.stats["warnings_by_kind"]["no_shared_prompt"] == 5
    c = dropped.stats["counts"]
    assert (c["preferences.dropped.invalid"], c["preferences.dropped.empty_text"], c["preferences.kept"]) == (5, 4, 2303)


# -------------------------------------------------------------------------------------------------- S3


def test_s3_objects_read_like_local_files(s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="prefs")
    for name, fmt in (("a.jsonl.gz", "hh"), ("b.parquet", "vertex")):
        s3.upload_file(str(write_records(tmp_path / name, RECORDS[fmt]())), "prefs", f"data/{name}")
    result = read_preferences(["s3://prefs/data/*", "s3://prefs/data/missing.jsonl", "s3://nobucket/x.jsonl"])
    assert canon(result.rows) == CANON + CANON
    assert result.files == ["s3://prefs/data/a.jsonl.gz", "s3://prefs/data/b.parquet"]
    assert result.rows[0]["source"] == "s3://prefs/data/a.jsonl.gz:1"
    assert [(p.location, p.kind) for p in result.problems] == [("s3://prefs/data/missing.jsonl", "file"),
                                                               ("s3://nobucket/x.jsonl", "file")]
    assert "not found on S3" in result.problems[0].message


def test_hf_ids_parse_into_load_dataset_arguments():
    assert formats.parse_hf_id("hf:Anthropic/hh-rlhf@harmless-base:test") == ("Anthropic/hh-rlhf", "harmless-base", "test")
    assert formats.parse_hf_id("hf:trl-lib/ultrafeedback_binarized") == ("trl-lib/ultrafeedback_binarized", None, "train")
