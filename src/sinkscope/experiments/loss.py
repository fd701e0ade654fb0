"""Next-token loss from final hidden states, and `TextLoss`: the base of the experiments that score it on
windows of one long text (`ablate`, `knockout`).

The loss is computed from the final hidden states in chunks of positions (the LM head applied, and any
final logit soft-capping or scaling the config declares), so memory stays bounded even with Gemma's
262k-token vocabulary; it equals cross-entropy on the model's own logits (tested).

Which targets are scored: every window token except the window's first. Without a prefix (``strip``)
the first text token has nothing before it to be predicted from, so it is left out of *every* condition.
"Position" is the predicted token's index among the window's text tokens (1 … window-1), the same in
every condition (with a prefix, its sequence position is one more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..capture import CaptureEngine
from ..data.texts import LongText
from ..errors import InputError
from ..metrics.loss import token_nll
from ..models.loader import LoadedModel, text_config
from .base import Context, Experiment, ResultT, digest
from .inputs import check_engine_options, check_length, check_windows, long_text, require_tokenizer, text_windows
from .settings import setting

LOSS_CHUNK = 256  # positions per LM-head chunk: 256 x 262k vocab x 4 bytes = 268 MB for Gemma


def output_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states (after the final norm): LM head, then the final soft-cap
    (Gemma-2) or logit scaling (Cohere, Granite) its config declares."""
    config = text_config(model)
    logits = model.get_output_embeddings()(hidden)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and config.model_type.startswith("cohere"):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def hidden_nll(model: Any, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Per-position NLL [...] from final hidden states [..., d] and target ids [...], ``chunk`` positions
    at a time, so only chunk x vocabulary logits exist at once."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    wanted = targets.reshape(-1).to(flat.device)
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, flat.shape[0], chunk):
            logits = output_logits(model, flat[start:start + chunk])
            out[start:start + chunk] = token_nll(logits.float(), wanted[start:start + chunk]).cpu()
    return out.reshape(targets.shape)


def window_nll(engine: CaptureEngine, windows: torch.Tensor, prefix: Sequence[int],
               chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """NLL [B, W-1] of text tokens 1..W-1 of each window [B, W], run with ``prefix`` before them."""
    k = len(prefix)
    ids = torch.cat([torch.tensor(list(prefix), dtype=torch.long).repeat(windows.shape[0], 1), windows], 1)
    hidden = engine.forward(ids).last_hidden_state
    # text token j sits at sequence position k + j and is predicted from position k + j - 1
    predicting = hidden[:, k: k + windows.shape[1] - 1]
    return hidden_nll(engine.model, predicting, windows[:, 1:], chunk)


@dataclass
class TextContext(Context):
    """A loss run's context: the text's windows, (start, token ids) each."""

    windows: list[tuple[int, list[int]]]


@dataclass
class TextLoss(Experiment[ResultT]):
    """Settings and inputs shared by the loss experiments: one long text cut into windows of text tokens,
    scored with a prefix (what sits at position 0) before each window."""

    text: LongText | str | Path | None = None  # the text, a UTF-8 file, or None (Hamlet); kept as a LongText
    window: int = setting(1024, "text tokens per window")
    max_windows: int | None = setting(8, "windows of the text")
    stride: int | None = setting(None, "window start distance (none: the window)")
    batch_size: int = setting(4, "windows per forward pass")
    chunk: int = LOSS_CHUNK
    path: str = "auto"

    def __post_init__(self) -> None:
        # Everything that can be checked without the model is checked here, before it is loaded.
        check_windows(self.window, self.stride, self.max_windows)
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        if self.chunk < 1:
            raise InputError("the loss chunk must be at least 1 position")
        check_engine_options(self.path, "float32")
        self.text = long_text(self.text)

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["text"] = self.source  # the tokens themselves are fingerprinted by `units_digest`
        return settings

    @property
    def source(self) -> str:
        assert isinstance(self.text, LongText)
        return self.text.source

    def text_windows(self, loaded: LoadedModel, longest_prefix: int) -> list[tuple[int, list[int]]]:
        """(start, token ids) of the windows, checked to fit the model with the longest prefix before them."""
        assert isinstance(self.text, LongText)
        tokenizer = require_tokenizer(loaded, self.name)
        windows = text_windows(tokenizer, self.text.text, self.window, self.stride, self.max_windows)
        check_length(loaded, len(windows[0][1]) + longest_prefix, "a window (prefix included)")
        return windows

    def units_digest(self, ctx: Any) -> str:
        return digest([*ctx.units, {"windows": ctx.windows}])

    def engine_options(self) -> dict[str, Any]:
        return {"path": self.path}

    def nll(self, engine: CaptureEngine, windows: Sequence[Sequence[int]], prefix: Sequence[int]) -> np.ndarray:
        """NLL [windows, W-1] of the windows' text tokens 1..W-1, ``batch_size`` windows per forward pass."""
        ids = torch.tensor([list(w) for w in windows], dtype=torch.long)
        return np.concatenate([window_nll(engine, batch, prefix, self.chunk).numpy()
                               for batch in ids.split(self.batch_size)])
