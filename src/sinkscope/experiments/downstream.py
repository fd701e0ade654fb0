"""Downstream tasks with the tokenizer's `<bos>` switched on or off (the paper's Table 3), through
lm-evaluation-harness when it is installed and the task data is available. Optional: without lm-eval the
command says so in one line and does nothing else.

Work units: task x condition; the tasks of one condition run in one harness call (one batch), so an
interrupted run resumes at the next condition.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..capture import CaptureEngine
from ..conditions import parse_condition, parse_conditions
from ..errors import InputError
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result
from .functions import experiment_function
from .settings import setting

BOS_SWITCH = {"add": True, "strip": False}
COLUMNS = ["bos", "task", "metric", "value"]


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    if not lm_eval_available():
        raise InputError("lm-eval is not installed (pip install lm-eval); the downstream evaluation is optional")


@dataclass(frozen=True)
class Task:
    bos: str
    task: str


class DownstreamResult(Result):
    """Table ``downstream``: one row per bos x task x metric."""



@dataclass
class Downstream(Experiment[DownstreamResult]):
    """lm-eval ``tasks`` once per `<bos>` condition (``add``: the tokenizer's bos on, ``strip``: off)."""

    name = "downstream"
    unit_label = "tasks"

    tasks: tuple[str, ...] = ()
    bos: tuple[str, ...] = ("add", "strip")
    limit: int | None = setting(None, "examples per task")
    num_fewshot: int | None = setting(None, "few-shot examples (none: each task's default)")
    batch_size: int = 1

    def __post_init__(self) -> None:
        require_lm_eval()
        if not self.bos:
            raise InputError("give each --bos condition once (at least one)")
        conditions = parse_conditions(self.bos)
        unknown = [str(c) for c in conditions if c.bos not in BOS_SWITCH]
        if unknown:
            raise InputError(f"downstream supports --bos add and strip only, not {unknown}")
        self.bos = tuple(str(c) for c in conditions)
        if not self.tasks:
            raise InputError("name at least one lm-eval task with --task")
        self.tasks = tuple(self.tasks)

    def prepare(self, loaded: LoadedModel) -> Context:
        return Context(loaded, [Task(condition, task) for condition in self.bos for task in self.tasks])

    def batches(self, units: Sequence[Task]) -> list[list[int]]:
        return [[i for i, u in enumerate(units) if u.bos == condition] for condition in self.bos]

    def open(self, ctx: Context) -> contextlib.AbstractContextManager[Any]:
        if any(parse_condition(c).intervention is not None for c in self.bos):
            # the harness calls the model itself: a following engine captures those calls (and intervenes)
            return CaptureEngine(ctx.loaded, follow=True)
        return contextlib.nullcontext(ctx.loaded)  # the harness runs the model itself

    def describe(self, units: Sequence[Task]) -> str:
        return f"bos={units[0].bos}"

    def measure(self, ctx: Context, loaded: Any, units: Sequence[Task]) -> dict[str, pd.DataFrame]:
        """``loaded``: the loaded model, or a following capture engine (both hold the model as ``.model``)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        condition, tasks = units[0].bos, [u.task for u in units]
        switch = BOS_SWITCH[parse_condition(condition).bos]
        harness_model = HFLM(pretrained=loaded.model, tokenizer=ctx.tokenizer, batch_size=self.batch_size,
                             add_bos_token=switch)
        # lm-eval forces <bos> on for some families (Gemma); the condition under test must win.
        harness_model.add_bos_token = switch
        try:
            output = lm_eval.simple_evaluate(model=harness_model, tasks=tasks, limit=self.limit,
                                             num_fewshot=self.num_fewshot)
        except Exception as error:  # missing task data surfaces as many exception types inside lm-eval
            raise InputError(f"lm-eval could not run {tasks}: {str(error).splitlines()[0][:200]}") from error
        rows = []
        for task, metrics in (output or {}).get("results", {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not name.endswith("_stderr") and "stderr" not in name:
                    rows.append({"bos": condition, "task": task, "metric": name, "value": float(value)})
        return {"downstream": pd.DataFrame(rows, columns=COLUMNS)}

    def summarise(self, ctx: Context, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame = tables["downstream"]
        return {"model": ctx.loaded.info.name, "tasks": list(self.tasks), "bos": list(self.bos), "limit": self.limit,
                "num_fewshot": self.num_fewshot,
                "scores": {b: {f"{r.task}/{r.metric}": r.value for r in g.itertuples()}
                           for b, g in frame.groupby("bos", sort=False)}}


downstream = experiment_function(
    Downstream, "downstream",
    """Run lm-eval ``tasks`` once per `<bos>` condition (``add``: the tokenizer's bos on, ``strip``: off).""",
    inputs="tasks")
