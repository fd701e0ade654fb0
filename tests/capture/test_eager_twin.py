"""The eager twin (tests/helpers.py), the oracle of most engine tests, is independent of the model under
test: building it leaves the model's attention implementation alone, and switching either later does not
switch the other."""

from __future__ import annotations

import torch

from helpers import eager_twin, tiny_model
from sinkscope.capture import CaptureEngine


def implementations(model) -> set[str]:
    """Every attention implementation the model's (sub)configs name."""
    return {module.config._attn_implementation for module in model.modules() if hasattr(module, "config")}


def test_eager_twin_is_independent_of_the_model_under_test():
    model = tiny_model("llama")
    assert implementations(model) == {"sdpa"}
    twin = eager_twin(model)
    assert implementations(model) == {"sdpa"} and implementations(twin) == {"eager"}
    model.set_attn_implementation("eager")
    twin.set_attn_implementation("sdpa")
    assert implementations(model) == {"eager"} and implementations(twin) == {"sdpa"}
    # an engine switches (and restores) only its own model
    twin.set_attn_implementation("eager")
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    with CaptureEngine(model) as engine:
        assert implementations(twin) == {"eager"}
        engine.forward(ids)
    assert implementations(model) == {"eager"} and implementations(twin) == {"eager"}
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)
