"""`kv`: what a compressed KV cache costs, with and without the sink kept — loss, retrieval, bytes, sink mass.

Methods (the work units, one batch each, so ``--resume`` continues with the next method):

- ``full``: the uncompressed cache, the reference;
- ``int{8,4,2}-{token,channel}``: every key and value quantised as it is written to the cache
  (`capture.kvcache.QuantisedCache`, simulated: quantise then dequantise), with the first ``protect``
  positions kept at full precision. With ``quant_prefill`` full (the default) the context's prefill reads its
  own keys and values at full precision and the cache stores them quantised, as HF's QuantizedCache and vLLM's
  prefill do (it is then the full cache's prefill, shared); every later forward reads the quantised cache.
  With ``quant_prefill`` quantised the prefill reads the cache too, each layer's quantisation felt by the next;
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
query on (the block's scales then include up to ``group_size - 1`` later keys). Retrieval, through the
compressed cache: ``tasks`` (the passkey, `data.passkey`, and RULER-style tasks, `data.ruler`), ``retrieval_trials``
prompts per task, each with its own key and the depths cycling through ``retrieval_depths``. The context
(everything before the question) is prefilled and compressed the same way, then the question is fed and the
answer decoded greedily through the cache; the score is the task's (RULER's ``string_match_all``; the passkey's
first number). When the greedy tokens follow the expected answer, one teacher-forced forward decides the score
(what greedy decoding would write begins with the answer, and what follows cannot lower the score); otherwise
the answer is decoded token by token. ``answer_nll``: the mean NLL of the expected answer's tokens. Δretrieval
against ``full`` is the paired difference over prompts, with its bootstrap interval.
Bytes: what the cache would hold after a window (`nbytes`: quantised
tokens as packed payload + scales). Sink mass: the mean attention (over layers, heads and scored queries)
on the key at position 0, read through the capture engine from the cache (`capture.probes.KeptSinkMass`);
0 where the cache has evicted it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    QuantisedCache,
    cached_forward,
    make_press,
    protected_positions,
)
from ..capture.probes import KeptSinkMass, LastQueries
from ..conditions import parse_condition
from ..data import ruler as ruler_tasks
from ..data.passkey import QUESTION, make_passkey_prompt, score_answer
from ..data.texts import LongText
from ..errors import InputError
from ..metrics import activations as activation_metrics
from ..metrics import sink as sink_metrics
from ..metrics.loss import mean_loss
from ..metrics.quantise import AXES, BITS
from ..metrics.stats import bootstrap_interval, paired_difference_interval
from ..models.loader import LoadedModel
from ..models.tokens import encode
from .base import Result, digest, run, takes_conditions
from .decoding import greedy_through_cache
from .inputs import check_length, prefix_ids, require_tokenizer
from .loss import TextContext, TextLoss, hidden_nll, output_logits
from .settings import given_settings, setting

DEFAULT_PRESSES = ("window", "knorm", "snapkv")
QUANT_PREFILLS = ("full", "quantised")
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
class RetrievalItem:
    """One retrieval prompt, split where the cache is compressed."""

    task: str
    trial: int
    depth: float | None
    context: list[int]  # <bos> + everything before the question (prefilled, then compressed)
    question: list[int]
    answer: list[int]  # the expected answer written out once (teacher-forced: its NLL, and the fast path)
    expected: tuple[str, ...]  # what the answer must contain (the passkey: its first number is the key)
    max_new_tokens: int

    def score(self, written: str) -> float:
        if self.task == "passkey":
            return float(score_answer(written, self.expected[0]))
        return ruler_tasks.score(written, self.expected)


RETRIEVAL_TASKS = ("passkey", *ruler_tasks.TASKS)
PASSKEY_SLACK = 4  # tokens decoded past the passkey answer (enough to see whether the number goes on)
RETRIEVAL_SUMMARY = ("retrieval", "retrieval_low", "retrieval_high", "retrieval_delta", "retrieval_delta_low",
                     "retrieval_delta_high", "answer_nll", "n_prompts")
RETRIEVAL_COLUMNS = ("task", "prompt", "trial", "depth", "answer", "score", "answer_nll", "decoded")


@dataclass
class KVContext(TextContext):
    """A `kv` run's state: the prefix and retrieval prompts, the probes (each attached only where it is read;
    probes only read, so the numbers are the same either way: the sink mass while scoring windows, SnapKV's last
    queries during a press's prefill) and what is computed once per context and shared by every cache."""

    prefix: list[int]
    retrievals: list[RetrievalItem]
    mass: KeptSinkMass
    queries: LastQueries
    # context key ("window" | "retrieval", index) -> the uncompressed prefill and the last queries SnapKV reads
    prefills: dict[tuple[str, int], tuple[EvictingCache, dict[int, Any]]] = field(default_factory=dict)
    rankings: dict[tuple[str, int, str], list[int]] = field(default_factory=dict)  # context x policy: best first


class KVResult(Result):
    """Tables ``kv`` (one row per method), ``windows`` (method x window), ``retrieval`` (method x prompt) and
    ``retrieval_tasks`` (method x task)."""



@dataclass
class KV(TextLoss[KVResult]):
    """Loss, retrieval through the cache, bytes and sink mass per compressed cache (see the module docstring)."""

    name = "kv"
    unit_label = "caches"

    window: int = setting(160, "text tokens per window (<bos> comes on top)")
    max_windows: int | None = setting(4, "windows of the text")
    context: int = setting(128, "text tokens prefilled (and compressed) before scoring")
    step: int = setting(32, "tokens per forward when scoring through the cache")
    bits: tuple[int, ...] = setting(BITS[::-1], "quantisation bits: 2 | 4 | 8 (none: no quantised cache)")
    axes: tuple[str, ...] = setting(AXES, "quantisation scales per token | channel", flag="--axis")
    group_size: int = setting(32, "channels (per token) or tokens (per channel) per scale")
    quant_prefill: str = setting("full", "what a quantised cache's prefill reads: full (its own keys and values "
                                 "at full precision, stored quantised, as HF's QuantizedCache and vLLM's prefill "
                                 "do) | quantised (the cache as written, each layer's quantisation felt by the "
                                 "next)")
    protect: tuple[int, ...] = setting((0, 1, 4), "tokens kept at full precision / never evicted (0: none)")
    presses: tuple[str, ...] = setting(DEFAULT_PRESSES, "eviction policy: window | knorm | snapkv | "
                                       "expected_attention (kvpress's definitions), or the earlier *_sinkscope "
                                       "variants", flag="--press")
    ratios: tuple[float, ...] = setting((0.5, 0.75), "fraction evicted, in (0, 1)", flag="--ratio")
    tasks: tuple[str, ...] = setting(("passkey",), "retrieval through the cache: passkey | a RULER-style task "
                                     "(niah_single, niah_multikey, ...: `sinkscope ruler --help`)", flag="--task")
    retrieval_length: int = setting(160, "text tokens per retrieval prompt (0: no retrieval)",
                                    aliases=("--passkey-length",))
    retrieval_depths: tuple[float, ...] = setting((0.5,), "where the needle sits (fraction of the context), "
                                                  "cycled over a task's prompts", flag="--retrieval-depth")
    retrieval_trials: int = setting(2, "retrieval prompts per task, each with its own key",
                                    aliases=("--passkey-trials",))
    seed: int = setting(0, "seed of the retrieval prompts' keys and needles")
    bos: str = "add"
    max_delta_loss: float = setting(0.02, "the recommendation: Δloss tolerated (nats), by the upper end of its "
                                    "interval")
    max_retrieval_drop: float = setting(0.02, "the recommendation: retrieval drop tolerated, by the lower end of "
                                        "its paired interval")
    policies: tuple[str, ...] = setting(("first",), "which k tokens a --protect budget keeps: first (the first "
                                        "k) | found (the k keys drawing the most attention in the context: the "
                                        "sinks found) | massive (the k tokens with the largest activations)",
                                        flag="--policy")
    press_policies: tuple[str, ...] | None = setting(None, "--policy for the eviction presses alone (default: "
                                                     "--policy)", flag="--press-policy")
    quant_policies: tuple[str, ...] | None = setting(None, "--policy for the quantised caches alone (default: "
                                                     "--policy)", flag="--quant-policy")
    policy_presses: tuple[str, ...] | None = setting(None, "the presses that also spend a --protect budget by the "
                                                     "policies other than first (default: every press; the others "
                                                     "keep the first k)", flag="--policy-press")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bits = tuple(int(b) for b in self.bits)
        self.protect = tuple(sorted({int(k) for k in self.protect}))
        self.ratios = tuple(float(r) for r in self.ratios)
        self.axes, self.presses, self.policies = tuple(self.axes), tuple(self.presses), tuple(self.policies)
        self.policy_presses = None if self.policy_presses is None else tuple(self.policy_presses)
        self.press_policies = tuple(self.policies if self.press_policies is None else self.press_policies)
        self.quant_policies = tuple(self.policies if self.quant_policies is None else self.quant_policies)
        self.tasks = tuple(self.tasks)
        self.retrieval_depths = tuple(float(d) for d in self.retrieval_depths)
        self.bos = str(parse_condition(self.bos))
        self._check_settings()

    def _check_settings(self) -> None:
        _choose("--bits", self.bits, BITS)
        _choose("--axis", self.axes, AXES)
        for chosen in (self.policies, self.press_policies, self.quant_policies):
            if not chosen:
                raise InputError(f"--policy (none): choose from {', '.join(POLICIES)}")
            _choose("--policy", chosen, POLICIES)
        _choose("--task", self.tasks, RETRIEVAL_TASKS)
        _choose("--press", self.presses, PRESSES)
        _choose("--policy-press", self.policy_presses or (), self.presses)
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
        _choose("--quant-prefill", (self.quant_prefill,), QUANT_PREFILLS)
        if self.max_delta_loss < 0 or not 0 <= self.max_retrieval_drop <= 1:
            raise InputError("--max-delta-loss must be >= 0 and --max-retrieval-drop in [0, 1]")
        if self.retrieval_length < 0 or self.retrieval_trials < 1:
            raise InputError("retrieval: need --retrieval-length >= 0 (0 = none) and --retrieval-trials >= 1")
        if not self.retrieval_depths:
            raise InputError("give at least one retrieval depth")
        for depth in self.retrieval_depths:
            ruler_tasks.check_depth(depth)

    # -- units ----------------------------------------------------------------------------------------
    def methods(self) -> list[Method]:
        def budgets(policies: Sequence[str]) -> list[tuple[int, str]]:
            return [(k, policy) for k in self.protect for policy in policies if k > 0 or policy == "first"]

        units = [Method("full")]
        units += [Method("quant", k, bits=b, axis=a, policy=policy) for b in self.bits for a in self.axes
                  for k, policy in budgets(self.quant_policies or self.policies)]
        def press_policies(press: str) -> Sequence[str]:
            chosen = self.press_policies or self.policies
            return chosen if self.policy_presses is None or press in self.policy_presses else ("first",)

        units += [Method("press", k, press=p, ratio=r, policy=policy) for p in self.presses for r in self.ratios
                  for k, policy in budgets(press_policies(p))]
        return units

    def prepare(self, loaded: LoadedModel) -> KVContext:
        tokenizer = require_tokenizer(loaded, "kv")
        prefix = prefix_ids(tokenizer, self.bos)
        windows = self.text_windows(loaded, len(prefix))
        head_dim = loaded.info.head_dim
        if self.bits and "token" in self.axes and head_dim % self.group_size:
            raise InputError(f"--group-size {self.group_size} does not divide the head dimension {head_dim}")
        retrievals = self._retrieval_items(loaded, tokenizer) if self.retrieval_length else []
        ctx = KVContext(loaded, self.methods(), windows, prefix, retrievals,
                        KeptSinkMass(QuantisedCache(loaded.model)), LastQueries(SNAPKV_WINDOW))
        for method in ctx.units:  # refuse unsupported models before any work
            self._cache(ctx, method)
        return ctx

    def _retrieval_items(self, loaded: LoadedModel, tokenizer: Any) -> list[RetrievalItem]:
        items = []
        keys = [f"{k}" for k in random.Random(self.seed).sample(range(10_000, 100_000), self.retrieval_trials)]
        for task in self.tasks:
            for trial in range(self.retrieval_trials):
                depth = self.retrieval_depths[trial % len(self.retrieval_depths)]
                item = (self._passkey_item(tokenizer, trial, depth, keys[trial]) if task == "passkey"
                        else self._ruler_item(tokenizer, task, trial, depth))
                check_length(loaded, len(item.context) + len(item.question) + item.max_new_tokens,
                             f"a {task} prompt with its answer")
                items.append(item)
        return items

    def _passkey_item(self, tokenizer: Any, trial: int, depth: float, key: str) -> RetrievalItem:
        prompt = make_passkey_prompt(tokenizer, self.retrieval_length, depth, key=key)
        ids = encode(tokenizer, prompt.text, self.bos, None)
        head = encode(tokenizer, prompt.text[: -len(QUESTION)].rstrip(), self.bos, None)
        shared = next((i for i, (a, b) in enumerate(zip(ids, head, strict=False)) if a != b),
                      min(len(ids), len(head)))
        shared = min(shared, len(ids) - 1)
        answer = self._continuation(tokenizer, prompt.text, ids, f" {prompt.key}")
        return RetrievalItem("passkey", trial, depth, ids[:shared], ids[shared:], answer, (prompt.key,),
                             len(answer) + PASSKEY_SLACK)

    def _ruler_item(self, tokenizer: Any, task: str, trial: int, depth: float) -> RetrievalItem:
        prompt = ruler_tasks.ruler_prompt(tokenizer, task, self.retrieval_length, depth, trial, self.seed)
        ids = encode(tokenizer, prompt.text, self.bos, None)
        split = len(ids) - prompt.n_tokens + prompt.context_tokens[1]  # the haystack's end: the question follows
        answer = self._continuation(tokenizer, prompt.text, ids, prompt.answer)
        return RetrievalItem(task, trial, prompt.depth, ids[:split], ids[split:], answer, prompt.answers,
                             max(prompt.max_new_tokens, len(answer) + 1))

    def _continuation(self, tokenizer: Any, text: str, ids: list[int], answer: str) -> list[int]:
        """The tokens of ``answer`` as they continue the prompt's ``ids`` (its own tokens where the prompt's
        tokens would change at the boundary)."""
        whole = encode(tokenizer, text + answer, self.bos, None)
        if whole[:len(ids)] == ids and len(whole) > len(ids):
            return whole[len(ids):]
        return encode(tokenizer, answer, "strip", None)

    def units_digest(self, ctx: KVContext) -> str:
        # the units, the retrieval prompts, then the windows (as `TextLoss.units_digest` appends them): the same
        # hash as before run state moved to the context, so earlier run directories still resume
        return digest([*ctx.units, {"retrieval": [item.__dict__ for item in ctx.retrievals]}, {"windows": ctx.windows}])

    def describe(self, units: Sequence[Method]) -> str:
        return units[0].label

    # -- caches ---------------------------------------------------------------------------------------
    def _cache(self, ctx: KVContext, method: Method, protect: int | Sequence[int] | None = None) -> QuantisedCache:
        model = ctx.loaded.model
        if method.kind == "quant":
            return QuantisedCache(model, method.bits, str(method.axis), self.group_size,
                                  method.protect if protect is None else protect)
        if method.kind == "press":
            return EvictingCache(model)
        return QuantisedCache(model)

    def open(self, ctx: KVContext) -> CaptureEngine:
        # no probe on every forward: each (`ctx.mass`, `ctx.queries`) is attached only where it is read
        return CaptureEngine(ctx.loaded, [], path=self.path)

    def _protected(self, ctx: KVContext, engine: CaptureEngine, method: Method, key: tuple[str, int], ids: list[int]
                   ) -> list[int]:
        """The positions the method's protect budget keeps in this context: the first k, or the k found by its
        policy in the uncompressed context (`protection_ranking`), ranked once per context and policy."""
        if method.policy == "first" or method.protect == 0:
            return list(range(method.protect))
        ranked = ctx.rankings.get((*key, method.policy))
        if ranked is None:
            ranked = protection_ranking(engine, ids, method.policy)
            ctx.rankings[(*key, method.policy)] = ranked
        return sorted(ranked[:method.protect])

    def _filled(self, ctx: KVContext, engine: CaptureEngine, method: Method, key: tuple[str, int], ids: list[int]
                ) -> QuantisedCache:
        """The method's cache after the prefill of ``ids`` (compressed, for a press). The full cache, every press
        and (with ``quant_prefill`` full) every quantised cache start from one uncompressed prefill per context
        (it is the same forward): a copy of it, or what it holds stored quantised."""
        if method.kind == "quant" and self.quant_prefill == "quantised":
            cache = self._cache(ctx, method, self._protected(ctx, engine, method, key, ids))
            cached_forward(engine, cache, torch.tensor([ids]), range(len(ids)))
            return cache
        prefilled, queries = self._prefilled(ctx, engine, key, ids)
        if method.kind == "quant":
            cache = self._cache(ctx, method, self._protected(ctx, engine, method, key, ids))
            cache.hold_quantised(prefilled)
            return cache
        copied = copy.deepcopy(prefilled)
        if method.kind == "press":
            assert method.press is not None and method.ratio is not None
            copied.compress(make_press(method.press), method.ratio, self._protected(ctx, engine, method, key, ids),
                            queries)
        return copied

    def _prefilled(self, ctx: KVContext, engine: CaptureEngine, key: tuple[str, int], ids: list[int]
                   ) -> tuple[EvictingCache, dict[int, Any]]:
        """The uncompressed cache after one prefill of ``ids``, and the last queries SnapKV scores with (once
        per context)."""
        if key not in ctx.prefills:
            cache = EvictingCache(ctx.loaded.model)
            # the rankings a protect budget will need in this context (the sinks found, the massive tokens) ride
            # on its prefill, the same uncompressed forward, instead of a forward of their own
            ranking = self._ranked_on_prefill(ctx, key)
            found = KeyAttention() if "found" in ranking else None
            with engine.probing([ctx.queries, *([found] if found is not None else [])]):
                output = cached_forward(engine, cache, torch.tensor([ids]), range(len(ids)),
                                        residual="massive" in ranking)
            if found is not None:
                ctx.rankings[(*key, "found")] = found_ranking(found, len(ids))
            if "massive" in ranking:
                ctx.rankings[(*key, "massive")] = massive_ranking(output.residual[:, 0])
            ctx.prefills[key] = (cache, dict(ctx.queries.records))
        return ctx.prefills[key]

    def _ranked_on_prefill(self, ctx: KVContext, key: tuple[str, int]) -> set[str]:
        """The policies a method spends a protect budget on whose ranking of this context is still missing."""
        if max(self.protect, default=0) == 0:
            return set()
        used = {*(self.press_policies or ()), *(self.quant_policies or ())}
        return {policy for policy in ("found", "massive") if policy in used and (*key, policy) not in ctx.rankings}

    # -- measuring ------------------------------------------------------------------------------------
    def _window(self, ctx: KVContext, engine: CaptureEngine, method: Method, index: int, ids: list[int]
                ) -> dict[str, Any]:
        """Loss, sink mass and bytes of one text window through the method's cache."""
        sequence = list(ctx.prefix) + list(ids)
        start = len(ctx.prefix) + self.context  # the first token fed after the prefill
        cache = self._filled(ctx, engine, method, ("window", index), sequence[:start])
        mass_probe = ctx.mass
        mass_probe.cache = cache
        nll, mass = [], []
        for chunk in range(start, len(sequence) - 1, self.step):
            stop = min(chunk + self.step, len(sequence) - 1)
            with engine.probing([mass_probe]):
                hidden = cached_forward(engine, cache, torch.tensor([sequence[chunk:stop]]), range(chunk, stop))
            targets = torch.tensor([sequence[chunk + 1:stop + 1]])
            nll.append(hidden_nll(engine.model, hidden.last_hidden_state, targets, self.chunk)[0])
            mass.append(torch.stack([mass_probe.records[layer] for layer in sorted(mass_probe.records)])[:, 0])
        values = torch.cat(nll).numpy()
        return {"window": index, "loss": mean_loss(values), "n_tokens": int(values.size),
                "sink_mass": float(torch.cat(mass, -1).mean()), "bytes": cache.nbytes(),
                "bytes_full_layers": cache.nbytes(full_attention_only=True)}

    def _retrieve(self, ctx: KVContext, engine: CaptureEngine, method: Method, index: int, item: RetrievalItem
                  ) -> dict[str, Any]:
        """The item's score through the method's cache: the question fed after the compressed context, then
        one teacher-forced forward of the expected answer. Where every greedy token follows the answer and the
        text so far already scores 1, greedy decoding would write the same beginning and can only keep the
        score: that is the result. Otherwise the answer is decoded greedily from the cache as it stood after
        the question (a copy), token by token. No probe is attached: retrieval reads only the model's output."""
        cache = self._filled(ctx, engine, method, ("retrieval", index), item.context)
        start = len(item.context) + len(item.question)
        asked = cached_forward(engine, cache, torch.tensor([item.question]), range(len(item.context), start))
        after_question = copy.deepcopy(cache)
        forced = cached_forward(engine, cache, torch.tensor([item.answer]), range(start, start + len(item.answer)))
        hidden = torch.cat([asked.last_hidden_state[0, -1:], forced.last_hidden_state[0]])
        with torch.inference_mode():
            logits = output_logits(engine.model, hidden).float()
        greedy = logits.argmax(-1).tolist()
        answer_nll = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(item.answer)))
        written = ctx.tokenizer.decode(greedy, skip_special_tokens=True)
        teacher_forced = greedy[:-1] == list(item.answer) and item.score(written) == 1.0
        if not teacher_forced:
            tokens = greedy_through_cache(engine, after_question, greedy[0], start, item.max_new_tokens,
                                          lambda h: output_logits(engine.model, h), self._scored_in_full(ctx, item))
            written = ctx.tokenizer.decode(tokens, skip_special_tokens=True)
        return {"task": item.task, "prompt": index, "trial": item.trial, "depth": item.depth,
                "answer": written, "score": item.score(written), "answer_nll": answer_nll,
                "decoded": "teacher-forced" if teacher_forced else "greedy"}

    def _scored_in_full(self, ctx: KVContext, item: RetrievalItem) -> Callable[[list[int]], bool] | None:
        """Where more text cannot change a score (RULER's string_match_all only finds more of the expected
        strings), decoding may stop once the text so far scores 1; the passkey's first number can still change."""
        if item.task == "passkey":
            return None
        tokenizer = ctx.tokenizer
        return lambda tokens: item.score(tokenizer.decode(tokens, skip_special_tokens=True)) == 1.0

    def measure(self, ctx: KVContext, engine: CaptureEngine, units: Sequence[Method]) -> dict[str, pd.DataFrame]:
        method = units[0]
        columns = {"method": method.label, "kind": method.kind, "family": method.family, "protect": method.protect,
                   "policy": method.policy}
        windows = pd.DataFrame([{**columns, **self._window(ctx, engine, method, i, ids)}
                                for i, (_, ids) in enumerate(ctx.windows)])
        retrieval = pd.DataFrame([{**columns, **self._retrieve(ctx, engine, method, i, item)}
                                  for i, item in enumerate(ctx.retrievals)],
                                 columns=[*columns, *RETRIEVAL_COLUMNS])
        return {"windows": windows, "retrieval": retrieval, "methods": pd.DataFrame([{
            **columns, "bits": method.bits, "axis": method.axis, "press": method.press, "ratio": method.ratio}])}

    # -- gathering ------------------------------------------------------------------------------------
    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        windows, retrieval, methods = tables["windows"], tables["retrieval"], tables["methods"]
        reference = windows[windows["method"] == "full"].sort_values("window")
        answered = retrieval[retrieval["method"] == "full"].sort_values("prompt")
        rows, cells = [], []
        for method in methods.itertuples(index=False):
            own = windows[windows["method"] == method.method].sort_values("window")
            delta, low, high = paired_difference_interval(own["loss"].to_numpy(), reference["loss"].to_numpy(),
                                                          seed=self.seed)
            prompts = retrieval[retrieval["method"] == method.method].sort_values("prompt")
            row = {
                **method._asdict(), "loss": float(own["loss"].mean()), "delta_loss": delta, "delta_low": low,
                "delta_high": high, **self._retrieval_columns(prompts, answered),
                "bytes": float(own["bytes"].mean()),
                "bytes_ratio": float(own["bytes"].mean() / reference["bytes"].mean()),
                # the full-attention layers alone: what eviction compresses (sliding layers are left alone)
                "bytes_full_layers_ratio": float(own["bytes_full_layers"].mean()
                                                 / reference["bytes_full_layers"].mean()),
                "sink_mass": float(own["sink_mass"].mean()),
                "sink_mass_kept": float(own["sink_mass"].mean() / reference["sink_mass"].mean()),
                "n_windows": len(own), "n_tokens": int(own["n_tokens"].sum()),
            }
            rows.append(row)
            for task in dict.fromkeys(prompts["task"]):
                cells.append({"method": method.method, "task": task, **self._retrieval_columns(
                    prompts[prompts["task"] == task], answered[answered["task"] == task])})
        kv = pd.DataFrame(rows).astype({"bits": "Int64"})
        kv["recommended"] = kv["method"] == recommend(kv, self.max_delta_loss, self.max_retrieval_drop)
        by_task = pd.DataFrame(cells, columns=["method", "task", *RETRIEVAL_SUMMARY])
        return {"kv": kv, "windows": windows, "retrieval": retrieval, "retrieval_tasks": by_task}

    def _retrieval_columns(self, prompts: pd.DataFrame, reference: pd.DataFrame) -> dict[str, float]:
        """The mean retrieval score of ``prompts`` with its interval, and its paired difference from the same
        prompts through the full cache (``reference``) with its interval; NaN without prompts."""
        if prompts.empty:
            return dict.fromkeys(RETRIEVAL_SUMMARY, np.nan) | {"n_prompts": 0}
        scores = prompts["score"].to_numpy(dtype=float)
        mean, low, high = bootstrap_interval(scores, seed=self.seed)
        drop = paired_difference_interval(scores, reference["score"].to_numpy(dtype=float), seed=self.seed)
        return {"retrieval": mean, "retrieval_low": low, "retrieval_high": high, "retrieval_delta": drop[0],
                "retrieval_delta_low": drop[1], "retrieval_delta_high": drop[2],
                "answer_nll": float(prompts["answer_nll"].mean()), "n_prompts": len(prompts)}

    def summarise(self, ctx: KVContext, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        kv = tables["kv"]
        full = kv[kv["method"] == "full"].iloc[0]
        chosen = kv[kv["recommended"]]
        recommendation: dict[str, Any] = {
            "max_delta_loss": self.max_delta_loss, "max_retrieval_drop": self.max_retrieval_drop,
            "rule": "the fewest bytes among the caches whose Δloss interval lies below max_delta_loss and whose "
                    "Δretrieval interval (paired, over prompts) lies above −max_retrieval_drop (no retrieval: "
                    "loss alone)",
            "method": None if chosen.empty else str(chosen["method"].iloc[0]),
        }
        if not chosen.empty:
            row = chosen.iloc[0]
            recommendation.update({"bytes_ratio": float(row["bytes_ratio"]), "delta_loss": float(row["delta_loss"]),
                                   "delta_ci": [float(row["delta_low"]), float(row["delta_high"])],
                                   "retrieval": float(row["retrieval"]),
                                   "retrieval_delta_ci": [float(row["retrieval_delta_low"]),
                                                          float(row["retrieval_delta_high"])]})
        return {
            "recommendation": recommendation,
            "model": ctx.loaded.info.name, "text": self.source, "window": self.window, "context": self.context,
            "step": self.step, "n_windows": len(ctx.windows), "scored_per_window": self.window - self.context - 1,
            "group_size": self.group_size, "retrieval_length": self.retrieval_length, "tasks": list(self.tasks),
            "policies": sorted({*(self.press_policies or ()), *(self.quant_policies or ())}),
            "n_retrieval_prompts": len(ctx.retrievals),
            "full": {"loss": float(full["loss"]), "bytes": float(full["bytes"]), "sink_mass": float(full["sink_mass"]),
                     "retrieval": float(full["retrieval"])},
            "methods": {r.method: {"delta_loss": r.delta_loss, "delta_low": r.delta_low, "delta_high": r.delta_high,
                                   "retrieval": r.retrieval, "retrieval_delta": r.retrieval_delta,
                                   "bytes_ratio": r.bytes_ratio, "sink_mass_kept": r.sink_mass_kept}
                        for r in kv.itertuples()},
        }

POLICIES = ("first", "found", "massive")


def _choose(flag: str, given: Sequence[Any], allowed: Sequence[Any] | dict[str, Any]) -> None:
    """Refuse the first value of ``given`` that is not one of ``allowed``, naming its option."""
    bad = [value for value in given if value not in allowed]
    if bad:
        raise InputError(f"{flag} {bad[0]}: choose from {', '.join(map(str, allowed))}")
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
        return found_ranking(probe, len(ids))
    if policy == "massive":
        with engine.probing([]):
            return massive_ranking(engine.forward(tokens, residual=True).residual[:, 0])
    raise InputError(f"unknown protect policy '{policy}' (choose from {', '.join(POLICIES)})")


def massive_ranking(residual: torch.Tensor) -> list[int]:
    """Positions best first by the token's largest activation relative to its depth's median, over the depths
    of one row's residual stream [depths, n, d] (the embeddings left out); ties: earlier first."""
    scores = activation_metrics.token_massive_ratio(residual[1:].float().numpy())
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def found_ranking(probe: KeyAttention, n: int) -> list[int]:
    """Positions best first by the largest mean attention the key receives in any layer and head, from a
    `KeyAttention` probe that saw one uncompressed forward of ``n`` tokens (one row); ties: earlier first."""
    layers = sorted(probe.records)
    received = torch.stack([probe.records[layer]["received"][0] for layer in layers]).numpy()
    seen = torch.stack([probe.records[layer]["queries"][0] for layer in layers]).numpy()
    scores = sink_metrics.key_sink_scores(received, seen, min(FOUND_MIN_QUERIES, max(1, n // 4)))
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def recommend(kv: pd.DataFrame, max_delta_loss: float, max_retrieval_drop: float) -> str | None:
    """The cheapest cache (fewest bytes held) whose quality stays within the tolerances *by its intervals*:
    the upper end of its Δloss interval at most ``max_delta_loss``, and the lower end of its Δretrieval interval
    (paired with the full cache over the same prompts) at least ``-max_retrieval_drop`` (where retrieval was
    run). The full cache itself when nothing cheaper qualifies; None without a full cache."""
    full = kv[kv["method"] == "full"]
    if full.empty:
        return None
    fits = kv["delta_high"] <= max_delta_loss
    if np.isfinite(float(full["retrieval"].iloc[0])):
        fits &= kv["retrieval_delta_low"] >= -max_retrieval_drop
    candidates = kv[fits | (kv["method"] == "full")]
    return str(candidates.sort_values(["bytes_ratio", "delta_loss"]).iloc[0]["method"])


# Grids: settings for `kv` (any given setting overrides its grid's). ``docs`` is what the docs' tables come from
# (a prefill of 2048 text tokens; its time on 2 CPU cores: docs/generated/bench-kv_grid-*.md); ``long`` the
# same at 4096 (Hamlet alone holds 11 windows of it: ``--text shakespeare:hamlet,macbeth`` gives 16); ``quick`` a
# smoke test. The sinks found are set against the first k on the window press (StreamingLLM, where the protected
# tokens are most of what stays beyond the recent window); on knorm and SnapKV the grids keep the first k, within
# the 60-minute budget (`--policy-press window --policy-press knorm --policy-press snapkv` adds them).
_SHARED = {"axes": ("channel",), "bits": (2,), "protect": (0, 4), "presses": DEFAULT_PRESSES,
           "press_policies": ("first", "found"), "quant_policies": ("first", "massive"), "policy_presses": ("window",),
           "tasks": ("niah_single", "niah_multikey"), "retrieval_depths": (0.1, 0.3, 0.5, 0.7, 0.9)}
GRIDS: dict[str, dict[str, Any]] = {
    "quick": {**_SHARED, "window": 288, "context": 256, "max_windows": 4, "step": 32, "ratios": (0.5, 0.9),
              "tasks": ("niah_single",), "retrieval_length": 256, "retrieval_trials": 4},
    "docs": {**_SHARED, "window": 2304, "context": 2048, "max_windows": 16, "step": 64, "ratios": (0.5, 0.75, 0.9),
             "retrieval_length": 2048, "retrieval_trials": 20},
    "long": {**_SHARED, "window": 4352, "context": 4096, "max_windows": 16, "step": 64, "ratios": (0.5, 0.75, 0.9),
             "retrieval_length": 4096, "retrieval_trials": 20},
}


def kv_settings(grid: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """A grid's settings with the ``given`` ones (those not None) on top; refuses an unknown grid or setting."""
    if grid is not None and grid not in GRIDS:
        raise InputError(f"--grid {grid}: choose from {', '.join(GRIDS)}")
    return {**(GRIDS[grid] if grid else {}), **given_settings(KV, given)}


@takes_conditions
def kv(model: LoadedModel | Any, text: str | Path | LongText | None = None, *, grid: str | None = None,
       bos: str = "add", out: str | Path | None = None, resume: bool = False, progress: bool | Any = True,
       command: str | None = None, **settings: Any) -> KVResult:
    """Loss (Δ vs the full cache, with intervals), retrieval through the cache, bytes and sink mass for quantised
    caches (``bits`` x ``axes`` x ``protect``) and eviction presses (``presses`` x ``ratios`` x ``protect``), under
    one condition ``bos`` (`sinkscope.conditions`: what sits at position 0, and any intervention). ``grid``: a
    preset (`GRIDS`: quick | docs | long); ``settings``: any field of `KV` (they override the grid's), e.g.
    ``policies``: which k tokens a protect budget keeps (`POLICIES`: the first k, the sinks found in the context,
    the tokens with massive activations), each compared at the same k, so at the same bytes."""
    experiment = KV(text=text, bos=bos, **kv_settings(grid, settings))
    return run(experiment, model, out=out, resume=resume, progress=progress, command=command)
