"""`python -m rlhf_lightning validate`: exit 0 valid, 1 invalid (with the report), 2 usage; never a traceback.
Run as real subprocesses, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_lightning", "validate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_validate_command_exit_codes_and_report(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text('policy: {model: "tiny:llama"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."}) + "\n"
                            for i in range(6)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Other question {i}?"}) + "\n" for i in range(4)))

    ok = run("--config", str(cfg), "--preferences", str(good), "--prompts", str(prompts), "--report",
             str(tmp_path / "ok.json"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("data ok: 0 error(s)") and f"{good}: 6 trl" in ok.stdout
    assert json.loads((tmp_path / "ok.json").read_text())["ok"] is True
    assert ok.stdout.rstrip().endswith(f"config: {cfg}")
    # Without --config, from anywhere: the default run's config (configs/default.yaml equals the defaults).
    for where in (REPO, tmp_path):
        default = run("--preferences", str(good), "--prompts", str(prompts), "--report", str(tmp_path / "d.json"),
                      cwd=where)
        assert default.returncode == 0 and default.stdout.rstrip().endswith("config: the default run (name another "
                                                                            "with --config)")

    # Bad rows, a missing file and an empty file in one call: every problem located, the report written.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = run("--config", str(cfg), "--preferences", str(FIXTURES / "preferences_with_problems.jsonl"),
              str(tmp_path / "missing.jsonl"), str(empty), "--prompts", str(prompts), "--report",
              str(tmp_path / "bad.json"), cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stdout + bad.stderr
    assert "data INVALID" in bad.stdout and f"report: {tmp_path / 'bad.json'}" in bad.stdout
    assert f"{FIXTURES / 'preferences_with_problems.jsonl'}:2: record: malformed JSON" in bad.stdout
    report = json.loads((tmp_path / "bad.json").read_text())
    located = {(e["location"], e["kind"]) for e in report["errors"]}
    assert (str(tmp_path / "missing.jsonl"), "file") in located and (str(empty), "empty_file") in located
    assert report["stats"]["counts"]["preferences.read"] == 9  # the fixture's records, every one counted

    # --strict turns the leakage warning into an error; usage errors exit 2.
    strict = run("--config", str(cfg), "--preferences", str(good), "--prompts", str(good), "--strict",
                 "--report", str(tmp_path / "strict.json"), cwd=tmp_path)
    assert strict.returncode == 1 and "leakage" in strict.stdout
    usage = run("--prompts", str(prompts), cwd=tmp_path)
    assert usage.returncode == 2 and "the following arguments are required: --preferences" in usage.stderr
    bad_cfg = run("--config", str(tmp_path / "nope.yaml"), "--preferences", str(good), "--prompts", str(prompts),
                  cwd=tmp_path)
    assert bad_cfg.returncode == 2 and "file not found" in bad_cfg.stderr and "Traceback" not in bad_cfg.stderr


def test_validate_command_reports_an_invisible_only_response_as_empty(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text('policy: {model: "tiny:llama"}\n')
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(6)]
    rows[2]["chosen"] = "\u200b\u200d\ufeff\u00ad"  # zero-width space and joiner, byte-order mark, soft hyphen
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Other question {i}?"}) + "\n" for i in range(4)))

    bad = run("--config", str(cfg), "--preferences", str(prefs), "--prompts", str(prompts), "--report",
              str(tmp_path / "bad.json"), cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stdout + bad.stderr
    assert "data INVALID" in bad.stdout
    assert (f"{prefs}:3: chosen: empty or whitespace-only text: only invisible characters (U+200B, U+200D, U+FEFF, "
            "U+00AD) (write the text or remove the record)") in bad.stdout
    errors = json.loads((tmp_path / "bad.json").read_text())["errors"]
    assert [(e["location"], e["field"], e["kind"]) for e in errors] == [(f"{prefs}:3", "chosen", "empty_text")]
