"""Generation side by side: the same prompt continued greedily with and without the sink.

Each `<bos>` condition changes only what sits at position 0 (see `models.tokens`); with ``knockout`` every
condition is also run with the attention to position 0 removed in every head (`SinkKnockout`) while
decoding, so the first token is still there but no query can use it.

Work units: prompt x condition (the knocked-out conditions after the plain ones), one continuation each.
The first condition of each prompt is its reference: ``common_prefix_tokens`` counts the new tokens a
continuation shares with it (filled in once every unit is measured).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..capture import Probe, SinkKnockout
from ..errors import InputError
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result, run, takes_conditions
from .inputs import bos_conditions, encode_prompts, require_tokenizer
from .settings import Command, setting

DEFAULT_PROMPT = "The old lighthouse keeper climbed the stairs every evening, and on the night of the storm he saw"


@dataclass(frozen=True)
class Continuation:
    """One prompt under one condition, with or without the knock-out."""

    prompt_index: int
    prompt: str
    bos: str
    knockout: bool
    ids: list[int]


@dataclass
class GenerateContext(Context):
    config: Any  # the model's generation config, switched to greedy decoding
    stop_ids: set[int]  # the model's eos tokens
    probe: SinkKnockout  # knocks out position 0 (every head) for the knocked-out continuations


class GenerateResult(Result):
    """Table ``generate`` (one row per prompt x condition). No figure: the text is the result."""



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


@dataclass
class Generate(Experiment[GenerateResult]):
    """Greedy continuation of each prompt under each `<bos>` condition (and, with ``knockout``, each
    condition again with all heads' attention to position 0 removed)."""

    name = "generate"
    command = Command(
        "generate", "consequences",
        "The same prompt continued greedily with and without the sink, side by side.")
    unit_label = "continuations"

    prompts: tuple[str, ...] = setting((DEFAULT_PROMPT,), "prompt text", flag="--prompt")
    bos: tuple[str, ...] = ("add", "strip")
    max_new_tokens: int = setting(40, "greedy tokens per continuation")
    knockout: bool = setting(False, "also decode with all heads' sink knocked out")

    def __post_init__(self) -> None:
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise InputError("give a non-empty prompt")
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1")
        self.prompts = tuple(self.prompts)
        self.bos = tuple(bos_conditions(list(self.bos)))

    def prepare(self, loaded: LoadedModel) -> GenerateContext:
        tokenizer = require_tokenizer(loaded, "generate")
        encoded = {(e.bos, e.prompt): e.ids for e in encode_prompts(loaded, self.prompts, self.bos, None)}
        runs = [(c, False) for c in self.bos] + ([(c, True) for c in self.bos] if self.knockout else [])
        eos = loaded.model.generation_config.eos_token_id
        config = _greedy_config(loaded.model, self.max_new_tokens, getattr(tokenizer, "pad_token_id", None)
                                or (eos[0] if isinstance(eos, list) else eos))
        stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        units = [Continuation(index, text, condition, knocked, encoded[condition, index])
                 for index, text in enumerate(self.prompts) for condition, knocked in runs]
        return GenerateContext(loaded, units, config, stop_ids, SinkKnockout({}))

    def probes(self, ctx: GenerateContext) -> list[Probe]:
        return [ctx.probe]

    def describe(self, units: Sequence[Continuation]) -> str:
        return f"prompt {units[0].prompt_index} bos={units[0].bos}" + (" knockout" if units[0].knockout else "")

    def measure(self, ctx: GenerateContext, engine: Any, units: Sequence[Continuation]) -> dict[str, pd.DataFrame]:
        tokenizer = ctx.tokenizer
        rows = []
        for unit in units:
            ctx.probe.heads = None if unit.knockout else {}  # None: every head of every layer; {}: untouched
            output = engine.generate(torch.tensor([unit.ids]), generation_config=ctx.config)
            new = [int(t) for t in output[0, len(unit.ids):]]
            rows.append({
                "prompt_index": unit.prompt_index, "prompt": unit.prompt,
                "condition": unit.bos + ("+knockout" if unit.knockout else ""), "bos": unit.bos,
                "knockout": unit.knockout, "first_token": tokenizer.convert_ids_to_tokens(unit.ids[0]),
                "n_prompt_tokens": len(unit.ids), "continuation": tokenizer.decode(new, skip_special_tokens=True),
                "new_ids": new, "n_new_tokens": len(new), "stopped_at_eos": bool(new) and new[-1] in ctx.stop_ids,
            })
        return {"generate": pd.DataFrame(rows)}

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        frame = tables["generate"]
        reference = frame.groupby("prompt_index", sort=False)["new_ids"].first()
        frame["common_prefix_tokens"] = [_common_prefix(reference[i], new)
                                         for i, new in zip(frame["prompt_index"], frame["new_ids"], strict=True)]
        return {"generate": frame}

    def summarise(self, ctx: GenerateContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame = tables["generate"]
        labels = list(dict.fromkeys(frame["condition"]))
        return {
            "model": ctx.loaded.info.name, "conditions": labels, "reference": labels[0],
            "max_new_tokens": self.max_new_tokens, "knockout": self.knockout, "decoding": "greedy",
            "n_prompts": len(self.prompts),
            "prompts": [{"prompt": text, "continuations": {
                r.condition: {"text": r.continuation, "n_new_tokens": int(r.n_new_tokens),
                              "common_prefix_tokens": int(r.common_prefix_tokens), "first_token": r.first_token}
                for r in frame[frame["prompt_index"] == i].itertuples()}} for i, text in enumerate(self.prompts)],
        }


@takes_conditions
def generate_side_by_side(
    model: LoadedModel | Any, prompt: str | Sequence[str] | None = None, *, bos: Sequence[str] = ("add", "strip"),
    max_new_tokens: int = 40, knockout: bool = False, out: str | Path | None = None, resume: bool = False,
    progress: bool | Any = True, command: str | None = None,
) -> GenerateResult:
    """Greedy continuation of each prompt under each `<bos>` condition (and, with ``knockout``, each
    condition again with all heads' attention to position 0 removed). The first condition is the
    reference: ``common_prefix_tokens`` counts the new tokens a continuation shares with it."""
    prompts = [DEFAULT_PROMPT] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    experiment = Generate(prompts=tuple(prompts), bos=tuple(bos), max_new_tokens=max_new_tokens, knockout=knockout)
    return run(experiment, model, out=out, resume=resume, progress=progress, command=command)
