"""Greedy decoding for the retrieval experiments (passkey, RULER-style), with or without an intervention.

Plain decoding runs the model's own attention (fastest); a condition with an intervention
(`sinkscope.conditions`) decodes through the capture engine instead, which applies it to the prefill and to
every cached step (the first token is found by its position, so a sliding window that drops it is left alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from ..capture import CaptureEngine
from ..conditions import parse_condition
from ..models.loader import LoadedModel, input_device


def decoding_context(loaded: LoadedModel, conditions: Sequence[str]) -> contextlib.AbstractContextManager[Any]:
    """What `measure` decodes with: the model itself, or a capture engine when a condition intervenes."""
    loaded.model.eval()
    if any(parse_condition(c).intervention is not None for c in conditions):
        return CaptureEngine(loaded)
    return contextlib.nullcontext(loaded.model)


def generate(runner: Any, ids: Sequence[int], config: Any) -> torch.Tensor:
    """``generate`` of one prompt through the model or a capture engine (then under its intervention)."""
    model = runner.model if isinstance(runner, CaptureEngine) else runner
    input_ids = torch.tensor([list(ids)], device=input_device(model))
    mask = torch.ones_like(input_ids)
    if isinstance(runner, CaptureEngine):
        return runner.generate(input_ids, mask, generation_config=config)
    with torch.inference_mode():  # generate keeps the LM head to the last position (logits_to_keep)
        return model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
