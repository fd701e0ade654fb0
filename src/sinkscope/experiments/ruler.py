"""`ruler`: RULER-style long-context retrieval, with vs without `<bos>` (the paper's Table 3 RULER row).

The prompts come from `sinkscope.data.ruler` (needle in a haystack: single, multi-key, multi-value,
multi-query, on natural text and on repeated filler; variable tracking; common-words extraction), at
lengths counted in the model's own text tokens. Each unit is task x length x depth x trial x `<bos>`
condition: the prompt is encoded under the condition (``add``: `<bos>` + text tokens; ``strip``: the same
text tokens alone; the text span is found by alignment), the model decodes greedily (enough tokens to write
the expected answer once plus 8, or ``max_new_tokens``), and the answer is scored as RULER does
(`data.ruler.score`: the fraction of expected strings found in it). A length the task cannot hold with this
tokenizer (the common-words list with its solved example needs several hundred tokens) is skipped and
listed in ``summary["skipped"]``. Units run shortest length first, so an interrupted run holds every task at
the short lengths.

Tables: ``ruler`` (one row per unit), ``accuracy`` (task x length x condition: mean score and a 95%
bootstrap interval over trials; a trial's score is its mean over depths), ``difference`` (first condition
minus each other, paired by trial). Figures: task x length heatmaps per condition (and of the difference),
length x depth heatmaps of the tasks with a target depth (`report.figures.retrieval`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..capture import CaptureEngine
from ..data import ruler as tasks_
from ..errors import InputError, TokenizationError
from ..metrics.stats import bootstrap_interval
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result
from .decoding import decoding_context, generate, stop_ids
from .functions import experiment_function
from .inputs import bos_conditions, check_token_ids, context_limit, encode_one, prefix_ids, require_tokenizer
from .settings import Command, setting
from .whereabouts import TABLE as WHEREABOUTS
from .whereabouts import whereabouts_of_heads

DEFAULT_LENGTHS = (512, 1024, 2048, 4096)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
COLUMNS = ["task", "length", "depth", "trial", "bos", "n_tokens", "text_tokens", "needle_position", "needle_depth",
           "expected", "answer", "score", "correct", "new_tokens", "seconds"]


@dataclass
class RulerContext(Context):
    skipped: list[dict[str, Any]]  # task x length cells the tokenizer cannot fit (task, length, reason)


class RulerResult(Result):
    """Tables ``ruler`` (per unit), ``accuracy`` (task x length x bos, with intervals), ``difference``."""


    @property
    def frame(self) -> pd.DataFrame:
        return self.tables["ruler"]

    def accuracy(self, task: str, length: int, bos: str) -> float:
        """Mean score of one task x length x condition cell."""
        table = self.tables["accuracy"]
        row = table[(table["task"] == task) & (table["length"] == length) & (table["bos"] == bos)]
        if row.empty:
            raise InputError(f"no accuracy for task {task}, length {length}, bos {bos}")
        return float(row["accuracy"].iloc[0])


@dataclass(frozen=True)
class RulerUnit:
    """One prompt under one `<bos>` condition (positions are indices into ``ids``)."""

    task: str
    length: int
    depth: float | None
    trial: int
    bos: str
    ids: list[int]
    text_start: int
    text_stop: int
    answers: list[str]
    needle_positions: list[int]
    needle_depths: list[float]
    max_new_tokens: int


@dataclass
class Ruler(Experiment[RulerResult]):
    """Greedy RULER-style tasks per task x length x depth x trial x `<bos>` condition."""

    name = "ruler"
    command = Command(
        "ruler", "consequences",
        "RULER-style retrieval (needles, variable tracking, common words), greedy answers, with vs without "
        "<bos>.", inputs="text")
    unit_label = "prompts"

    tasks: tuple[str, ...] = setting(tuple(tasks_.TASKS), "niah_single, niah_multikey, vt, cwe, ...",
                                     flag="--task")
    lengths: tuple[int, ...] = setting(DEFAULT_LENGTHS, "prompt length in text tokens", flag="--length")
    depths: tuple[float, ...] = setting(DEFAULT_DEPTHS, "depth of the target needle in [0, 1]", flag="--depth")
    trials: int = setting(3, "prompts (keys, values) per task x length x depth")
    bos: tuple[str, ...] = ("add", "strip")
    seed: int = setting(0, "seed of the needles, keys and values")
    values: str = setting("numbers", "needle values: numbers | words | uuids")
    # None: each prompt's own budget (its expected answer once + 8 tokens)
    max_new_tokens: int | None = setting(None, "greedy tokens per answer (none: each task's)")
    text: str | Path | None = None  # haystack text file (default: the offline Shakespeare text)

    def __post_init__(self) -> None:
        self.text = None if self.text is None else str(self.text)  # a path, kept as text in the fingerprint

    def _check(self, loaded: LoadedModel) -> list[str]:
        for name in self.tasks:
            tasks_.task(name)
        if not self.tasks or not self.lengths or not self.depths:
            raise InputError("ruler needs at least one task, length and depth")
        if len(set(self.tasks)) != len(self.tasks) or len(set(self.lengths)) != len(self.lengths):
            raise InputError("each task and length may be given once")
        for depth in self.depths:
            tasks_.check_depth(depth)
        if self.trials < 1:
            raise InputError("--trials must be at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1")
        if self.values not in tasks_.VALUE_TYPES:
            raise InputError(f"unknown --values '{self.values}' ({', '.join(tasks_.VALUE_TYPES)})")
        if min(self.lengths) < 1:
            raise InputError("lengths must be at least 1 token")
        conditions = bos_conditions(list(self.bos))
        tokenizer = require_tokenizer(loaded, "ruler")
        self._check_fits(loaded, max(self.lengths), max(len(prefix_ids(tokenizer, c)) for c in conditions),
                         self.max_new_tokens or 1)
        return conditions

    @staticmethod
    def _check_fits(loaded: LoadedModel, length: int, prefix: int, budget: int) -> None:
        limit = context_limit(loaded)
        if limit is not None and length + prefix + budget > limit:
            raise InputError(f"length {length} (+ {prefix} special + {budget} new tokens) exceeds the model's "
                             f"{limit} positions; use lengths up to {limit - prefix - budget}")

    def prepare(self, loaded: LoadedModel) -> RulerContext:
        conditions = self._check(loaded)
        tokenizer = loaded.tokenizer
        haystack = tasks_.load_haystack(self.text) if self.text is not None or _needs_text(self.tasks) else None
        skipped: list[dict[str, Any]] = []  # task x length cells the tokenizer cannot fit
        units = []
        for length in self.lengths:  # shortest first: an interrupted run has every task at the short lengths
            for name in self.tasks:
                depths = self.depths if tasks_.task(name).uses_depth else (None,)
                try:
                    prompts = [tasks_.ruler_prompt(tokenizer, name, int(length), depth, trial, self.seed, self.values,
                                                   haystack) for depth in depths for trial in range(self.trials)]
                except tasks_.TooShort as error:
                    skipped.append({"task": name, "length": int(length), "reason": str(error)})
                    continue
                units += [self._unit(tokenizer, prompt, condition) for prompt in prompts for condition in conditions]
        if not units:
            reasons = "; ".join(s["reason"] for s in skipped)
            raise InputError(f"ruler: no task fits the lengths asked for ({reasons})")
        check_token_ids(loaded, [u.ids for u in units])
        for unit in units:  # the prompt as encoded (prefix and any suffix included) and its answer budget
            text = unit.text_stop - unit.text_start
            self._check_fits(loaded, text, len(unit.ids) - text, unit.max_new_tokens)
        return RulerContext(loaded, units, skipped)

    def _unit(self, tokenizer: Any, prompt: tasks_.RulerPrompt, condition: str) -> RulerUnit:
        encoded = encode_one(tokenizer, prompt.text, condition, None)
        if encoded.text_stop - encoded.text_start != prompt.n_tokens:
            raise TokenizationError(f"{prompt.task}: the text tokens change under --bos {condition}")
        return RulerUnit(prompt.task, prompt.length, prompt.depth, prompt.trial, encoded.bos, encoded.ids,
                         encoded.text_start, encoded.text_stop, list(prompt.answers),
                         [encoded.text_start + t for t in prompt.needle_tokens], list(prompt.needle_depths),
                         self.max_new_tokens or prompt.max_new_tokens)

    def open(self, ctx: RulerContext) -> contextlib.AbstractContextManager[Any]:
        return decoding_context(ctx.loaded, self.bos)  # the model itself, or the engine for an intervention

    def describe(self, units: Sequence[RulerUnit]) -> str:
        u = units[0]
        return f"{u.task} {u.length} bos={u.bos}"

    def measure(self, ctx: RulerContext, engine: Any, units: Sequence[RulerUnit]) -> dict[str, pd.DataFrame]:
        rows = []
        for unit in units:
            started = time.time()
            new = greedy_continuation(engine, unit.ids, unit.max_new_tokens)
            answer = ctx.tokenizer.decode(new, skip_special_tokens=True)
            score = tasks_.score(answer, unit.answers)
            rows.append({
                "task": unit.task, "length": unit.length, "depth": np.nan if unit.depth is None else unit.depth,
                "trial": unit.trial, "bos": unit.bos, "n_tokens": len(unit.ids),
                "text_tokens": unit.text_stop - unit.text_start,
                "needle_position": unit.needle_positions[0] if unit.needle_positions else -1,
                "needle_depth": unit.needle_depths[0] if unit.needle_depths else np.nan,
                "expected": " | ".join(unit.answers), "answer": answer, "score": score, "correct": score == 1.0,
                "new_tokens": len(new), "seconds": round(time.time() - started, 3),
            })
        return {"ruler": pd.DataFrame(rows, columns=COLUMNS), WHEREABOUTS: whereabouts_of_heads(engine, units)}

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        frame = tables["ruler"].reset_index(drop=True)
        out = {"ruler": frame, "accuracy": accuracy_table(frame, self.seed)}
        conditions = list(dict.fromkeys(frame["bos"]))
        if len(conditions) > 1:
            out["difference"] = difference_table(frame, conditions, self.seed)
        return out

    def summarise(self, ctx: RulerContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame, accuracy = tables["ruler"], tables["accuracy"]
        conditions = list(dict.fromkeys(frame["bos"]))
        summary: dict[str, Any] = {
            "model": ctx.loaded.info.name, "tasks": list(self.tasks), "lengths": [int(n) for n in self.lengths],
            "depths": [float(d) for d in self.depths], "trials": self.trials, "bos": conditions, "seed": self.seed,
            "values": self.values, "n_prompts": len(frame), "skipped": ctx.skipped,
            "haystack": tasks_.load_haystack(self.text).source if self.text or _needs_text(self.tasks) else None,
            "accuracy": {b: _interval(_trial_scores(frame[frame["bos"] == b]), self.seed) for b in conditions},
            "accuracy_by_task": {
                b: {t: _interval(_trial_scores(g), self.seed) for t, g in frame[frame["bos"] == b].groupby("task",
                                                                                                           sort=False)}
                for b in conditions},
            "accuracy_by_task_length": {
                b: {t: {str(int(r.length)): {"mean": r.accuracy, "low": r.low, "high": r.high}
                        for r in g.itertuples()} for t, g in accuracy[accuracy["bos"] == b].groupby("task", sort=False)}
                for b in conditions},
        }
        if "difference" in tables:
            first = conditions[0]
            summary["difference"] = {
                f"{first} - {other}": _interval(_trial_scores(frame[frame["bos"] == first])
                                                - _trial_scores(frame[frame["bos"] == other]), self.seed)
                for other in conditions[1:]}
        return summary


def _needs_text(names: Sequence[str]) -> bool:
    return any(tasks_.task(n).haystack in ("essay", "list") for n in names)


# -- greedy decoding ---------------------------------------------------------------------------------------
def greedy_continuation(runner: Any, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of ``ids`` (up to ``max_new_tokens``, stopping at the model's end-of-sequence
    tokens), without the model's own sampling defaults; ``runner``: the model, or a capture engine (which
    applies its intervention while decoding)."""
    from transformers import GenerationConfig

    model = runner.model if isinstance(runner, CaptureEngine) else runner
    stops = stop_ids(model)
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else min(stops, default=None)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=sorted(stops) or None, pad_token_id=pad)
    new = generate(runner, ids, config)[0, len(ids):].tolist()
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]


# -- accuracy with bootstrap intervals over trials --------------------------------------------------------
def _trial_scores(frame: pd.DataFrame) -> np.ndarray:
    """Each trial's score, in trial order: the mean over the task x length cells in ``frame`` of the cell's
    mean over depths (so every cell weighs the same, whatever its number of depths)."""
    cells = frame.groupby(["trial", "task", "length"])["score"].mean()
    return cells.groupby(level="trial").mean().sort_index().to_numpy(dtype=np.float64)


def _interval(values: np.ndarray, seed: int) -> dict[str, float]:
    mean, low, high = bootstrap_interval(values, seed)
    return {"mean": mean, "low": low, "high": high, "n_trials": int(len(values))}


def _cells(frame: pd.DataFrame, keys: list[str]) -> Any:
    """Groups in task order (as first measured), then by length, then condition order."""
    order = {column: {v: i for i, v in enumerate(dict.fromkeys(frame[column]))} for column in ("task", "bos")}
    ranked = frame.assign(**{f"_{c}": frame[c].map(order[c]) for c in order})
    ranked = ranked.sort_values([f"_{k}" if k in order else k for k in keys], kind="stable")
    return ranked.drop(columns=[f"_{c}" for c in order]).groupby(keys, sort=False)


def accuracy_table(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Mean score per task x length x condition, with a 95% bootstrap interval over trials."""
    rows = []
    for (task, length, bos), cell in _cells(frame, ["task", "length", "bos"]):
        mean, low, high = bootstrap_interval(_trial_scores(cell), seed)
        rows.append({"task": task, "length": int(length), "bos": bos, "accuracy": mean, "low": low, "high": high,
                     "exact": float(cell["correct"].mean()), "n_prompts": len(cell),
                     "n_trials": int(cell["trial"].nunique())})
    return pd.DataFrame(rows)


def difference_table(frame: pd.DataFrame, conditions: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """Per task x length: the first condition's score minus each other's, paired by trial, with a 95%
    bootstrap interval over trials."""
    rows = []
    first = conditions[0]
    for (task, length), cell in _cells(frame, ["task", "length"]):
        base = _trial_scores(cell[cell["bos"] == first])
        for other in conditions[1:]:
            mean, low, high = bootstrap_interval(base - _trial_scores(cell[cell["bos"] == other]), seed)
            rows.append({"task": task, "length": int(length), "first": first, "other": other, "difference": mean,
                         "low": low, "high": high})
    return pd.DataFrame(rows)


ruler = experiment_function(
    Ruler, "ruler",
    """RULER-style tasks (``tasks``: names from `sinkscope.data.ruler.TASKS`, default all) per length x depth x
    trial x `<bos>` condition, answered greedily and scored as RULER does. ``lengths`` count text tokens (a
    `<bos>`, when added, comes on top); ``text``: a haystack text file (default: offline Shakespeare). ``out``:
    a run directory written unit by unit; ``resume`` continues an interrupted run.""")
