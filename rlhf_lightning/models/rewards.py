"""What PPO maximises: a weighted sum of reward terms, each measured and logged on its own.

Terms: `model`, the reward model's score (trained here or used as published), normalised by its measured
mean and std; and every reward function of `reward.functions`, raw. The total is

    reward = model_weight * (score - mean) / std + sum_i weight_i * function_i(prompts, responses, **columns)

A reward function is user code: it gets the raw prompts, the responses and the prompt rows' other columns
(their `extra`: a dataset's `answer`) as lists, and returns one float per response. Whatever it does
wrong stops the step with its name and the row: an exception (the row found by calling it row by row),
a wrong number of values, a value that is not a finite number.
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf_lightning.config import ConfigError, RewardConfig, RewardFunctionConfig
from rlhf_lightning.models.reward_model import RewardScorer

MODEL_TERM = "model"
"""The reward model's term."""


class RewardFunctionError(ConfigError):
    """A reward function failed on the data: which function, which row, what it did."""


def load_function(spec: str) -> Callable:
    """`module:function` -> the callable, or a ConfigError that says what is missing and where it must be."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"config: reward.functions: {spec}: cannot import {module_name!r} ({exc}). The module must "
                          "be importable where the steps run: in an installed package, or a file beside "
                          "flows/rlhf.py (it travels with the flow's code package)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config: reward.functions: {spec}: {module_name} has no function {name!r}")
    return fn


def required_columns(fn: Callable) -> list[str]:
    """The prompt-row columns a function cannot do without: its keyword parameters with no default."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in positional[2:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
            if p.default is p.empty]


def accepted_columns(fn: Callable) -> set[str] | None:
    """The parameter names `fn` takes as keywords (None: any, it has **kwargs)."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def columns_of(rows: list[dict], accepted: set[str] | None = None, exclude: set[str] = frozenset()
               ) -> dict[str, list[Any]]:
    """The rows' `extra` columns as lists, by name (None where a row lacks one): those in `accepted` (all
    for None), none in `exclude`."""
    names = list(dict.fromkeys(k for row in rows for k in (row.get("extra") or {})))
    names = [n for n in names if (accepted is None or n in accepted) and n not in exclude]
    return {name: [(row.get("extra") or {}).get(name) for row in rows] for name in names}


def _where(rows: list[dict], i: int) -> str:
    row = rows[i]
    prompt = row["prompt"] if len(row["prompt"]) <= 60 else row["prompt"][:57] + "..."
    return f"row {i} ({row.get('source') or 'no source'}, prompt {prompt!r})"


@dataclass
class RewardFunction:
    """One configured reward function, loaded."""

    name: str
    weight: float
    spec: str
    fn: Callable

    @classmethod
    def load(cls, cfg: RewardFunctionConfig) -> RewardFunction:
        return cls(cfg.term, cfg.weight, cfg.function, load_function(cfg.function))

    def __reduce__(self):
        # Pickled as its spec (ddp_spawn hands PPO's module to its processes this way): a function made by
        # a factory or a lambda bound to a name does not pickle by reference, its module:function does.
        return _reloaded, (self.name, self.weight, self.spec)

    def _fail(self, message: str) -> RewardFunctionError:
        return RewardFunctionError(f"reward function {self.name} ({self.spec}): {message}")

    def _call(self, prompts: list[str], responses: list[str], rows: list[dict]) -> Any:
        # Only the columns it declares (all of them with **kwargs): a prompt file's other columns (an `id`)
        # must not break a function that does not read them. Never as its first two parameters (the prompts
        # and the responses), whatever a column is called.
        params = [p.name for p in inspect.signature(self.fn).parameters.values()][:2]
        return self.fn(list(prompts), list(responses), **columns_of(rows, accepted_columns(self.fn), set(params)))

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]) -> torch.Tensor:
        """Its values for the responses, (B,) float64; raises RewardFunctionError naming the row."""
        try:
            values = self._call(prompts, responses, rows)
        except Exception as exc:  # the user's code: find the row it fails on, say where in that code
            raise self._failure(exc, prompts, responses, rows) from None
        try:
            out = torch.as_tensor(values, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise self._fail(f"returned {type(values).__name__} {str(values)[:80]!r}; return one float per response "
                             "(a list or a 1-D array)") from None
        if out.numel() != len(responses):
            raise self._fail(f"returned {out.numel()} values for {len(responses)} responses; return one per response")
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
        if bad:
            raise self._fail(f"returned {out[bad[0]].item()} for {_where(rows, bad[0])} (and {len(bad) - 1} more); "
                             "every value must be a finite number")
        return out

    def _failure(self, exc: Exception, prompts: list[str], responses: list[str], rows: list[dict]) -> RewardFunctionError:
        # The last line of the function's own file that the exception passed (not numpy's or re's).
        frames = traceback.extract_tb(exc.__traceback__)
        source = getattr(getattr(self.fn, "__code__", None), "co_filename", None)  # None: a callable object
        own = [f for f in frames if f.filename == source] or frames
        where = f" at {own[-1].filename}:{own[-1].lineno}"
        for i in range(len(responses)):
            try:
                self._call(prompts[i : i + 1], responses[i : i + 1], rows[i : i + 1])
            except Exception:
                return self._fail(f"raised {type(exc).__name__}: {exc}{where}, on {_where(rows, i)} with response "
                                  f"{responses[i][:80]!r}")
        return self._fail(f"raised {type(exc).__name__}: {exc}{where}, on the batch of {len(responses)} rows (each row "
                          "alone passes)")


def _reloaded(name: str, weight: float, spec: str) -> RewardFunction:
    return RewardFunction(name, weight, spec, load_function(spec))


class Rewards:
    """The reward terms of a run and their weighted total."""

    def __init__(self, scorer: RewardScorer | None, model_weight: float, functions: list[RewardFunction]):
        if scorer is None and not functions:
            raise ValueError("Rewards: no reward model and no reward function")
        self.scorer, self.model_weight, self.functions = scorer, model_weight, functions

    @classmethod
    def load(cls, cfg: RewardConfig, reward_model_dir: str | None) -> Rewards:
        """The configured terms; the reward model from `reward_model_dir` (`RewardScorer.load`) when the
        config uses one."""
        scorer = RewardScorer.load(reward_model_dir) if cfg.uses_model else None
        return cls(scorer, cfg.model_weight or 0.0, [RewardFunction.load(f) for f in cfg.functions])

    @property
    def terms(self) -> list[str]:
        return ([MODEL_TERM] if self.scorer is not None else []) + [f.name for f in self.functions]

    @property
    def model_only(self) -> bool:
        """The total is the reward model's score alone (the default run): its figures are the rm_ ones."""
        return not self.functions

    def to(self, device: torch.device | str) -> Rewards:
        if self.scorer is not None:
            self.scorer.to(device)
        return self

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> dict[str, torch.Tensor]:
        """Every term's raw values, {term: (B,) float32 on the CPU}: the reward model's score as it outputs
        it, each function's value. `rows`: the prompt rows behind the prompts (their `extra` columns go to
        the functions, their `source` names a failing row)."""
        if not len(prompts) == len(responses) == len(rows):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(rows)} rows")
        out = {}
        if self.scorer is not None:
            out[MODEL_TERM] = self.scorer.score(prompts, responses)
        for fn in self.functions:
            out[fn.name] = fn(prompts, responses, rows).float()
        return out

    def total(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of `score`'s terms, (B,): what PPO maximises."""
        parts = [fn.weight * raw[fn.name] for fn in self.functions]
        if self.scorer is not None:
            parts.append(self.model_weight * self.scorer.normalise(raw[MODEL_TERM]))
        return torch.stack(parts).sum(0)


def column_problems(functions: list[RewardFunction], rows: list[dict], what: str) -> list[str]:
    """Problems of prompt `rows` for the reward functions: a column a function needs (`required_columns`)
    that rows lack, the first such row named; one line each."""
    problems = []
    for fn in functions:
        for column in required_columns(fn.fn):
            missing = [i for i, row in enumerate(rows) if column not in (row.get("extra") or {})]
            if missing:
                problems.append(f"reward function {fn.name} ({fn.spec}) needs column {column!r}, which {len(missing)} "
                                f"of {len(rows)} {what} lack, first {_where(rows, missing[0])}: add it to the prompt "
                                "file, or give the parameter a default")
    return problems
