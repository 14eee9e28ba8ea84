"""Validate Inputs: check the prepared datasets and say precisely what is wrong, where and how to fix it.

Errors (the run stops): files and records that could not be read or parsed (from :mod:`.formats`:
unreadable or empty file, malformed line, missing or wrongly typed field, ``choice`` not 0/1, a label
the mapping does not know, invalid message roles, transcripts or conversations that do not share a
prompt, a ``prompt`` that disagrees with its conversations, a record in no or another format: that one
shows the mapping to write), empty or whitespace-only text (zero-width, control and format characters count
as whitespace: see :func:`.text.is_blank`), ties (``chosen == rejected``), an empty split.
Neither: pairs the data itself leaves undecided (a ``tie`` label, equal scores or ranks) are dropped and
counted by reason, per file, beside what each file was read as and the pairs its records gave.
Warnings: rows dropped as exact or normalised duplicates (each with the row kept), rows cut to the length
limits, ties/duplicates created by the cut, a label imbalance of the raw ``choice`` too large for chance,
pairs labelled both ways, conversations with two turns in a row from the same role, responses that
contain a speaker label (``Human:``: the response writes the user's next turn itself), and prompts
shared between sets (reward-model train/eval pairs, RL prompts, evaluation prompts).
With ``data.strict`` every warning is an error.

Every :class:`Issue` has a ``kind``; the report counts them by kind.

Row problems point at ``file:line`` of the input record and name the canonical field (``prompt``,
``chosen``, ``rejected``); reading problems name the field as it appears in the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rlhf_lightning.config import SOURCE_ROLES, RLHFConfig
from rlhf_lightning.data.formats import DataError, Issue
from rlhf_lightning.data.preprocess import SPLITS, PreparedData, row_problems

SHOWN = 10  # problems listed in exception messages and the card; the JSON report has them all
SHOWN_ROWS = 5  # rows named in a warning about many rows
LOUD = "MOST ROWS WERE CUT"  # heads the truncation warnings that concern more than half of a role's rows

# Why a prompt shared between two sets matters, per pair of sets.
LEAKS = {
    ("pref_train", "pref_eval"): "the reward model's eval accuracy is overstated",
    ("pref_train", "eval_prompts"): "the policy is evaluated on prompts its reward model was trained on",
    ("pref_eval", "eval_prompts"): "reward-model eval pairs and policy eval prompts are not independent",
    ("rl_prompts", "eval_prompts"): "the policy is evaluated on prompts it was trained on",
    ("pref_train", "rl_prompts"): "PPO optimises on prompts whose pairs the reward model memorised",
    ("pref_eval", "rl_prompts"): "PPO trains on the reward model's held-out prompts",
}


class DataValidationError(DataError):
    """Validation found errors; the message lists the first of them and the report's path."""


@dataclass
class ValidationReport:
    """What validation found. `errors` stop the run; `warnings` are reported."""

    errors: list[Issue]
    warnings: list[Issue]
    stats: dict
    """Row counts per split, preprocessing counts, raw labels, token-length quantiles per field."""
    lengths: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """Token lengths per field before cutting (for the histograms; not written to JSON)."""
    limits: dict[str, int] = field(default_factory=dict)
    """The length limits the histograms mark: prompt (with template) and response tokens."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "errors": [asdict(i) for i in self.errors],
                "warnings": [asdict(i) for i in self.warnings], "stats": self.stats}

    def write_json(self, path: str | Path) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        return str(path)

    def markdown(self) -> str:
        """A summary for a Metaflow card: verdict, rows per split, formats read, counts by reason,
        problems by kind, token lengths, first problems."""
        st = self.stats
        verdict = "passed" if self.ok else "FAILED"
        lines = [f"### Data validation {verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
                 + (" (strict: warnings count as errors)" if st.get("strict") else ""), "",
                 "| split | rows |", "|---|---:|"]
        lines += [f"| {name} | {n} |" for name, n in st["rows"].items()]
        formats = [(role, path, n) for role, files in st.get("formats", {}).items() for path, n in files.items()]
        if formats:
            lines += ["", "| role | file | records per detected format | read as | rows made | dropped, changed |",
                      "|---|---|---|---|---|---|"]
            for role, path, n in formats:
                layout = st.get("layouts", {}).get(role, {}).get(path, {})
                lines.append(f"| {role} | `{path}` | {', '.join(f'{k}: {v}' for k, v in n.items()) or 'none read'} | "
                             f"{layout.get('read_as', '')} | {_made(role, layout)} | {_by_reason(layout) or '-'} |")
        lines += ["", "| role | read | kept | dropped (by reason) | changed (by reason) |", "|---|---:|---:|---|---|"]
        counts = st["counts"]
        for role in SOURCE_ROLES:
            if f"{role}.read" not in counts:
                continue
            by = {kind: ", ".join(f"{k.split('.', 2)[2]} {v}" for k, v in counts.items()
                                  if k.startswith(f"{role}.{kind}.") and v) or "-" for kind in ("dropped", "changed")}
            lines.append(f"| {role} | {counts[f'{role}.read']} | {counts.get(f'{role}.kept', 0)} | {by['dropped']} | "
                         f"{by['changed']} |")
        kinds = sorted(set(st["errors_by_kind"]) | set(st["warnings_by_kind"]))
        if kinds:
            lines += ["", "| problem | errors | warnings |", "|---|---:|---:|"]
            lines += [f"| {k} | {st['errors_by_kind'].get(k, 0)} | {st['warnings_by_kind'].get(k, 0)} |" for k in kinds]
        lines += ["", "| tokens before cutting | rows | p50 | p90 | max | limit | over limit |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, q in st["token_lengths"].items():
            if q["n"]:
                limit = self.limits.get(_length_kind(name))
                over = sum(v > limit for v in self.lengths.get(name, [])) if limit else ""
                lines.append(f"| {name} | {q['n']} | {q['p50']:.0f} | {q['p90']:.0f} | {q['max']} | "
                             f"{limit or ''} | {over} |")
        for title, issues in (("Errors", self.errors), ("Warnings", self.warnings)):
            if issues:
                lines += ["", f"**{title}** ({min(len(issues), SHOWN)} of {len(issues)} shown; all in the JSON report)", ""]
                lines += [_md_issue(i) for i in issues[:SHOWN]]
        return "\n".join(lines)

    def histogram_figure(self):
        """Histograms of prompt (with chat template) and response token lengths per set, before cutting,
        the limits marked and the share of rows over them in the titles."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend in a step

        fig = Figure(figsize=(11, 3.8), layout="constrained")
        for ax, kind, title in zip(fig.subplots(1, 2), ("prompt", "response"),
                                   ("prompt tokens with chat template", "response tokens")):
            limit, n, over = self.limits.get(kind), 0, 0
            values_all = [v for name, values in self.lengths.items() if _length_kind(name) == kind for v in values]
            top = max(values_all + [limit or 1])
            bins = np.linspace(0, top + 1, 41)  # shared bins: the sets compare bar for bar
            for name, values in self.lengths.items():
                if _length_kind(name) == kind and values:
                    ax.hist(values, bins=bins, alpha=0.5, label=f"{name} ({len(values)})")
                    n += len(values)
                    over += sum(v > limit for v in values) if limit else 0
            if limit:
                ax.axvline(limit, color="black", linestyle="--", label=f"limit {limit}")
                title += f": {over} of {n} over the limit, cut"
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("tokens (before cutting)")
            ax.set_ylabel("rows")
            if n:
                ax.legend(fontsize="small")
        return fig

    def raise_if_errors(self, report_path: str | Path) -> None:
        """Raise :class:`DataValidationError` listing the first errors and where the full report is
        (write it first with :meth:`write_json`)."""
        if self.ok:
            return
        shown = "\n".join(f"  {issue}" for issue in self.errors[:SHOWN])
        more = f"\n  ... and {len(self.errors) - SHOWN} more" if len(self.errors) > SHOWN else ""
        raise DataValidationError(f"data validation failed with {len(self.errors)} error(s):\n{shown}{more}\n"
                                  f"full report: {report_path}")


def summary(report: ValidationReport, path: str) -> str:
    """Plain-text verdict for a terminal: counts, formats read, rows per split, first problems, report path."""
    st = report.stats
    verdict = "data ok" if report.ok else "data INVALID"
    lines = [f"{verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
             + (" (strict: warnings count as errors)" if st["strict"] else "")]
    for role, files in st["formats"].items():
        for file, n in files.items():
            layout = st.get("layouts", {}).get(role, {}).get(file, {})
            read_as = f" -- read as {layout['read_as']}: {_made(role, layout)}" if layout.get("read_as") else ""
            by = _by_reason(layout)
            lines.append(f"  {role}: {file}: " + (", ".join(f"{v} {k}" for k, v in n.items()) or "nothing read")
                         + read_as + (f"; {by}" if by else ""))
    lines.append("  rows: " + ", ".join(f"{name} {n}" for name, n in st["rows"].items()))
    # First, whatever many warnings would hide: the data being mostly cut changes what training sees.
    lines += [f"  !! {issue.message}" for issue in report.warnings if issue.message.startswith(LOUD)]
    for title, issues in (("errors", report.errors), ("warnings", report.warnings)):
        if issues:
            kinds = ", ".join(f"{k} {v}" for k, v in st[f"{title}_by_kind"].items())
            lines.append(f"{title} ({kinds}), first {min(SHOWN, len(issues))}:")
            lines += [f"  {issue}" for issue in issues[:SHOWN]]
    lines.append(f"report: {path}")
    return "\n".join(lines)


def _md_issue(issue: Issue) -> str:
    """A list item; a message that ends in a config stanza (the mapping to write) shows it as YAML."""
    head, _, stanza = issue.message.partition("\n")
    text = f"- `{issue.location}` {issue.field + ': ' if issue.field else ''}{head}"
    if stanza:
        text += "\n\n  ```yaml\n" + "\n".join(f"  {line}" for line in stanza.splitlines()) + "\n  ```"
    return text


def _made(role: str, layout: dict) -> str:
    """``"21 pairs (7 per record)"``: the rows a file's records gave."""
    if not layout:
        return ""
    n, per = layout.get("pairs", 0), layout.get("pairs_per_record", {})
    what = "pairs" if role == "preferences" else "prompts"
    if role != "preferences" or not per:
        return f"{n} {what}"
    counts = sorted(int(k) for k in per)
    valid = sum(per.values())
    how = f"{counts[0]} per record" if len(counts) == 1 else \
        f"{counts[0]}-{counts[-1]} per record, {n / max(valid, 1):.1f} on average"
    return f"{n} {what} ({how})"


def _by_reason(layout: dict) -> str:
    """What the layout dropped (ties) and changed, by reason."""
    parts = []
    for kind in ("dropped", "changed"):
        by = ", ".join(f"{k} {v}" for k, v in layout.get(kind, {}).items() if v)
        parts += [f"{kind} {by}"] if by else []
    return "; ".join(parts)


def _length_kind(name: str) -> str:
    return "prompt" if name.endswith("prompt_chat") else "response"


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": len(values), "min": int(a.min()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": int(a.max()), "mean": float(a.mean())}


def _role_where(data: PreparedData, role: str) -> str:
    files = data.sources.get(role, [])
    if not files:
        return role
    return f"{role} ({files[0]}{f' and {len(files) - 1} more' if len(files) > 1 else ''})"


def check_rows(data: PreparedData) -> list[Issue]:
    """Errors of single prepared rows at their source location: empty text and ties
    (:func:`~.preprocess.row_problems`)."""
    return [issue for row in data.pref_train + data.pref_eval + data.rl_prompts + data.eval_prompts
            for issue in row_problems(row)]


def _unique(issues: list[Issue]) -> list[Issue]:
    """Each issue once: a file read both as preferences and as prompts reports its problems once."""
    return list(dict.fromkeys(issues))


def check_splits(data: PreparedData, cfg: RLHFConfig) -> list[Issue]:
    """An empty split the run needs is an error (the preference pairs only where a reward model is trained)."""
    fixes = {
        "pref_train": "no preference pairs to train on (check data.preferences and the read/dropped counts)",
        "pref_eval": "no held-out preference pairs (the split by prompt needs at least 2 distinct prompts)",
        "rl_prompts": "no RL prompts (check data.prompts and the read/dropped counts)",
        "eval_prompts": "no evaluation prompts (check data.eval_prompts, or give more RL prompts to split)",
    }
    if not cfg.trains_reward_model:  # a published reward model is measured on held-out pairs where there are some
        fixes = {k: v for k, v in fixes.items() if not k.startswith("pref")}
    return [Issue(name, "", fix, "empty_split") for name, fix in fixes.items() if not getattr(data, name)]


def check_reward_columns(data: PreparedData, cfg: RLHFConfig) -> list[Issue]:
    """Every prompt row must carry the columns the reward functions need (their parameters without a
    default). Loading the functions here also stops a run whose functions cannot be imported before any
    training."""
    if not cfg.reward.functions:
        return []
    from rlhf_lightning.models.rewards import RewardFunction, column_problems

    functions = [RewardFunction.load(f) for f in cfg.reward.functions]
    return [Issue(role, "extra", problem, "missing_column")
            for role, rows in (("rl_prompts", data.rl_prompts), ("eval_prompts", data.eval_prompts))
            for problem in column_problems(functions, rows, role)]


def check_counts(data: PreparedData, cfg: RLHFConfig) -> list[Issue]:
    """Warnings about rows preprocessing dropped or cut (each counted there)."""
    d, c, out = cfg.data, data.counts, []
    messages = {  # duplicates are reported one by one, from data.notes
        "dropped.duplicate_after_truncation": "{n} row(s) became identical to another once cut to the token limits "
                                              "and were dropped (raise data.prompt_length/data.target_length)",
        "dropped.tie_after_truncation": f"{{n}} pair(s) whose candidates differ only after data.target_length="
                                        f"{d.target_length} tokens were dropped (raise data.target_length)",
        "changed.truncated_prompt": f"{{n}} prompt(s) longer than data.prompt_length={d.prompt_length} tokens "
                                    "(with the chat template) were cut, keeping their end (raise data.prompt_length "
                                    "to keep them whole)",
        "changed.truncated_response": f"{{n}} pair(s) had a response longer than data.target_length="
                                      f"{d.target_length} tokens, cut keeping its start (raise data.target_length "
                                      "to keep them whole)",
    }
    for role in SOURCE_ROLES:
        for key, message in messages.items():
            n = c.get(f"{role}.{key}", 0)
            if not n:
                continue
            rows = data.where.get(f"{role}.{key}", [])
            text = message.format(n=n)
            if rows:
                more = f" and {len(rows) - SHOWN_ROWS} more (the report's stats.cut_rows has them all)" \
                    if len(rows) > SHOWN_ROWS else ""
                text += f"; at {', '.join(rows[:SHOWN_ROWS])}{more}"
            share = n / max(c.get(f"{role}.kept", 0) + c.get(f"{role}.dropped.tie_after_truncation", 0), 1)
            if share > 0.5 and key.startswith("changed."):
                text = f"{LOUD} ({min(share, 1):.0%} of the {role}): {text}"
            out.append(Issue(_role_where(data, role), "", text, key.split(".")[1]))
    return out


def check_labels(data: PreparedData) -> list[Issue]:
    """Warn when one `choice` value dominates beyond chance: the reward model never sees the order, but
    such a skew usually means position bias of the annotators or a broken export."""
    c0, c1 = data.counts.get("preferences.choice_0", 0), data.counts.get("preferences.choice_1", 0)
    n = c0 + c1
    if not n:
        return []
    major, label = max((c0, 0), (c1, 1))
    z = (major - n / 2) / math.sqrt(n / 4)  # standard deviations from a fair coin
    if major / n > 0.6 and z > 3:
        return [Issue(_role_where(data, "preferences"), "choice",
                      f"{label} in {major} of {n} pairs ({major / n:.0%}, {z:.1f} standard deviations from 50%) "
                      "(check the annotation for position bias and the export for a fixed candidate order)",
                      "label_imbalance")]
    return []


def check_contradictions(data: PreparedData) -> list[Issue]:
    """Warn about pairs labelled both ways (same prompt, chosen and rejected swapped): they cancel out."""
    first: dict[tuple[str, str, str], str] = {}
    for row in data.pref_train + data.pref_eval:
        first.setdefault((row["prompt"], row["chosen"], row["rejected"]), row["source"])
    out = []
    for (p, ch, rj), source in first.items():
        other = first.get((p, rj, ch))
        if other is not None and source < other:  # report each contradicting couple once
            out.append(Issue(source, "chosen", f"the same pair is labelled the other way at {other} "
                                               "(check the annotations; the two cancel out in training)",
                                  "contradiction"))
    return out


def _first_sources(rows: Iterable[dict]) -> dict[str, str]:
    out: dict[str, str] = {}
    for row in rows:
        out.setdefault(row["prompt"], row["source"])
    return out


def check_leakage(data: PreparedData) -> list[Issue]:
    """One warning per pair of sets sharing prompts, with a count and the first example's locations."""
    index = {name: _first_sources(getattr(data, name)) for name in SPLITS}
    out = []
    for (a, b), why in LEAKS.items():
        shared = [p for p in index[a] if p in index[b]]
        if shared:
            p = shared[0]
            out.append(Issue(index[a][p], "prompt", f"{len(shared)} prompt(s) of {a} also in {b}, e.g. this one at "
                                                    f"{index[b][p]}: {why} (remove them from one of the sets)",
                                  "leakage"))
    return out


def validate(data: PreparedData, cfg: RLHFConfig) -> ValidationReport:
    """Check the prepared data; see the module docstring for what is an error and what a warning."""
    problems, dropped = list(data.problems), []
    if cfg.data.drop_invalid_rows:  # record problems (they name a field) were dropped rows: warn
        dropped = [dataclasses.replace(i, message=f"{i.message} [row dropped: data.drop_invalid_rows]")
                   for i in problems if i.field]
        problems = [i for i in problems if not i.field]
    errors = _unique(problems + check_splits(data, cfg) + check_rows(data) + check_reward_columns(data, cfg))
    warnings = _unique(dropped + list(data.notes) + check_counts(data, cfg) + check_labels(data)
                       + check_contradictions(data) + check_leakage(data))
    if cfg.data.strict:
        errors, warnings = errors + warnings, []
    stats = {
        "ok": not errors,
        "strict": cfg.data.strict,
        "n_errors": len(errors),
        "n_warnings": len(warnings),
        "errors_by_kind": dict(Counter(i.kind or "other" for i in errors).most_common()),
        "warnings_by_kind": dict(Counter(i.kind or "other" for i in warnings).most_common()),
        "rows": {name: len(getattr(data, name)) for name in SPLITS},
        "counts": dict(data.counts),
        "labels": {f"choice_{k}": data.counts.get(f"preferences.choice_{k}", 0) for k in (0, 1)},
        "token_lengths": {name: _quantiles(values) for name, values in data.token_lengths.items()},
        "sources": data.sources,
        "formats": data.formats,
        "layouts": data.layouts,
        "cut_rows": data.where,
    }
    return ValidationReport(errors=errors, warnings=warnings, stats=stats, lengths=data.token_lengths,
                            limits={"prompt": cfg.data.prompt_length, "response": cfg.data.target_length})
