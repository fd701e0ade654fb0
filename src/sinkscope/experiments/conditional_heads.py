"""`conditional_heads`: heads that sink by default but attend elsewhere after a trigger token (the paper's
"apostrophe head"), ranked by how much their first-token attention drops after the trigger.

A text-token query "follows the trigger" when the text token before it contains ``trigger`` (decoded
text). Per text, one row per (query, layer, head) in table ``queries``: the attention on position 0
(counted only where the query can see position 0, as scan's alpha), whether the query follows the
trigger, and its attention on the previous token. Table ``conditional_heads`` ranks the heads by
``drop = alpha_other - alpha_trigger``, the means over all texts' queries. Uses the eager kernel (these
texts are short) for the attention on the previous token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import AttentionWeights, FirstTokenAttention, Probe
from ..data import Prompt
from ..errors import InputError
from ..models.loader import LoadedModel
from .base import Context, Experiment, Result, run, takes_conditions
from .inputs import Encoded, bos_conditions, check_context, encode_prompts, prompt_list, require_tokenizer
from .settings import setting

TRIGGER_TEXTS = [
    "I've been well, and I hope that you're doing well too.",
    "She said it's fine, but we don't think they're ready.",
    "The dog's bowl was empty, so it's time we'd fill it.",
    "You'll see that they've left, and we'll follow when it's light.",
    "He isn't sure whether she's coming or if they'd rather stay.",
    "It's the children's garden, and they're proud of what they've grown.",
    "We're late because the bus didn't come and the train wasn't running.",
    "Don't worry: I'm sure it'll work, and you'd know if it couldn't.",
    "The captain's log says they'd sailed north, but it's hard to read.",
    "Let's ask whether you've seen the map that's on Sam's desk.",
    "They'll say it wasn't theirs, though everyone knows it's Alex's.",
    "I'd like to know why the museum's doors aren't open today.",
    "We'd hoped the baker's shop wasn't closed, but it's shut on Sundays.",
    "My brother's car won't start, so he's taking the early train.",
    "If you're cold, there's a blanket in the guest room's cupboard.",
    "They couldn't find the teacher's notes, and she'd left them at home.",
    "It's odd that the river's level hasn't dropped after a dry week.",
    "Nobody's told me where they've put the keys to the shed.",
    "You can't miss it: the town's only bridge is where we'll meet.",
    "She's certain the doctor's advice won't change what she's planned.",
    "I'm afraid the farmer's dog doesn't like strangers near the gate.",
    "We've read the author's letters, and they're kinder than we'd thought.",
    "He'd rather wait until it's quiet before he's going to call.",
    "The students' results weren't posted, so they'll check again tomorrow.",
]


def text_queries(unit: Encoded) -> np.ndarray:
    """Positions of the text-token queries other than position 0 (which only sees itself)."""
    return np.arange(max(1, unit.text_start), unit.text_stop)


@dataclass
class ConditionalContext(Context):
    follows: list[np.ndarray]  # per unit, [T] bool: the query follows a trigger token
    weights: AttentionWeights
    first: FirstTokenAttention


class ConditionalHeadsResult(Result):
    """Tables ``conditional_heads`` (heads ranked by drop) and ``queries`` (per text, query, layer, head)."""



ConditionalResult = ConditionalHeadsResult  # older name


@dataclass
class ConditionalHeads(Experiment[ConditionalHeadsResult]):
    """First-token attention of every head for queries after a trigger token vs all other text queries."""

    name = "conditional_heads"
    unit_label = "texts"

    prompts: list[Prompt] = field(default_factory=list)
    trigger: str = setting("'", "a query follows the trigger when the token before it contains this")
    bos: str = "add"
    max_tokens: int | None = 256
    top: int = setting(8, "heads to list")

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        del settings["prompts"]  # fingerprinted by their token ids
        return settings

    def __post_init__(self) -> None:  # settings checked before any model loads
        if self.top < 1:
            raise InputError("--top must be at least 1")
        if not self.trigger:
            raise InputError("--trigger must not be empty")
        (self.bos,) = bos_conditions(self.bos)

    def prepare(self, loaded: LoadedModel) -> ConditionalContext:
        tokenizer = require_tokenizer(loaded)
        units = encode_prompts(loaded, self.prompts, [self.bos], self.max_tokens)
        check_context(loaded, [len(u) for u in units], what="text")
        follows = [self._follows_trigger(tokenizer, u) for u in units]
        if not any(f.any() for f in follows):
            raise InputError(f"no query follows a token containing {self.trigger!r} in these texts")
        return ConditionalContext(loaded, units, follows, AttentionWeights(), FirstTokenAttention())

    def _follows_trigger(self, tokenizer: Any, unit: Encoded) -> np.ndarray:
        """[T] bool: a text query after position 0 whose previous token is a text token with the trigger."""
        follows = np.zeros(len(unit.ids), dtype=bool)
        for i in text_queries(unit):
            follows[i] = i - 1 >= unit.text_start and self.trigger in tokenizer.decode([unit.ids[i - 1]])
        return follows

    def probes(self, ctx: ConditionalContext) -> list[Probe]:
        return [ctx.weights, ctx.first]

    def engine_options(self) -> dict[str, Any]:
        return {"path": "eager"}

    def measure(self, ctx: ConditionalContext, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        (unit,) = units
        engine.forward(torch.tensor([unit.ids]))
        weights = ctx.weights.stacked()[:, 0].numpy()  # [L, H, T, T]
        visible = np.broadcast_to(ctx.first.per_prompt(0)["visible"].numpy(), weights.shape[:3])  # [L, H, T]
        n_layers, n_heads, n_tokens = weights.shape[:3]
        previous = np.zeros(weights.shape[:3])
        previous[..., 1:] = np.stack([weights[..., i, i - 1] for i in range(1, n_tokens)], -1)
        queries = text_queries(unit)
        shape = (n_layers, n_heads, len(queries))
        return {"queries": pd.DataFrame({
            "prompt": unit.prompt,
            "position": np.broadcast_to(queries, shape).reshape(-1),
            "layer": np.repeat(np.array(ctx.first.layers()), n_heads * len(queries)),
            "head": np.tile(np.repeat(np.arange(n_heads), len(queries)), n_layers),
            "follows_trigger": np.broadcast_to(ctx.follows[unit.prompt][queries], shape).reshape(-1),
            "sees_first": visible[..., queries].reshape(-1),
            "first_attention": weights[..., queries, 0].reshape(-1),
            "previous_token_attention": previous[..., queries].reshape(-1),
        })}

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        queries = tables["queries"]
        trigger, sees_first = queries["follows_trigger"], queries["sees_first"]

        def per_head(column: str, chosen: pd.Series) -> pd.Series:
            """Mean of ``column`` over the chosen queries of each (layer, head) (NaN if there are none)."""
            return queries[column].where(chosen).groupby([queries["layer"], queries["head"]]).mean()

        frame = pd.DataFrame({  # alpha counts only the queries that can see position 0, as scan's
            "alpha_other": per_head("first_attention", ~trigger & sees_first),
            "alpha_trigger": per_head("first_attention", trigger & sees_first),
            "previous_token_attention_trigger": per_head("previous_token_attention", trigger),
            "previous_token_attention_other": per_head("previous_token_attention", ~trigger),
        }).reset_index()
        frame["drop"] = frame["alpha_other"] - frame["alpha_trigger"]
        frame = frame.sort_values("drop", ascending=False, ignore_index=True)
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        return {"conditional_heads": frame, "queries": queries}

    def summarise(self, ctx: ConditionalContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        frame, units = tables["conditional_heads"], ctx.units
        n_trigger = sum(int(f.sum()) for f in ctx.follows)
        top = frame.iloc[0]
        return {
            "trigger": self.trigger, "bos": self.bos, "n_texts": len(units), "n_trigger_queries": n_trigger,
            "n_other_queries": sum(len(text_queries(u)) for u in units) - n_trigger,
            "top_head": {"layer": int(top["layer"]), "head": int(top["head"]),
                         "alpha_other": float(top["alpha_other"]), "alpha_trigger": float(top["alpha_trigger"]),
                         "drop": float(top["drop"]),
                         "previous_token_attention_trigger": float(top["previous_token_attention_trigger"])},
            "top_heads": frame.head(self.top).to_dict("records"),
        }


@takes_conditions
def conditional_heads(
    model: LoadedModel | Any, texts: Sequence[str | Prompt] | None = None, *, trigger: str = "'", bos: str = "add",
    max_tokens: int | None = 256, top: int = 8, out: str | Path | None = None, resume: bool = False,
    progress: bool = True, command: str | None = None,
) -> ConditionalHeadsResult:
    """Rank heads by how much their first-token attention drops for queries right after a trigger token."""
    experiment = ConditionalHeads(prompts=prompt_list(TRIGGER_TEXTS if texts is None else texts), trigger=trigger,
                                  bos=bos, max_tokens=max_tokens, top=top)
    return run(experiment, model, out=out, resume=resume, progress=progress, command=command)
