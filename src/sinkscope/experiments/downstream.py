"""Downstream tasks with the tokenizer's `<bos>` switched on or off (the paper's Table 3), through
lm-evaluation-harness when it is installed and the task data is available. Optional: without lm-eval the
command says so in one line and does nothing else."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..models.loader import LoadedModel, load
from .common import ExperimentResult, provenance

BOS_SWITCH = {"add": True, "strip": False}


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


class DownstreamResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frame = self.tables["downstream"]
        pivot = frame.pivot_table("value", ["task", "metric"], "bos")
        ax = pivot.plot.bar(figsize=(max(5, 1.2 * len(pivot)), 3.5), rot=30)
        ax.set_ylabel("score")
        ax.figure.tight_layout()
        path = out / "downstream.png"
        ax.figure.savefig(path, dpi=120)
        plt.close(ax.figure)
        return [path]


def downstream(
    model: LoadedModel | Any, tasks: Sequence[str], *, bos: Sequence[str] = ("add", "strip"), limit: int | None = None,
    num_fewshot: int | None = None, batch_size: int = 1, command: str | None = None,
) -> DownstreamResult:
    """Run lm-eval ``tasks`` once per `<bos>` condition (``add``: the tokenizer's bos on, ``strip``: off)."""
    if not lm_eval_available():
        raise InputError("lm-eval is not installed (pip install lm-eval); the downstream evaluation is optional")
    unknown = [b for b in bos if b not in BOS_SWITCH]
    if unknown:
        raise InputError(f"downstream supports --bos add and strip only, not {unknown}")
    if not tasks:
        raise InputError("name at least one lm-eval task with --task")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    loaded = load(model)
    rows = []
    for condition in bos:
        harness_model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                             add_bos_token=BOS_SWITCH[condition])
        # lm-eval forces <bos> on for some families (Gemma); the condition under test must win.
        harness_model.add_bos_token = BOS_SWITCH[condition]
        try:
            output = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks), limit=limit,
                                             num_fewshot=num_fewshot)
        except Exception as error:  # missing task data surfaces as many exception types inside lm-eval
            raise InputError(f"lm-eval could not run {list(tasks)}: {str(error).splitlines()[0][:200]}") from error
        for task, metrics in (output or {}).get("results", {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not name.endswith("_stderr") and "stderr" not in name:
                    rows.append({"bos": condition, "task": task, "metric": name, "value": float(value)})
    frame = pd.DataFrame(rows, columns=["bos", "task", "metric", "value"])
    summary = {"tasks": list(tasks), "bos": list(bos), "limit": limit, "num_fewshot": num_fewshot,
               "scores": {b: {f"{r.task}/{r.metric}": r.value for r in g.itertuples()}
                          for b, g in frame.groupby("bos", sort=False)}}
    return DownstreamResult({"downstream": frame}, summary, provenance(loaded, command, experiment="downstream"))
