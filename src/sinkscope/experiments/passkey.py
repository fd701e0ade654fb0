"""`passkey`: retrieve a number hidden in filler text, with vs without `<bos>` (RULER-style needle task).

For every `<bos>` condition × length × depth × trial (the work units, one at a time), the prompt from
`sinkscope.data.passkey` is encoded (``add``: `<bos>` + text tokens; ``strip``: the same text tokens
alone), the model decodes greedily, and the answer is correct when its first number is exactly the
five-digit key. ``key_position`` is where the key sentence starts in the encoded sequence: the text span
is found by alignment (`inputs.encode_one`), so a tokenizer that appends an `<eos>` does not shift it.
One row per prompt; accuracy per condition and per condition × length; a length × depth heatmap per
condition (`report.figures.consequences`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..data.passkey import passkey_prompts, score_answer
from ..errors import InputError
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result
from .decoding import decoding_context, generate
from .functions import experiment_function
from .inputs import bos_conditions, context_limit, encode_one, require_tokenizer
from .settings import Command, setting
from .whereabouts import TABLE as WHEREABOUTS
from .whereabouts import whereabouts_of_heads

COLUMNS = ["bos", "length", "depth", "trial", "key", "n_tokens", "key_position", "answer", "correct", "seconds"]


@dataclass(frozen=True)
class Trial:
    """One passkey prompt under one `<bos>` condition."""

    bos: str
    length: int
    depth: float
    trial: int
    key: str
    text: str
    key_token_start: int  # where the key sentence starts among the text tokens


@dataclass
class PasskeyContext(Context):
    generation: Any  # greedy, max_new_tokens, the model's eos


class PasskeyResult(Result):
    """Table ``passkey``: one row per bos x length x depth x trial."""



def _generation_config(model: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    # Greedy, and nothing else from the model's own generation defaults (sampling, top-k, ...).
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)


@dataclass
class Passkey(Experiment[PasskeyResult]):
    """Greedy passkey retrieval per (bos, length, depth, trial)."""

    name = "passkey"
    command = Command(
        "passkey", "consequences",
        "Passkey retrieval: a 5-digit key hidden in filler text, greedy answer, with vs without <bos>.")
    unit_label = "prompts"

    lengths: tuple[int, ...] = setting((512, 1024, 2048, 4096), "prompt length in text tokens", flag="--length")
    depths: tuple[float, ...] = setting((0.1, 0.3, 0.5, 0.7, 0.9), "depth of the key in [0, 1]", flag="--depth")
    trials: int = setting(3, "keys per length x depth cell")
    bos: tuple[str, ...] = ("add", "strip")
    seed: int = setting(0, "seed of the keys")
    max_new_tokens: int = setting(8, "greedy tokens decoded for the answer")

    def __post_init__(self) -> None:
        if self.trials < 1 or not self.lengths or not self.depths or not self.bos:
            raise InputError("passkey needs at least one length, depth, <bos> condition and trial")
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if min(self.lengths) < 1:
            raise InputError("--length must be at least 1 token")
        self.lengths = tuple(int(n) for n in self.lengths)
        self.depths = tuple(float(d) for d in self.depths)
        self.bos = tuple(bos_conditions(list(self.bos)))

    def prepare(self, loaded: LoadedModel) -> PasskeyContext:
        tokenizer = require_tokenizer(loaded, "passkey")
        limit = context_limit(loaded)
        if limit is not None and max(self.lengths) + 1 + self.max_new_tokens > limit:
            raise InputError(f"length {max(self.lengths)} (+ <bos> + {self.max_new_tokens} new tokens) exceeds the "
                             f"model's max_position_embeddings {limit}; choose lengths up to "
                             f"{limit - 1 - self.max_new_tokens}")
        prompts = passkey_prompts(tokenizer, self.lengths, self.depths, self.trials, self.seed)
        units = [Trial(mode, length, depth, trial, prompt.key, prompt.text, prompt.key_token_start)
                 for mode in self.bos for length, depth, trial, prompt in prompts]
        return PasskeyContext(loaded, units, _generation_config(loaded.model, self.max_new_tokens))

    def open(self, ctx: PasskeyContext) -> contextlib.AbstractContextManager[Any]:
        return decoding_context(ctx.loaded, self.bos)  # the model itself, or the engine for an intervention

    def describe(self, units: Sequence[Trial]) -> str:
        return f"bos={units[0].bos} length={units[0].length}"

    def measure(self, ctx: PasskeyContext, model: Any, units: Sequence[Trial]) -> dict[str, pd.DataFrame]:
        rows, heads = [], []
        for unit in units:
            encoded = encode_one(ctx.tokenizer, unit.text, unit.bos, None)
            heads.append(encoded)
            tick = time.time()
            answer = _answer(model, ctx.tokenizer, encoded.ids, ctx.generation)
            rows.append({
                "bos": unit.bos, "length": unit.length, "depth": unit.depth, "trial": unit.trial, "key": unit.key,
                "n_tokens": len(encoded.ids), "key_position": encoded.text_start + unit.key_token_start,
                "answer": answer, "correct": score_answer(answer, unit.key), "seconds": round(time.time() - tick, 3),
            })
        return {"passkey": pd.DataFrame(rows, columns=COLUMNS), WHEREABOUTS: whereabouts_of_heads(
            model, heads, [f"length={u.length} depth={u.depth} trial={u.trial}" for u in units])}

    def summarise(self, ctx: PasskeyContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame = tables["passkey"]
        by_bos = frame.groupby("bos", sort=False)
        return {
            "model": ctx.loaded.info.name, "bos": list(self.bos), "lengths": list(self.lengths),
            "depths": list(self.depths), "trials": self.trials, "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "accuracy": {m: float(g["correct"].mean()) for m, g in by_bos},
            "accuracy_by_length": {m: {str(n): float(a) for n, a in g.groupby("length")["correct"].mean().items()}
                                   for m, g in by_bos},
            "accuracy_by_depth": {m: {f"{d:g}": float(a) for d, a in g.groupby("depth")["correct"].mean().items()}
                                  for m, g in by_bos},
            "n_prompts": len(frame),
        }


def _answer(runner: Any, tokenizer: Any, ids: list[int], generation: Any) -> str:
    output = generate(runner, ids, generation)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


passkey = experiment_function(
    Passkey, "passkey",
    """Greedy passkey retrieval per (bos, length, depth, trial). ``lengths`` count text tokens (the `<bos>`, when
    added, comes on top). ``out``: rows are written to ``out/parts/`` as they finish; ``resume`` continues an
    interrupted run.""")
