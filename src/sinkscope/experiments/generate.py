"""Generation side by side: the same prompt continued greedily with and without the sink.

Each `<bos>` condition changes only what sits at position 0 (see `models.tokens`); with ``knockout`` every
condition is also run with the attention to position 0 removed in every head (`SinkKnockout`) while
decoding, so the first token is still there but no query can use it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from ..capture import CaptureEngine, SinkKnockout
from ..errors import InputError, TokenizationError
from ..models.loader import LoadedModel, load
from ..models.tokens import encode, parse_bos
from .common import ExperimentResult, progress_bar, provenance

DEFAULT_PROMPT = "The old lighthouse keeper climbed the stairs every evening, and on the night of the storm he saw"


class GenerateResult(ExperimentResult):
    """Tables: ``generate`` (one row per prompt x condition). No figure: the text is the result."""


def _greedy_config(model: Any, max_new_tokens: int, pad_token_id: int | None) -> Any:
    """The model's own generation config (its eos tokens), switched to plain greedy decoding."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(config, name):
            setattr(config, name, None)  # sampling knobs would only trigger warnings under greedy decoding
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    return config


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def generate_side_by_side(
    model: LoadedModel | Any, prompt: str | Sequence[str] | None = None, *, bos: Sequence[str] = ("add", "strip"),
    max_new_tokens: int = 40, knockout: bool = False, progress: bool = True, command: str | None = None,
) -> GenerateResult:
    """Greedy continuation of each prompt under each `<bos>` condition (and, with ``knockout``, each
    condition again with all heads' attention to position 0 removed). The first condition is the
    reference: ``common_prefix_tokens`` counts the new tokens a continuation shares with it."""
    loaded = load(model)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise InputError("this model has no tokenizer; load it with tokenizer=...")
    prompts = [DEFAULT_PROMPT] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("give a non-empty prompt")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    conditions = [str(parse_bos(b)) for b in bos]
    if not conditions or len(set(conditions)) != len(conditions):
        raise InputError("give each --bos condition once (at least one)")
    runs = [(c, False) for c in conditions] + ([(c, True) for c in conditions] if knockout else [])
    eos = loaded.model.generation_config.eos_token_id
    config = _greedy_config(loaded.model, max_new_tokens, getattr(tokenizer, "pad_token_id", None)
                            or (eos[0] if isinstance(eos, list) else eos))
    stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    probe = SinkKnockout({})
    rows = []
    started = time.time()
    with CaptureEngine(loaded, [probe]) as engine, progress_bar("generate", progress) as bar:
        task = bar.add_task("", total=len(prompts) * len(runs))
        for index, text in enumerate(prompts):
            reference: list[int] | None = None
            for condition, knocked in runs:
                try:
                    ids = encode(tokenizer, text, condition, None)
                except TokenizationError as error:
                    raise TokenizationError(f"prompt {index}: {error}") from error
                probe.heads = None if knocked else {}  # None: every head of every layer; {}: untouched
                output = engine.generate(torch.tensor([ids]), generation_config=config)
                new = [int(t) for t in output[0, len(ids):]]
                reference = new if reference is None else reference
                rows.append({
                    "prompt_index": index, "prompt": text, "condition": condition + ("+knockout" if knocked else ""),
                    "bos": condition, "knockout": knocked, "first_token": tokenizer.convert_ids_to_tokens(ids[0]),
                    "n_prompt_tokens": len(ids), "continuation": tokenizer.decode(new, skip_special_tokens=True),
                    "new_ids": new, "n_new_tokens": len(new), "stopped_at_eos": bool(new) and new[-1] in stop_ids,
                    "common_prefix_tokens": _common_prefix(reference, new),
                })
                bar.advance(task)
    frame = pd.DataFrame(rows)
    labels = list(dict.fromkeys(frame["condition"]))
    summary = {
        "conditions": labels, "reference": labels[0], "max_new_tokens": max_new_tokens, "knockout": knockout,
        "decoding": "greedy", "n_prompts": len(prompts),
        "prompts": [{"prompt": text, "continuations": {
            r["condition"]: {"text": r["continuation"], "n_new_tokens": r["n_new_tokens"],
                             "common_prefix_tokens": r["common_prefix_tokens"], "first_token": r["first_token"]}
            for r in rows if r["prompt_index"] == i}} for i, text in enumerate(prompts)],
    }
    meta = provenance(loaded, command, experiment="generate", seconds=round(time.time() - started, 3))
    return GenerateResult({"generate": frame}, summary, meta)
