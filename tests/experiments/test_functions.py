"""The Python functions generated from the experiment dataclasses (`experiments.functions`): their signature
is the class's fields with the class's defaults, and what they are given reaches the experiment."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import sinkscope as ss
from sinkscope.experiments import functions
from sinkscope.experiments.base import import_all
from sinkscope.experiments.passkey import Passkey
from sinkscope.experiments.ruler import Ruler
from sinkscope.experiments.spread import Spread


@pytest.fixture
def built(monkeypatch):
    """The experiments the functions build, captured instead of run."""
    made = []
    monkeypatch.setattr(functions, "run", lambda experiment, model, **options: made.append((experiment, options)))
    return made


@pytest.mark.parametrize("function", [ss.rank_collapse, ss.massive_activations, ss.matrix_entropy_by_depth,
                                      ss.attention_smoothing, ss.noop, ss.spread, ss.passkey, ss.ruler, ss.ablate,
                                      ss.representational_collapse, ss.scan, ss.knockout, ss.oversquash, ss.perturb,
                                      ss.stream, ss.downstream])
def test_the_signature_is_the_dataclass(function):
    cls = next(c for c in import_all().values() if c.result_type is inspect.signature(function).return_annotation)
    parameters = inspect.signature(function).parameters
    for field in dataclasses.fields(cls):
        if field.name == "prompts":  # given as ``texts`` (None: the probe set)
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert parameters[field.name].default == default, (function.__name__, field.name)
    assert list(parameters)[-4:] == ["out", "resume", "progress", "command"]


def test_inputs_settings_and_run_options_reach_the_experiment(built):
    ss.spread("model", ["one two three four five", "six seven eight nine ten", "a b c d e"], limit=2,
              position=0.5, max_tokens=None, conditions=["strip"], out="somewhere", resume=True)
    (experiment, options), = built
    assert isinstance(experiment, Spread)
    assert [p.text for p in experiment.prompts] == ["one two three four five", "six seven eight nine ten"]
    assert experiment.position == 0.5 and experiment.max_tokens is None and experiment.bos == ("strip",)
    assert options["out"] == "somewhere" and options["resume"] is True
    ss.spread("model", texts=["x y z w v"])  # the inputs by name too; everything else the class's defaults
    assert built[-1][0].bos == ("add", "strip") and built[-1][0].max_tokens == 64 and built[-1][0].position == 0.25


def test_one_value_for_a_tuple_setting_and_none_for_one_that_cannot_be_none(built):
    ss.passkey("model", lengths=512, depths=[0.5], trials=1)
    experiment = built[-1][0]
    assert isinstance(experiment, Passkey) and experiment.lengths == (512,) and experiment.depths == (0.5,)
    ss.ruler("model", tasks=None, lengths=[256])
    assert isinstance(built[-1][0], Ruler) and built[-1][0].tasks == Ruler().tasks  # None keeps the default


def test_a_misspelt_setting_is_refused(built):
    with pytest.raises(TypeError, match="postion"):
        ss.spread("model", postion=0.5)
    with pytest.raises(TypeError):
        ss.passkey("model", "a text")  # passkey takes no inputs
    assert not built


def test_a_text_input_left_out_keeps_the_class_default_and_limit_can_be_a_setting(built):
    from sinkscope.experiments.perturb import Perturb
    from sinkscope.experiments.stream import Stream

    ss.perturb("model", swap=["greatest", "best"])
    experiment = built[-1][0]
    assert isinstance(experiment, Perturb) and experiment.text == Perturb().text and experiment.swap == (
        "greatest", "best")
    ss.stream("model", "a b c", sinks=4, window=8, length=64)
    experiment = built[-1][0]
    assert isinstance(experiment, Stream) and experiment.text == "a b c" and experiment.sinks == (4,)
    ss.scan("model", input_ids=[[1, 5, 6]], eps=0.5)
    experiment = built[-1][0]
    assert experiment.input_ids == [[1, 5, 6]] and experiment.eps == (0.5,)
