"""The optional lm-eval downstream run: a clean one-line refusal without lm-eval, and, with a stand-in
lm_eval module, one harness run per <bos> condition with the switch actually applied."""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

import sinkscope as ss
from helpers import tiny_model, word_tokenizer
from sinkscope.cli import app
from sinkscope.errors import InputError
from sinkscope.experiments import downstream as downstream_module


def test_without_lm_eval_the_command_refuses_in_one_line(monkeypatch):
    monkeypatch.setattr(downstream_module, "lm_eval_available", lambda: False)
    result = CliRunner().invoke(app, ["downstream", "--task", "arc_easy"])
    assert result.exit_code == 2 and "lm-eval is not installed" in result.output
    with pytest.raises(InputError, match="optional"):
        downstream_module.downstream(tiny_model("llama"), ["arc_easy"])


def test_each_bos_condition_runs_the_harness_with_its_switch(monkeypatch, tmp_path):
    seen = []

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size, add_bos_token):
            self.pretrained, self.add_bos_token = pretrained, add_bos_token

    def simple_evaluate(model, tasks, limit, num_fewshot):
        seen.append((model.add_bos_token, tuple(tasks), limit))
        score = 0.7 if model.add_bos_token else 0.4
        return {"results": {task: {"acc,none": score, "acc_stderr,none": 0.01, "alias": task} for task in tasks}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    monkeypatch.setattr(downstream_module, "lm_eval_available", lambda: True)

    model = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    result = downstream_module.downstream(model, ["piqa", "arc_easy"], limit=5)
    assert seen == [(True, ("piqa", "arc_easy"), 5), (False, ("piqa", "arc_easy"), 5)]
    frame = result.to_frame()
    assert set(frame["metric"]) == {"acc,none"}  # stderr and non-numeric entries are dropped
    assert result.summary["scores"]["add"]["piqa/acc,none"] == 0.7
    assert result.summary["scores"]["strip"]["arc_easy/acc,none"] == 0.4
    result.save(tmp_path)
    assert (tmp_path / "downstream.png").is_file()
    with pytest.raises(InputError, match="add and strip only"):
        downstream_module.downstream(model, ["piqa"], bos=["replace:eos"])


def test_an_intervention_reaches_the_calls_the_harness_makes(monkeypatch):
    """The harness runs the model itself; under a condition with an intervention its calls go through a
    following capture engine, so what it scores is the intervened model."""
    import torch

    from sinkscope.capture import CaptureEngine

    ids = torch.tensor([[1, 5, 9, 7, 12, 30, 8]])

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size, add_bos_token):
            self.pretrained, self.add_bos_token = pretrained, add_bos_token

    def simple_evaluate(model, tasks, limit, num_fewshot):
        with torch.inference_mode():
            logit = float(model.pretrained(input_ids=ids).logits[0, -1, 3])
        return {"results": {task: {"logit,none": logit} for task in tasks}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    monkeypatch.setattr(downstream_module, "lm_eval_available", lambda: True)

    model = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    result = downstream_module.downstream(model, ["piqa"], conditions=["add", "add+knockout"], progress=False)
    scores = {c: s["piqa/logit,none"] for c, s in result.summary["scores"].items()}
    with CaptureEngine(model) as engine, engine.intervening("add+knockout"):
        want = float(engine.forward(ids, logits=True).logits[0, -1, 3])
    # float32 logits of O(1) through two kernels: ~1e-6
    assert scores["add+knockout"] == pytest.approx(want, abs=1e-4)
    assert abs(scores["add+knockout"] - scores["add"]) > 1e-2
