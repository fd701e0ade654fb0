"""Greedy decoding for the retrieval experiments (passkey, RULER-style), with or without an intervention.

Plain decoding runs the model's own attention (fastest); a condition with an intervention
(`sinkscope.conditions`) decodes through the capture engine instead, which applies it to the prefill and to
every cached step (the first token is found by its position, so a sliding window that drops it is left alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..capture import CaptureEngine
from ..capture.kvcache import cached_forward
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


def stop_ids(model: Any) -> set[int]:
    """The model's end-of-sequence token ids (its generation config's, else its config's)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def greedy_through_cache(engine: CaptureEngine, cache: Any, first: int, position: int, max_new_tokens: int,
                         logits: Any, done: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Greedy decoding through a (compressed) cache already holding the prompt: ``first`` is the greedy token
    after the prompt, at ``position``; each step feeds the last token and takes the argmax of ``logits(hidden)``
    (the model's output logits), up to ``max_new_tokens`` tokens, stopping after an end-of-sequence token
    (which is not returned), or once ``done(tokens so far)`` (e.g. a score that more text cannot change)."""
    stops = stop_ids(engine.model)
    written = [int(first)]
    while (len(written) < max_new_tokens and written[-1] not in stops
           and not (done is not None and done(written))):
        step = position + len(written) - 1
        hidden = cached_forward(engine, cache, torch.tensor([[written[-1]]]), [step]).last_hidden_state
        with torch.inference_mode():
            written.append(int(logits(hidden[0, -1:]).argmax(-1)[0]))
    return written[:-1] if written[-1] in stops else written
