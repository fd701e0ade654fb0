"""`kv`: what a compressed KV cache costs, with and without the sink kept — loss, retrieval, bytes, sink mass.

Methods (the work units, one batch each, so ``--resume`` continues with the next method):

- ``full``: the uncompressed cache, the reference;
- ``int{8,4,2}-{token,channel}``: every key and value quantised as it is written to the cache
  (`capture.kvcache.QuantisedCache`, simulated: quantise then dequantise), with the first ``protect``
  positions kept at full precision;
- ``{window,knorm,snapkv}@ratio``: after the context is prefilled, each full-attention layer keeps
  ``max(1, int(held * (1 - ratio)))`` tokens per key/value head (kvpress's count;
  `capture.kvcache.EvictingCache`), the first ``protect`` positions always kept (``protect`` for knorm
  and SnapKV is this project's extension; the ``*_sinkscope`` presses keep the earlier definitions).
  ``window`` with ``protect`` k is StreamingLLM (k sinks + recent window); with 0, the window alone.

Loss, on the same text tokens for every method: each window of text tokens (``<bos>`` first) is fed
through the method's cache: a prefill of the first ``context`` text tokens, then the rest in chunks of
``step`` tokens, each chunk reading the cache; the scored targets are the text tokens after the first
chunk token (``window - context - 1`` per window), predicted from positions that read the compressed
cache. Δloss against ``full`` is the mean over windows of the paired per-window difference, with a 95%
bootstrap interval over windows (`metrics.stats`). Per-token quantisation gives the same predictions in
any chunking; with per-channel blocks, a chunk that completes a block reads it quantised from its first
query on (the block's scales then include up to ``group_size - 1`` later keys). Retrieval: passkey prompts
(`data.passkey`), the context (everything before the question) prefilled and compressed the same way,
then the question and the key fed through the cache in one forward: correct when greedy decoding would
write the key (teacher-forced argmax at every key token, and no digit after it), plus the key's NLL.
Bytes: what the cache would hold after a window (`nbytes`: quantised
tokens as packed payload + scales). Sink mass: the mean attention (over layers, heads and scored queries)
on the key at position 0, read through the capture engine from the cache (`capture.kvcache.KeptSinkMass`);
0 where the cache has evicted it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import CaptureEngine, KeyAttention
from ..capture.kvcache import (
    KVPRESS_SNAPKV_WINDOW,
    PRESSES,
    EvictingCache,
    KeptSinkMass,
    LastQueries,
    QuantisedCache,
    cached_forward,
    make_press,
    protected_positions,
)
from ..conditions import parse_condition
from ..data.passkey import QUESTION, passkey_prompts
from ..data.texts import LongText
from ..errors import InputError
from ..metrics import activations as activation_metrics
from ..metrics import sink as sink_metrics
from ..metrics.loss import mean_loss
from ..metrics.quantise import AXES, BITS
from ..metrics.stats import bootstrap_interval, paired_difference_interval
from ..models.loader import LoadedModel
from ..models.tokens import encode
from .base import Result, run, takes_conditions
from .inputs import check_length, prefix_ids, require_tokenizer
from .loss import TextLoss, hidden_nll, output_logits

DEFAULT_PRESSES = ("window", "knorm", "snapkv")
SNAPKV_WINDOW = KVPRESS_SNAPKV_WINDOW  # last prefill queries SnapKV scores with (recorded for every prefill)


@dataclass(frozen=True)
class Method:
    """One cache: ``kind`` full | quant | press."""

    kind: str
    protect: int = 0
    bits: int | None = None
    axis: str | None = None
    press: str | None = None
    ratio: float | None = None
    policy: str = "first"  # which k tokens ``protect`` keeps: the first k, the sinks found, the massive ones

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full"
        chosen = "" if self.policy == "first" else f" {self.policy}"
        if self.kind == "quant":
            return f"int{self.bits}-{self.axis} k={self.protect}{chosen}"
        return f"{self.press}@{self.ratio:g} k={self.protect}{chosen}"

    @property
    def family(self) -> str:
        """What the figure groups by (everything but ``protect`` and the ratio)."""
        if self.kind == "quant":
            return f"int{self.bits}-{self.axis}"
        return str(self.press or self.kind)


@dataclass(frozen=True)
class PasskeyItem:
    context: list[int]  # <bos> + everything before the question (prefilled, then compressed)
    question: list[int]
    answer: list[int]  # " <key>", the tokens greedy decoding should write
    key: str
    depth: float


class KVResult(Result):
    """Tables ``kv`` (one row per method), ``windows`` (method x window), ``passkey`` (method x prompt)."""

    experiment = "kv"


@dataclass
class KV(TextLoss):
    """Loss, passkey accuracy, bytes and sink mass per compressed cache (see the module docstring)."""

    name = "kv"
    result_type = KVResult
    unit_label = "caches"

    window: int = 160
    max_windows: int | None = 4
    context: int = 128
    step: int = 32
    bits: tuple[int, ...] = BITS[::-1]
    axes: tuple[str, ...] = AXES
    group_size: int = 32
    protect: tuple[int, ...] = (0, 1, 4)
    presses: tuple[str, ...] = DEFAULT_PRESSES
    ratios: tuple[float, ...] = (0.5, 0.75)
    passkey_length: int = 160
    passkey_depths: tuple[float, ...] = (0.5,)
    passkey_trials: int = 2
    seed: int = 0
    bos: str = "add"
    max_delta_loss: float = 0.02  # the recommendation's tolerances (nats; passkey accuracy)
    max_retrieval_drop: float = 0.02
    policies: tuple[str, ...] = ("first",)  # which k tokens a protect budget keeps (`POLICIES`)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bits = tuple(int(b) for b in self.bits)
        self.protect = tuple(sorted({int(k) for k in self.protect}))
        self.ratios = tuple(float(r) for r in self.ratios)
        self.axes, self.presses, self.policies = tuple(self.axes), tuple(self.presses), tuple(self.policies)
        self.bos = str(parse_condition(self.bos))
        self._check_settings()

    def _check_settings(self) -> None:
        bad_bits = [b for b in self.bits if b not in BITS]
        if bad_bits:
            raise InputError(f"--bits {bad_bits[0]}: choose from {', '.join(map(str, BITS))}")
        bad_axes = [a for a in self.axes if a not in AXES]
        if bad_axes:
            raise InputError(f"--axis {bad_axes[0]}: choose token or channel")
        bad_policies = [p for p in self.policies if p not in POLICIES]
        if bad_policies or not self.policies:
            raise InputError(f"--policy {bad_policies[0] if bad_policies else '(none)'}: choose from "
                             f"{', '.join(POLICIES)}")
        bad_presses = [p for p in self.presses if p not in PRESSES]
        if bad_presses:
            raise InputError(f"--press {bad_presses[0]}: choose from {', '.join(PRESSES)}")
        bad_ratios = [r for r in self.ratios if not 0.0 < r < 1.0]
        if bad_ratios:
            raise InputError(f"--ratio {bad_ratios[0]:g}: a compression ratio lies strictly between 0 and 1")
        protected_positions(min(self.protect, default=0))  # protect < 0 is refused here
        if not self.protect:
            raise InputError("give at least one --protect value (0 = no protection)")
        if self.group_size < 1:
            raise InputError("--group-size must be at least 1")
        self._check_windows()

    def _check_windows(self) -> None:
        if self.step < 1:
            raise InputError("--step must be at least 1 token")
        if not 1 <= self.context <= self.window - 2:
            raise InputError(f"--context {self.context} must lie in 1 .. window - 2 = {self.window - 2} (tokens "
                             "after it are scored)")
        self._check_run_settings()

    def _check_run_settings(self) -> None:
        if self.max_delta_loss < 0 or not 0 <= self.max_retrieval_drop <= 1:
            raise InputError("--max-delta-loss must be >= 0 and --max-retrieval-drop in [0, 1]")
        if self.passkey_length < 0 or self.passkey_trials < 1:
            raise InputError("passkey: need --passkey-length >= 0 (0 = none) and --passkey-trials >= 1")

    # -- units ----------------------------------------------------------------------------------------
    def methods(self) -> list[Method]:
        units = [Method("full")]
        chosen = [(k, policy) for k in self.protect for policy in self.policies if k > 0 or policy == "first"]
        units += [Method("quant", k, bits=b, axis=a, policy=policy) for b in self.bits for a in self.axes
                  for k, policy in chosen]
        units += [Method("press", k, press=p, ratio=r, policy=policy) for p in self.presses for r in self.ratios
                  for k, policy in chosen]
        return units

    def prepare(self, loaded: LoadedModel) -> list[Method]:
        tokenizer = require_tokenizer(loaded, "kv")
        self._prefix = prefix_ids(tokenizer, self.bos)
        self.text_windows(loaded, len(self._prefix))
        head_dim = loaded.info.head_dim
        if self.bits and "token" in self.axes and head_dim % self.group_size:
            raise InputError(f"--group-size {self.group_size} does not divide the head dimension {head_dim}")
        self._passkeys = self._passkey_items(loaded, tokenizer) if self.passkey_length else []
        self._model = loaded.model
        self._tokenizer = tokenizer
        self._prefills: dict[tuple[str, int], tuple[EvictingCache, dict[int, Any]]] = {}
        self._rankings: dict[tuple[str, int, str], list[int]] = {}  # context x policy: positions, best first
        units = self.methods()
        for method in units:  # refuse unsupported models before any work
            self._cache(method)
        return units

    def _passkey_items(self, loaded: LoadedModel, tokenizer: Any) -> list[PasskeyItem]:
        items = []
        for _, depth, _, prompt in passkey_prompts(tokenizer, [self.passkey_length], self.passkey_depths,
                                                   self.passkey_trials, self.seed):
            ids = encode(tokenizer, prompt.text, self.bos, None)
            head = encode(tokenizer, prompt.text[: -len(QUESTION)].rstrip(), self.bos, None)
            shared = next((i for i, (a, b) in enumerate(zip(ids, head, strict=False)) if a != b),
                          min(len(ids), len(head)))
            shared = min(shared, len(ids) - 1)
            answer = encode(tokenizer, prompt.text + f" {prompt.key}", self.bos, None)[len(ids):]
            if not answer or encode(tokenizer, prompt.text + f" {prompt.key}", self.bos, None)[:len(ids)] != ids:
                answer = encode(tokenizer, f" {prompt.key}", "strip", None)
            check_length(loaded, len(ids) + len(answer), "a passkey prompt with its answer")
            items.append(PasskeyItem(ids[:shared], ids[shared:], answer, prompt.key, depth))
        return items

    def units_digest(self, units: Sequence[Any]) -> str:
        return super().units_digest([*units, {"passkey": [item.__dict__ for item in self._passkeys]}])

    def describe(self, units: Sequence[Method]) -> str:
        return units[0].label

    # -- caches ---------------------------------------------------------------------------------------
    def _cache(self, method: Method, protect: int | Sequence[int] | None = None) -> QuantisedCache:
        if method.kind == "quant":
            return QuantisedCache(self._model, method.bits, str(method.axis), self.group_size,
                                  method.protect if protect is None else protect)
        if method.kind == "press":
            return EvictingCache(self._model)
        return QuantisedCache(self._model)

    def open(self, loaded: LoadedModel) -> CaptureEngine:
        self._mass = KeptSinkMass(QuantisedCache(loaded.model))
        self._queries = LastQueries(SNAPKV_WINDOW)
        return CaptureEngine(loaded, [self._mass, self._queries], path=self.path)

    def _protected(self, engine: CaptureEngine, method: Method, key: tuple[str, int], ids: list[int]) -> list[int]:
        """The positions the method's protect budget keeps in this context: the first k, or the k found by its
        policy in the uncompressed context (`protection_ranking`), ranked once per context and policy."""
        if method.policy == "first" or method.protect == 0:
            return list(range(method.protect))
        ranked = self._rankings.get((*key, method.policy))
        if ranked is None:
            ranked = protection_ranking(engine, ids, method.policy)
            self._rankings[(*key, method.policy)] = ranked
        return sorted(ranked[:method.protect])

    def _filled(self, engine: CaptureEngine, method: Method, key: tuple[str, int], ids: list[int]) -> QuantisedCache:
        """The method's cache after the prefill of ``ids`` (compressed, for a press)."""
        protect = self._protected(engine, method, key, ids)
        if method.kind != "press":
            cache = self._cache(method, protect)
            self._mass.cache = cache
            cached_forward(engine, cache, torch.tensor([ids]), range(len(ids)))
            return cache
        if key not in self._prefills:  # the prefill is the same for every press: run it once
            cache = EvictingCache(self._model)
            self._mass.cache = cache
            cached_forward(engine, cache, torch.tensor([ids]), range(len(ids)))
            self._prefills[key] = (cache, dict(self._queries.records))
        prefilled, queries = self._prefills[key]
        compressed = copy.deepcopy(prefilled)
        assert method.press is not None and method.ratio is not None
        compressed.compress(make_press(method.press), method.ratio, protect, queries)
        return compressed

    # -- measuring ------------------------------------------------------------------------------------
    def _window(self, engine: CaptureEngine, method: Method, index: int, ids: list[int]) -> dict[str, Any]:
        """Loss, sink mass and bytes of one text window through the method's cache."""
        sequence = list(self._prefix) + list(ids)
        start = len(self._prefix) + self.context  # the first token fed after the prefill
        cache = self._filled(engine, method, ("window", index), sequence[:start])
        self._mass.cache = cache
        nll, mass = [], []
        for chunk in range(start, len(sequence) - 1, self.step):
            stop = min(chunk + self.step, len(sequence) - 1)
            hidden = cached_forward(engine, cache, torch.tensor([sequence[chunk:stop]]), range(chunk, stop))
            targets = torch.tensor([sequence[chunk + 1:stop + 1]])
            nll.append(hidden_nll(engine.model, hidden.last_hidden_state, targets, self.chunk)[0])
            mass.append(torch.stack([self._mass.records[layer] for layer in sorted(self._mass.records)])[:, 0])
        values = torch.cat(nll).numpy()
        return {"window": index, "loss": mean_loss(values), "n_tokens": int(values.size),
                "sink_mass": float(torch.cat(mass, -1).mean()), "bytes": cache.nbytes(),
                "bytes_full_layers": cache.nbytes(full_attention_only=True)}

    def _passkey(self, engine: CaptureEngine, method: Method, index: int, item: PasskeyItem) -> dict[str, Any]:
        """Greedy exact match in one teacher-forced forward: the question and `` <key>`` are fed through the
        compressed cache; the answer is correct when the argmax at every answer position is the key's next
        token and the argmax after the key is not a digit (exactly what greedy decoding would write, when it
        spells the key with these tokens). ``key_nll``: the mean NLL of the key's tokens."""
        cache = self._filled(engine, method, ("passkey", index), item.context)
        self._mass.cache = cache
        fed = list(item.question) + list(item.answer)
        start = len(item.context)
        hidden = cached_forward(engine, cache, torch.tensor([fed]), range(start, start + len(fed))).last_hidden_state
        predicting = hidden[0, len(item.question) - 1:]  # the last question token predicts the first answer token
        with torch.inference_mode():
            logits = output_logits(engine.model, predicting).float()
        greedy = logits.argmax(-1).tolist()
        answer = torch.tensor(item.answer)
        nll = torch.nn.functional.cross_entropy(logits[:-1], answer, reduction="mean")
        after = self._tokenizer.decode([greedy[-1]])
        correct = greedy[:-1] == list(item.answer) and not any(c.isdigit() for c in after)
        return {"prompt": index, "depth": item.depth, "key": item.key,
                "answer": self._tokenizer.decode(greedy[:-1] + [greedy[-1]], skip_special_tokens=True),
                "correct": bool(correct), "key_nll": float(nll)}

    def measure(self, engine: CaptureEngine, units: Sequence[Method]) -> dict[str, pd.DataFrame]:
        method = units[0]
        columns = {"method": method.label, "kind": method.kind, "family": method.family, "protect": method.protect,
                   "policy": method.policy}
        windows = pd.DataFrame([{**columns, **self._window(engine, method, i, ids)}
                                for i, (_, ids) in enumerate(self._windows)])
        passkey = pd.DataFrame([{**columns, **self._passkey(engine, method, i, item)}
                                for i, item in enumerate(self._passkeys)],
                               columns=[*columns, "prompt", "depth", "key", "answer", "correct", "key_nll"])
        return {"windows": windows, "passkey": passkey, "methods": pd.DataFrame([{
            **columns, "bits": method.bits, "axis": method.axis, "press": method.press, "ratio": method.ratio}])}

    # -- gathering ------------------------------------------------------------------------------------
    def finalise(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        windows, passkey, methods = tables["windows"], tables["passkey"], tables["methods"]
        reference = windows[windows["method"] == "full"].sort_values("window")
        rows = []
        for method in methods.itertuples(index=False):
            own = windows[windows["method"] == method.method].sort_values("window")
            delta, low, high = paired_difference_interval(own["loss"].to_numpy(), reference["loss"].to_numpy(),
                                                          seed=self.seed)
            prompts = passkey[passkey["method"] == method.method]
            answers = prompts["correct"].to_numpy(dtype=float)
            accuracy = bootstrap_interval(answers, seed=self.seed) if answers.size else (np.nan,) * 3
            rows.append({
                **method._asdict(), "loss": float(own["loss"].mean()), "delta_loss": delta, "delta_low": low,
                "delta_high": high, "passkey_accuracy": accuracy[0], "passkey_low": accuracy[1],
                "passkey_high": accuracy[2],
                "key_nll": float(prompts["key_nll"].mean()) if answers.size else np.nan,
                "bytes": float(own["bytes"].mean()),
                "bytes_ratio": float(own["bytes"].mean() / reference["bytes"].mean()),
                # the full-attention layers alone: what eviction compresses (sliding layers are left alone)
                "bytes_full_layers_ratio": float(own["bytes_full_layers"].mean()
                                                 / reference["bytes_full_layers"].mean()),
                "sink_mass": float(own["sink_mass"].mean()),
                "sink_mass_kept": float(own["sink_mass"].mean() / reference["sink_mass"].mean()),
                "n_windows": len(own), "n_tokens": int(own["n_tokens"].sum()),
            })
        kv = pd.DataFrame(rows).astype({"bits": "Int64"})
        kv["recommended"] = kv["method"] == recommend(kv, self.max_delta_loss, self.max_retrieval_drop)
        return {"kv": kv, "windows": windows, "passkey": passkey}

    def summarise(self, loaded: LoadedModel, tables: dict[str, pd.DataFrame], units: Sequence[Method]
                  ) -> dict[str, Any]:
        kv = tables["kv"]
        full = kv[kv["method"] == "full"].iloc[0]
        chosen = kv[kv["recommended"]]
        recommendation: dict[str, Any] = {
            "max_delta_loss": self.max_delta_loss, "max_retrieval_drop": self.max_retrieval_drop,
            "rule": "the fewest bytes among the caches whose Δloss interval lies below max_delta_loss and whose "
                    "passkey accuracy interval lies above full − max_retrieval_drop (no passkey: loss alone)",
            "method": None if chosen.empty else str(chosen["method"].iloc[0]),
        }
        if not chosen.empty:
            row = chosen.iloc[0]
            recommendation.update({"bytes_ratio": float(row["bytes_ratio"]), "delta_loss": float(row["delta_loss"]),
                                   "delta_ci": [float(row["delta_low"]), float(row["delta_high"])],
                                   "passkey_accuracy": float(row["passkey_accuracy"])})
        return {
            "recommendation": recommendation,
            "model": loaded.info.name, "text": self.source, "window": self.window, "context": self.context,
            "step": self.step, "n_windows": len(self._windows), "scored_per_window": self.window - self.context - 1,
            "group_size": self.group_size, "passkey_length": self.passkey_length, "policies": list(self.policies),
            "n_passkey_prompts": len(self._passkeys),
            "full": {"loss": float(full["loss"]), "bytes": float(full["bytes"]), "sink_mass": float(full["sink_mass"]),
                     "passkey_accuracy": float(full["passkey_accuracy"])},
            "methods": {r.method: {"delta_loss": r.delta_loss, "delta_low": r.delta_low, "delta_high": r.delta_high,
                                   "passkey_accuracy": r.passkey_accuracy, "bytes_ratio": r.bytes_ratio,
                                   "sink_mass_kept": r.sink_mass_kept} for r in kv.itertuples()},
        }


POLICIES = ("first", "found", "massive")
FOUND_MIN_QUERIES = 16  # a key's mean attention counts once this many queries see it (not the last few keys)


def protection_ranking(engine: CaptureEngine, ids: list[int], policy: str) -> list[int]:
    """Positions of a context, best first, for a protect budget under ``policy`` (one uncompressed forward):
    ``found``: by the largest mean attention the key receives in any layer and head (the sinks found in the
    context, KVSink's criterion: `metrics.sink.key_sink_scores`); ``massive``: by the token's largest activation
    relative to its depth's median, over depths (PrefixQuant's: `metrics.activations.token_massive_ratio`). Ties:
    the earlier position first."""
    tokens = torch.tensor([ids])
    if policy == "found":
        probe = KeyAttention()
        with engine.probing([probe]):
            engine.forward(tokens)
        layers = sorted(probe.records)
        received = torch.stack([probe.records[layer]["received"][0] for layer in layers]).numpy()
        seen = torch.stack([probe.records[layer]["queries"][0] for layer in layers]).numpy()
        scores = sink_metrics.key_sink_scores(received, seen, min(FOUND_MIN_QUERIES, max(1, len(ids) // 4)))
    elif policy == "massive":
        with engine.probing([]):
            residual = engine.forward(tokens, residual=True).residual[:, 0]  # [depths, n, d]
        scores = activation_metrics.token_massive_ratio(residual[1:].float().numpy())  # the embeddings left out
    else:
        raise InputError(f"unknown protect policy '{policy}' (choose from {', '.join(POLICIES)})")
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def recommend(kv: pd.DataFrame, max_delta_loss: float, max_retrieval_drop: float) -> str | None:
    """The cheapest cache (fewest bytes held) whose quality stays within the tolerances *by its intervals*:
    the upper end of its Δloss interval at most ``max_delta_loss``, and the lower end of its passkey accuracy
    interval at least the full cache's accuracy minus ``max_retrieval_drop`` (where a passkey was run). The
    full cache itself when nothing cheaper qualifies; None without a full cache."""
    full = kv[kv["method"] == "full"]
    if full.empty:
        return None
    accuracy = float(full["passkey_accuracy"].iloc[0])
    fits = kv["delta_high"] <= max_delta_loss
    if np.isfinite(accuracy):
        fits &= kv["passkey_low"] >= accuracy - max_retrieval_drop
    candidates = kv[fits | (kv["method"] == "full")]
    return str(candidates.sort_values(["bytes_ratio", "delta_loss"]).iloc[0]["method"])


@takes_conditions
def kv(
    model: LoadedModel | Any, text: str | Path | LongText | None = None, *, window: int = 160, context: int = 128,
    max_windows: int = 4, step: int = 32, bits: Sequence[int] = (8, 4, 2), axes: Sequence[str] = AXES,
    group_size: int = 32, protect: Sequence[int] = (0, 1, 4), presses: Sequence[str] = DEFAULT_PRESSES,
    ratios: Sequence[float] = (0.5, 0.75), passkey_length: int = 160,
    passkey_depths: Sequence[float] = (0.5,), passkey_trials: int = 2, bos: str = "add",
    max_delta_loss: float = 0.02, max_retrieval_drop: float = 0.02, policies: Sequence[str] = ("first",),
    out: str | Path | None = None, resume: bool = False, progress: bool | Any = True, command: str | None = None,
) -> KVResult:
    """Loss (Δ vs the full cache, with intervals), passkey accuracy, bytes and sink mass for quantised caches
    (``bits`` x ``axes`` x ``protect``) and eviction presses (``presses`` x ``ratios`` x ``protect``), under one
    condition ``bos`` (`sinkscope.conditions`: what sits at position 0, and any intervention). ``policies``: which
    k tokens a protect budget keeps (`POLICIES`: the first k, the sinks found in the context, the tokens with
    massive activations), each compared at the same k, so at the same bytes."""
    experiment = KV(text=text, window=window, context=context, max_windows=max_windows, step=step, bits=tuple(bits),
                    axes=tuple(axes), group_size=group_size, protect=tuple(protect), presses=tuple(presses),
                    ratios=tuple(ratios), passkey_length=passkey_length, passkey_depths=tuple(passkey_depths),
                    passkey_trials=passkey_trials, bos=bos, max_delta_loss=max_delta_loss,
                    max_retrieval_drop=max_retrieval_drop, policies=tuple(policies))
    result = run(experiment, model, out=out, resume=resume, progress=progress, command=command)
    assert isinstance(result, KVResult)
    return result
