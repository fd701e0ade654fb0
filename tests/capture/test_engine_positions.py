"""Cached generation on sliding-window layers: probes must find the first token by its position, not by its
index in the layer's cache (once a sliding window has moved, key 0 of the cache is a later token).

Reference: the plain model (no capture engine, no cache), one full forward over the whole sequence per
decoding step, with explicit additive masks per layer type (causal; plus the window on sliding layers; plus,
for the knock-out, the first token hidden from every later query).
"""

from __future__ import annotations

import pytest
import torch

from helpers import WINDOW, eager_twin, tiny_model
from sinkscope.capture import CaptureEngine, FirstTokenAttention, SinkKnockout

SLIDING_FAMILIES = ["gemma3_text", "mistral", "gpt_oss"]
PROMPT_LENGTH, NEW_TOKENS = 4, 2 * WINDOW  # decoding runs well past the window


def prompt() -> torch.Tensor:
    ids = torch.randint(3, 90, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(5))
    ids[0, 0] = 1  # <bos>
    return ids


def explicit_masks(model, t: int, hide_first: bool) -> dict[str, torch.Tensor] | torch.Tensor:
    """Additive [1, 1, t, t] masks per layer type, as transformers' own masks are (query i sees key j iff
    j <= i, and i - j < window on sliding layers), with key 0 hidden from queries 1.. if `hide_first`."""
    query, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
    masks = {"full_attention": key <= query, "sliding_attention": (key <= query) & (query - key < WINDOW)}
    if hide_first:
        for allowed in masks.values():
            allowed[1:, 0] = False
    dtype = next(model.parameters()).dtype
    additive = {name: torch.zeros(t, t, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
                for name, allowed in masks.items()}
    layer_types = getattr(model.config, "layer_types", None)
    return additive if layer_types else additive["sliding_attention"]  # mistral: every layer slides


def reference_step_logits(model, sequence: torch.Tensor, hide_first: bool) -> torch.Tensor:
    """[steps, V]: the next-token logits after each prefix sequence[:PROMPT_LENGTH + k], no cache."""
    rows = []
    for stop in range(PROMPT_LENGTH, sequence.shape[1]):
        with torch.no_grad():
            logits = model(input_ids=sequence[:, :stop], attention_mask=explicit_masks(model, stop, hide_first),
                           use_cache=False).logits
        rows.append(logits[0, -1])
    return torch.stack(rows)


def cached_generation(model, probes, cache: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [1, prompt + new], per-step logits [new, V]) from greedy `engine.generate` with a cache
    (``cache``: None = transformers' default dynamic cache, or a ``cache_implementation`` such as "static")."""
    options = {} if cache is None else {"cache_implementation": cache}
    with CaptureEngine(model, probes) as engine:
        out = engine.generate(prompt(), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              use_cache=True, return_dict_in_generate=True, output_logits=True, **options)
    return out.sequences, torch.stack(out.logits)[:, 0]


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_cached_knockout_generation_equals_full_forwards_with_the_same_mask(family, cache):
    model = tiny_model(family)
    sequence, logits = cached_generation(model, [SinkKnockout()], cache)
    reference = reference_step_logits(model, sequence, hide_first=True)
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= 1e-4 * scale, (family, cache)
    # the knock-out changes something past the window too (else the test could not see a wrong key removed)
    plain = reference_step_logits(model, sequence, hide_first=False)
    assert (plain[WINDOW:] - reference[WINDOW:]).abs().max() > 1e-3 * scale


class EveryCall(FirstTokenAttention):
    """FirstTokenAttention keeping the records of every forward (each decoding step), not only the last."""

    def __init__(self) -> None:
        super().__init__(first_k=3)
        self.steps: list[dict[int, dict[str, torch.Tensor]]] = []

    def on_attention(self, call) -> None:
        super().on_attention(call)
        if call.layer == 0:
            self.steps.append({})
        self.steps[-1][call.layer] = self.records[call.layer]


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_first_token_attention_during_cached_generation_is_on_the_first_token(family):
    model = tiny_model(family)
    probe = EveryCall()
    sequence, _ = cached_generation(model, [probe])
    twin = eager_twin(model)
    with torch.no_grad():
        weights = twin(input_ids=sequence[:, :-1], output_attentions=True).attentions  # per layer [1, H, n, n]
    layer_types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * len(weights)
    decoding = probe.steps[1:]  # step 0 is the prompt itself
    assert len(decoding) == NEW_TOKENS - 1
    for step, records in enumerate(decoding):
        query = PROMPT_LENGTH + step  # this step's one query, as a position in the sequence
        for layer, record in records.items():
            expected = weights[layer][0, :, query]  # [H, n]
            visible = layer_types[layer] == "full_attention" or query < WINDOW
            assert bool(record["visible"].all()) == visible and bool(record["visible"].any()) == visible
            torch.testing.assert_close(record["attention"][0, :, -1], expected[:, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(record["first_k"][0, :, -1], expected[:, :3].sum(-1), atol=1e-5, rtol=0)
