"""The residual stream as the residual-stream experiments read it (rank and representational collapse,
massive activations, perturbation spread, over-squashing), checked for inf/NaN on the way.

Indexing, in every table of these experiments: ``depth`` 0 is the embeddings (what enters layer 0),
depth d the output of layer d - 1, and depth L (L = number of layers) the output of the last layer,
taken before the final norm. Attention blocks are ``layer`` 0..L-1 everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import InputError, NonFiniteError
from .base import ResultT
from .inputs import Encoded, PromptExperiment, condition_batches, pad_right
from .settings import setting

DEPTH_CONVENTION = ("depth 0 = embeddings, depth d = output of layer d-1 (layers 0..L-1); "
                    "depth L is taken before the final norm")


def check_residual_finite(residual: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if one sequence's residual stream [depths, n, d] holds inf/NaN, naming the
    first depth where they appear (a float16 model overflowing, typically)."""
    with torch.no_grad():
        finite = torch.isfinite(residual.detach()).flatten(1).all(-1)  # [depths]
    if bool(finite.all()):
        return
    depth = int((~finite).nonzero()[0])
    where = "the embeddings" if depth == 0 else f"the output of layer {depth - 1}"
    raise NonFiniteError(f"{what}: the residual stream holds inf/NaN from depth {depth} ({where}) on, in "
                         f"{str(residual.dtype).removeprefix('torch.')}; the model overflows there: load it with "
                         "--dtype float32 (or bfloat16)")


def residual_streams(engine: Any, sequences: Sequence[Sequence[int]], labels: Sequence[str]
                     ) -> list[torch.Tensor]:
    """One right-padded forward of ``sequences``; per sequence its residual stream [depths, n, d] (the
    model's dtype), checked finite. ``labels`` name the sequences in the error message."""
    residual = engine.forward(*pad_right(sequences), residual=True).residual  # [depths, B, T, d]
    rows = []
    for row, (seq, label) in enumerate(zip(sequences, labels, strict=True)):
        stream = residual[:, row, : len(seq)]
        check_residual_finite(stream, label)
        rows.append(stream)
    return rows


def first_token_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{bos: {token at position 0: number of prompts}}."""
    firsts = frame.drop_duplicates(["bos", "prompt"])
    return {str(b): {str(k): int(v) for k, v in group["first_token"].value_counts().items()}
            for b, group in firsts.groupby("bos", sort=False)}


@dataclass
class ResidualPromptExperiment(PromptExperiment[ResultT]):
    """Prompts x conditions measured on each prompt's residual stream: one right-padded forward per batch of
    ``batch_size`` prompts of one condition, then `rows` per prompt on its stream [depths, n, d] in float64.
    The tables of a batch are the prompts' rows, concatenated in prompt order."""

    batch_size: int = setting(8, "sequences per forward pass")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")

    def batches(self, units: Sequence[Encoded]) -> list[list[int]]:
        return condition_batches(units, self.batch_size)

    def measure(self, ctx: Any, engine: Any, units: Sequence[Encoded]) -> dict[str, pd.DataFrame]:
        streams = residual_streams(engine, [u.ids for u in units], [self.label(u) for u in units])
        pieces: dict[str, list[pd.DataFrame]] = {}
        for row, (unit, stream) in enumerate(zip(units, streams, strict=True)):
            for name, frame in self.rows(ctx, stream.to(torch.float64).cpu().numpy(), unit, row).items():
                pieces.setdefault(name, []).append(frame)
        return {name: pd.concat(frames, ignore_index=True) for name, frames in pieces.items()}

    def rows(self, ctx: Any, residual: np.ndarray, unit: Encoded, row: int) -> dict[str, pd.DataFrame]:
        """The tables' rows of one prompt (``row``: its row in the batch, for probes that read the forward)."""
        raise NotImplementedError
