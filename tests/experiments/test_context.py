"""Run state lives in the run's `Context`, never on the experiment: an experiment is its settings.

Read from the source: no method of an experiment but `__post_init__` (which checks and normalises the
settings) assigns to ``self``. And by running: one experiment object runs twice, on a model, and ends as it
began, with the same tables both times.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import textwrap

import pandas as pd
import pytest

import sinkscope as ss
from helpers import SENTENCES, TEXT, tiny_model, word_tokenizer
from sinkscope.experiments import base
from sinkscope.experiments.inputs import PromptExperiment, prompt_list
from sinkscope.experiments.knockout import Knockout
from sinkscope.experiments.loss import TextLoss
from sinkscope.experiments.noop import Noop
from sinkscope.experiments.residual import ResidualPromptExperiment
from sinkscope.experiments.scan import Scan


def experiment_classes() -> list[type]:
    """Every experiment and the bases they share, defined in `sinkscope.experiments`."""
    classes = {base.Experiment, *base.import_all().values()}
    for cls in list(classes):
        classes.update(c for c in cls.__mro__ if isinstance(c, type) and issubclass(c, base.Experiment))
    return sorted(classes, key=lambda c: c.__qualname__)


def assignments_to_self(cls: type) -> list[str]:
    """``method: self.attr`` for each assignment to an attribute of self in the class body's methods."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    found = []
    for method in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        if method.name == "__post_init__":
            continue
        for node in ast.walk(method):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for leaf in ast.walk(target):
                    if (isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name)
                            and leaf.value.id == "self"):
                        found.append(f"{cls.__name__}.{method.name}: self.{leaf.attr}")
    return found


def test_the_source_check_finds_an_assignment_to_self():
    class Leaky(base.Experiment):
        def prepare(self, loaded):
            self._tokenizer, self.count = loaded.tokenizer, 0
            self.count += 1
            return base.Context(loaded, [1])

    assert assignments_to_self(Leaky) == ["Leaky.prepare: self._tokenizer", "Leaky.prepare: self.count",
                                          "Leaky.prepare: self.count"]


@pytest.mark.parametrize("cls", experiment_classes(), ids=lambda c: c.__qualname__)
def test_no_experiment_method_writes_run_state_on_the_experiment(cls):
    assert cls in (base.Experiment, PromptExperiment, ResidualPromptExperiment, TextLoss) or cls.name
    assert assignments_to_self(cls) == []


def settings_and_state(experiment: base.Experiment) -> dict:
    return copy.deepcopy({name: value for name, value in vars(experiment).items() if name != "text"})


@pytest.mark.parametrize("make", [
    lambda: Scan(prompts=prompt_list(SENTENCES[:3]), bos="add", per_position=True),
    lambda: Noop(prompts=prompt_list(SENTENCES[:3]), bos=("add", "strip")),
    lambda: Knockout(text=TEXT, window=12, max_windows=2, layers="0", per_head=False, batch_size=2),
], ids=["scan", "noop", "knockout"])
def test_an_experiment_runs_twice_unchanged_and_measures_the_same(make, tmp_path):
    model = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    experiment = make()
    before = settings_and_state(experiment)
    fields = {f.name for f in dataclasses.fields(experiment)}
    first = base.run(experiment, model, progress=False)
    second = base.run(experiment, model, out=tmp_path / "run", progress=False)
    assert set(vars(experiment)) == fields  # nothing added
    after = settings_and_state(experiment)
    assert after.keys() == before.keys()
    for name in before:
        assert repr(after[name]) == repr(before[name]), name
    assert list(first.tables) == list(second.tables)
    for name, frame in first.tables.items():
        pd.testing.assert_frame_equal(frame, second.tables[name], check_exact=True)
