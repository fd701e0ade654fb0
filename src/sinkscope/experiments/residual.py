"""The residual stream as the residual-stream experiments read it (rank and representational collapse,
massive activations, perturbation spread, over-squashing), checked for inf/NaN on the way.

Indexing, in every table of these experiments: ``depth`` 0 is the embeddings (what enters layer 0),
depth d the output of layer d - 1, and depth L (L = number of layers) the output of the last layer,
taken before the final norm. Attention blocks are ``layer`` 0..L-1 everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from ..errors import NonFiniteError
from .inputs import pad_right

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
