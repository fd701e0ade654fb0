"""Conditions: the one syntax (parse, canonical string, errors) and what each intervention does to attention,
against an independent float64 implementation on the engine's eager weights and against transformers' own
forward (stripping `<bos>`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import invoke, tiny_model, word_tokenizer
from sinkscope.attention.kernels import AttentionInputs, KernelOptions, run_kernel
from sinkscope.attention.variants import VARIANTS
from sinkscope.capture import CaptureEngine, Probe, RandomKeyKnockout
from sinkscope.capture.engine import AttentionCall, BatchInfo
from sinkscope.capture.interventions import Scale
from sinkscope.conditions import Condition, Intervention, Position, parse_condition, parse_conditions
from sinkscope.errors import InputError, TokenizationError
from sinkscope.models.tokens import encode

# families with relative positions (RoPE): hiding key 0 everywhere is stripping it; gpt2's absolute
# positions are the contrast
ROPE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_neox", "phi3", "gpt_oss"]
FAMILIES = ["llama", "mistral", "gemma2", "gemma3_text", "gpt_oss", "gpt2"]


# -- the syntax --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,canonical", [
    ("add", "add"), ("strip", "strip"), ("replace:.", "replace:."), ("given", "given"),
    ("add+scale:0.25", "add+scale:0.25"), ("add+scale:1.0", "add+scale:1"), ("add+scale:0", "add+scale:0"),
    ("add+knockout@3-5", "add+knockout@3-5"), ("add+knockout@5,3,4", "add+knockout@3-5"),
    ("add+knockout@3/0,2", "add+knockout@3/0,2"), ("add+zero-value@0-8", "add+zero-value@0-8"),
    ("add+random-key", "add+random-key"), ("add+random-key:0", "add+random-key"),
    ("add+random-key:7@1", "add+random-key:7@1"), ("strip+knockout@/1", "strip+knockout@/1"),
    ("replace:++knockout", "replace:++knockout"), ("replace:+", "replace:+"),
])
def test_canonical_spelling(text, canonical):
    assert str(parse_condition(text)) == canonical
    assert parse_condition(canonical) == parse_condition(text)


def test_parts():
    condition = parse_condition("replace:\\n+scale:0.5@2-3/1")
    assert condition.position == Position("replace", "\\n") and condition.bos == "replace:\\n"
    assert condition.intervention == Intervention("scale", scale=0.5, layers=(2, 3), heads=(1,))


indices = st.none() | st.lists(st.integers(0, 40), min_size=1, max_size=6, unique=True).map(lambda x: tuple(sorted(x)))
positions = st.sampled_from([Position("auto"), Position("add"), Position("strip"), Position("given"),
                             Position("replace", "."), Position("replace", "eos"), Position("replace", "\\n")])
interventions = st.none() | st.builds(
    lambda kind, dose, seed, layers, heads: Intervention(
        kind, scale=dose if kind == "scale" else None, seed=seed if kind == "random-key" else 0,
        layers=layers, heads=heads),
    st.sampled_from(["knockout", "scale", "zero-value", "random-key"]),
    st.floats(0.0, 1.0, allow_nan=False), st.integers(0, 99), indices, indices)


@given(positions, interventions)
def test_round_trip(position, intervention):
    condition = Condition(position, intervention)
    assert parse_condition(str(condition)) == condition


@pytest.mark.parametrize("text,error,message", [
    ("add+scale:1.5", InputError, "must lie in \\[0, 1\\]"),
    ("add+scale:-0.1", InputError, "must lie in \\[0, 1\\]"),
    ("add+scale", InputError, "needs its dose"),
    ("add+scale:lots", InputError, "cannot read the dose"),
    ("add+dance", InputError, "unknown intervention 'dance'"),
    ("sometimes", TokenizationError, "unknown --bos"),
    ("knockout", TokenizationError, "say what sits at position 0"),
    ("add+knockout@", InputError, "followed by layers"),
    ("add+knockout@x", InputError, "cannot read layers"),
    ("add+knockout@5-3", InputError, "runs backwards"),
    ("add+knockout:2", InputError, "takes no argument"),
    ("add+random-key:x", InputError, "whole number"),
])
def test_malformed_conditions_say_what_is_wrong(text, error, message):
    with pytest.raises(error, match=message):
        parse_condition(text)


def test_each_condition_once_and_checked_against_the_model():
    with pytest.raises(InputError, match="given twice"):
        parse_conditions(["add+knockout@1,2", "add+knockout@2,1"])
    condition = parse_condition("add+knockout@99")
    condition.check(100, 4)
    with pytest.raises(InputError, match="layer 99 out of range"):
        condition.check(30, 4)
    with pytest.raises(InputError, match="head 7 out of range"):
        parse_condition("add+scale:0.5@/7").check(3, 4)


# -- an independent reference: the intervention applied literally to the eager weights, in float64 ---------
class Literal(Probe):
    """The definitions of docs/conditions.md applied to the engine's eager weights in float64 (the literal
    form, exact in float64): p0' = λ p0, p_j' = p_j (1 - λ p0) / (1 - p0); or the first value row zeroed for
    the queries after the first token."""

    def __init__(self, kind: str, dose: float = 0.0, layers: tuple[int, ...] | None = None) -> None:
        self.kind, self.dose, self.layers = kind, dose, layers

    def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
        if self.layers is not None and call.layer not in self.layers:
            return None
        weights = call.weights.double()  # [B, H, T, S]
        values = call.value.double().repeat_interleave(call.n_heads // call.value.shape[1], 1)
        first = call.batch.first_positions
        rows = torch.arange(weights.shape[0])
        later = (call.query_positions[None, :] > first[:, None])[:, None, :, None]  # [B, 1, T, 1]
        if self.kind == "scale":
            p0 = weights[rows, :, :, first][..., None]  # [B, H, T, 1]
            scaled = weights * (1 - self.dose * p0) / (1 - p0)
            scaled[rows, :, :, first] = self.dose * p0[..., 0]
            weights = torch.where(later, scaled, weights)
            return (weights @ values).to(call.output.dtype)
        # zero-value: what every later query reads from the first token is zero; the first token's own is kept
        zeroed = values.clone()
        zeroed[rows, :, first] = 0.0
        return torch.where(later, weights @ zeroed, weights @ values).to(call.output.dtype)


def _ids(rows: int = 2, length: int = 18, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (rows, length), generator=generator)
    ids[:, 0] = 1  # <bos>
    return ids


def _logits(model, ids, condition=None, probes=(), **options) -> torch.Tensor:
    with CaptureEngine(model, list(probes), **options) as engine, engine.intervening(condition):
        return engine.forward(ids, logits=True).logits


# Logits of these models are O(1-10); a float32 forward and a float64 one through 3 layers, the attention
# summed in another order (fused vs eager), agree to ~1e-6 relative: 1e-4 absolute leaves room and still
# fails on any real difference (the interventions move logits by 1-6).
LOGIT_TOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("condition,literal", [
    ("add+scale:0.25", Literal("scale", 0.25)),
    ("add+scale:0.7@1", Literal("scale", 0.7, (1,))),
    ("add+zero-value", Literal("zero-value")),
    ("add+zero-value@0,2", Literal("zero-value", layers=(0, 2))),
])
def test_interventions_match_the_literal_definition(family, condition, literal):
    model = tiny_model(family)
    ids = _ids()
    got = _logits(model, ids, condition)
    want = _logits(model, ids, probes=[literal], path="eager", precision="float64")
    plain = _logits(model, ids)
    assert (got - want).abs().max() < LOGIT_TOL
    assert (got - plain).abs().max() > 100 * LOGIT_TOL  # the intervention did something


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_dose_end_points_and_continuity(family):
    model = tiny_model(family)
    ids = _ids()
    plain, knocked = _logits(model, ids), _logits(model, ids, "add+knockout")
    assert (_logits(model, ids, "add+scale:1") - plain).abs().max() == 0  # λ = 1 is the model, untouched
    assert (_logits(model, ids, "add+scale:0") - knocked).abs().max() < LOGIT_TOL
    # the stable form goes continuously to the knock-out (the literal one would lose rows where p0 -> 1)
    assert (_logits(model, ids, "add+scale:1e-7") - knocked).abs().max() < 1e-3
    assert (_logits(model, ids, "add+scale:0.999999") - plain).abs().max() < 1e-3


def test_scale_is_stable_where_the_first_weight_rounds_to_one():
    """A query whose attention on key 0 is 1 in float32 (logit gap 40): scale:0.5 must give half to key 0 and
    half to the others in their softmax ratios — the literal (1 - λ p0) / (1 - p0) form gives 0/0 there."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 6, 8, generator=generator)
    key = torch.randn(1, 2, 6, 8, generator=generator) * 0.1
    key[:, :, 0] = query[:, :, -1] / query[:, :, -1].norm(dim=-1, keepdim=True) * 40 * 8 ** 0.5 / query[:, :, -1].norm(
        dim=-1, keepdim=True)
    value = torch.randn(1, 2, 6, 8, generator=generator)
    inputs = AttentionInputs(query, key, value, None, True, 8 ** -0.5)
    options = KernelOptions()
    base = run_kernel("fused", inputs, options)
    batch = BatchInfo(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long), torch.zeros(1).long())
    call = AttentionCall(layer=0, layer_type="full_attention", module=None, inputs=inputs, variant=VARIANTS["softmax"],
                         kernel="fused", options=options, batch=batch, output=base.output, lse=base.lse)
    assert float(call.key_attention(torch.zeros(1, dtype=torch.long))[0, 0, -1]) == 1.0  # p0 rounds to 1
    Scale(Intervention("scale", scale=0.5)).apply(call)
    scores = (query.double() @ key.double().transpose(-1, -2)) * 8 ** -0.5  # [1, H, 6, 6]
    rest = torch.softmax(scores[..., -1, 1:], -1)  # the last query's weights on keys 1..5, without key 0
    want = 0.5 * value.double()[:, :, 0] + 0.5 * (rest[..., None] * value.double()[:, :, 1:]).sum(-2)
    # float32 kernel against float64: values O(1), ~1e-6
    assert (call.output[:, :, -1].double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("family", ROPE_FAMILIES + ["gpt2"])
def test_knockout_everywhere_is_stripping_bos_on_rope_models(family):
    """Hiding key 0 from every query in every layer leaves the text tokens what they are without <bos> when
    positions are relative: the same computation, not a second piece of evidence."""
    model = tiny_model(family)
    ids = _ids()
    knocked = _logits(model, ids, "add+knockout")[:, 1:]
    with torch.inference_mode():  # transformers' own forward, no engine, on the text tokens alone
        stripped = model(input_ids=ids[:, 1:]).logits
    gap = (knocked - stripped).abs().max()
    if family == "gpt2":  # absolute positions: every text token moved by one
        assert gap > 100 * LOGIT_TOL
    else:
        assert gap < LOGIT_TOL


def test_head_selection_leaves_other_heads_bit_for_bit():
    model = tiny_model("llama")
    ids = _ids()
    outputs = {}

    class Grab(Probe):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_attention(self, call: AttentionCall) -> None:
            outputs[(self.name, call.layer)] = call.output.clone()

    _logits(model, ids, None, [Grab("plain")])
    _logits(model, ids, "add+scale:0.3@0/1,2", [Grab("scaled")])
    plain, scaled = outputs[("plain", 0)], outputs[("scaled", 0)]
    assert torch.equal(plain[:, [0, 3]], scaled[:, [0, 3]])
    assert not torch.allclose(plain[:, [1, 2]], scaled[:, [1, 2]], atol=1e-3)


def test_random_key_is_reproducible_by_seed_and_batch_independent():
    model = tiny_model("mistral")
    ids = _ids(rows=3)
    once, again = _logits(model, ids, "add+random-key:3"), _logits(model, ids, "add+random-key:3")
    assert torch.equal(once, again)
    assert (once - _logits(model, ids, "add+random-key:4")).abs().max() > 100 * LOGIT_TOL
    alone = _logits(model, ids[1:2], "add+random-key:3")
    assert (alone - once[1:2]).abs().max() < LOGIT_TOL  # a row's draw does not depend on its batch


def test_random_key_probe_removes_one_key_per_later_query():
    model = tiny_model("llama")
    ids = _ids(rows=1)
    control = RandomKeyKnockout({1: None}, seed=5)
    _logits(model, ids, None, [control])
    removed = control.removed[1][0]
    assert int(removed[0]) == -1 and bool((removed[1:] >= 1).all())  # never the first key, query 0 untouched
    assert bool((removed[1:] <= torch.arange(1, ids.shape[1])).all())  # a key the query could see


def test_left_padding_is_computed_as_the_rows_alone():
    model = tiny_model("gemma2")
    ids = _ids(rows=2, length=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[1:2, :8]], 1)
    batch = torch.cat([ids[:1], padded])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with CaptureEngine(model) as engine, engine.intervening("add+scale:0.4"):
        both = engine.forward(batch, mask, logits=True).logits
    alone = _logits(model, ids[1:2, :8], "add+scale:0.4")
    assert (both[1, 4:] - alone[0]).abs().max() < LOGIT_TOL


# -- through experiments and the command line -----------------------------------------------------------
def test_scan_sees_the_intervened_attention_and_records_where_the_sink_went():
    from sinkscope import load
    from sinkscope.experiments.scan import scan

    loaded = load(tiny_model("llama"), tokenizer=word_tokenizer())
    texts = ["the cat sat on the mat .", "the dog ran far away and it was very quiet ."] * 2
    plain = scan(loaded, texts, bos="add", progress=False)
    half = scan(loaded, texts, bos="add+scale:0.5@0", progress=False)
    frame, frame_half = plain.frame, half.frame
    for row, row_half in zip(frame[frame.layer == 0].itertuples(), frame_half[frame_half.layer == 0].itertuples(),
                             strict=True):
        # alpha over n queries: query 0 gives 1, every later query its p0, which the dose halves
        n = row.n_visible
        assert row_half.alpha == pytest.approx((1 + 0.5 * (row.alpha * n - 1)) / n, abs=1e-6)  # float32 sums
    assert set(half.tables["alpha"]["condition"]) == {"add+scale:0.5@0"}
    where = plain.tables["whereabouts"]
    assert set(where["condition"]) == {"add"} and (where["text_start"] == 1).all()
    assert where["alpha_first"].to_numpy() == pytest.approx(plain.frame["alpha"].to_numpy(), abs=1e-6)
    summary = plain.summary["whereabouts"]["add"]
    assert set(summary) >= {"alpha_first", "alpha_first_text", "sink_rate_first", "sink_rate_first_text"}
    stripped = scan(loaded, texts, bos="strip", progress=False).tables["whereabouts"]
    assert (stripped["alpha_first"] == stripped["alpha_first_text"]).all()  # nothing precedes the text


def test_cli_condition_option_and_errors(model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("scan", "--model", str(model_dir), "--prompts", str(prompt_file), "--condition", "add",
                    "--condition", "add+knockout@1", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    directories = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(directories) == 2 and all(name.startswith("bos-") for name in directories)
    summaries = [json.loads((out / d / "summary.json").read_text()) for d in directories]
    assert {s["bos"] for s in summaries} == {"add", "add+knockout@1"}
    for args, message in ((["--condition", "add+scale:1.5"], "must lie in [0, 1]"),
                          (["--condition", "add+knockout@99"], "layer 99 out of range"),
                          (["--condition", "add+scale:-0.1"], "must lie in [0, 1]"),
                          (["--condition", "add+teleport"], "unknown intervention")):
        bad = invoke("scan", "--model", str(model_dir), "--prompts", str(prompt_file), "--quiet", *args)
        assert bad.exit_code == 2, bad.output
        assert message in bad.output and "Traceback" not in bad.output


TEXT = " ".join(["the cat sat on the mat .", "the dog ran far away and it was very quiet .",
                 "then the sun rose over the hills and the house was light ."] * 12)
SHORT = ["the cat sat on the mat .", "the dog ran far away and it was very quiet .",
         "then the sun rose over the hills .", "it was very quiet in the house ."]

EXPERIMENTS = {
    "ablate": lambda ss, lm, c: ss.ablate(lm, TEXT, conditions=c, window=16, max_windows=2, progress=False),
    "perturb": lambda ss, lm, c: ss.perturb(lm, SHORT[0], swap=("cat", "dog"), conditions=c, progress=False),
    "oversquash": lambda ss, lm, c: ss.oversquash(lm, SHORT[1], conditions=c, progress=False),
    "passkey": lambda ss, lm, c: ss.passkey(lm, lengths=[120], depths=[0.5], trials=1, conditions=c,
                                            max_new_tokens=3, progress=False),
    "smoothing": lambda ss, lm, c: ss.attention_smoothing(lm, SHORT, conditions=c, progress=False),
    "noop": lambda ss, lm, c: ss.noop(lm, SHORT, conditions=c, progress=False),
    "massive": lambda ss, lm, c: ss.massive_activations(lm, SHORT, conditions=c, progress=False),
    "rank": lambda ss, lm, c: ss.rank_collapse(lm, SHORT, conditions=c, progress=False),
    "matrix": lambda ss, lm, c: ss.matrix_entropy_by_depth(lm, SHORT, conditions=c, progress=False),
    "generate": lambda ss, lm, c: ss.generate_side_by_side(lm, SHORT[:1], conditions=c, max_new_tokens=3,
                                                           progress=False),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_runs_under_an_intervention(name):
    """Each experiment measures the intervened model (its numbers move) and labels rows with the condition."""
    import sinkscope as ss

    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    result = EXPERIMENTS[name](ss, lm, ["add", "add+scale:0.2"])
    frame = result.to_frame()
    assert set(frame["condition"]) == {"add", "add+scale:0.2"}
    text = next((c for c in ("answer", "continuation") if c in frame), None)
    if text is not None:  # decoding: the dose changes what greedy decoding writes
        written = frame.groupby("condition")[text].apply(tuple)
        assert written["add"] != written["add+scale:0.2"]
        return
    numeric = frame.select_dtypes("number").columns.difference(["prompt", "layer", "head", "depth", "position",
                                                                 "window", "trial", "length", "n_tokens", "seconds"])
    by = frame.groupby("condition", sort=True)[list(numeric)].mean(numeric_only=True)
    assert not np.allclose(by.loc["add"].to_numpy(dtype=float), by.loc["add+scale:0.2"].to_numpy(dtype=float),
                           rtol=1e-6, atol=1e-9, equal_nan=True)  # the dose changed what was measured
    if "whereabouts" in result.tables:
        where = result.summary["whereabouts"]
        assert where["add+scale:0.2"]["alpha_first"] < where["add"]["alpha_first"]


def test_lab_tracks_conditions_with_an_intervention(tmp_path):
    """The lab's tracking takes conditions: bos+text / text are add / strip, and an intervention is applied
    to the probe documents (its sink rate and probe loss differ from the plain condition's)."""
    from sinkscope.lab import train
    from sinkscope.lab.config import LabConfigError

    config = {
        "name": "tracked", "seed": 3, "context_length": 32, "tokens_per_step": 256, "steps": 8,
        "data": {"vocab": 16, "triggers": 2, "doc_min": 8, "doc_max": 40},
        "model": {"hidden_size": 16, "layers": 2, "heads": 2},
        "packing": {"mask": "intra_doc", "bos": "fixed"}, "optimizer": {"lr": 1e-2, "warmup_steps": 3},
        "tracking": {"every": 4, "probe_count": 4, "probe_length": 16, "checkpoint_every": 4,
                     "validation_windows": 4, "inference": ["bos+text", "add+scale:0", "strip"]},
    }
    result = train(config, tmp_path / "run", progress=False)
    sinks = result.sinks[result.sinks.eps == 0.3]
    last = sinks[sinks.step == sinks.step.max()].groupby("inference")["mean_alpha"].mean()
    assert set(last.index) == {"bos+text", "add+scale:0", "strip"}
    assert last["add+scale:0"] < last["bos+text"]  # the knocked-out sink receives only its own query's weight
    evals = result.evals.iloc[-1]
    assert evals["probe[add+scale:0]"] != pytest.approx(evals["probe[bos+text]"], abs=1e-6)
    with pytest.raises(LabConfigError, match="add or strip"):
        train({**config, "tracking": {**config["tracking"], "inference": ["replace:."]}}, tmp_path / "bad",
              progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_oss"])
def test_smoothing_reports_key_count_free_entropies(family):
    """entropy_norm = H / log(keys seen) and entropy_text = the entropy over the text keys alone, renormalised,
    against the eager weights in float64 (gpt-oss: its learned sink's share left out as well)."""
    import sinkscope as ss

    lm = ss.load(tiny_model(family), tokenizer=word_tokenizer())
    texts = ["the cat sat on the mat .", "the dog ran far away and it was very quiet ."]
    frame = ss.attention_smoothing(lm, texts, conditions=["add", "strip"], progress=False).to_frame()
    weights: dict[int, torch.Tensor] = {}

    class Grab(Probe):
        def on_attention(self, call: AttentionCall) -> None:
            weights[call.layer] = call.weights.double()[0]  # [H, T, S], the sink's share excluded

    for condition, start in (("add", 1), ("strip", 0)):
        for prompt, text in enumerate(texts):
            ids = torch.tensor([encode(word_tokenizer(), text, condition)])
            _logits(lm.model, ids, None, [Grab()], path="eager", precision="float64")
            for layer, w in weights.items():
                text_w = w[:, start:, start:]  # text queries, text keys
                mass = text_w.sum(-1, keepdim=True)
                q = text_w / mass
                per_query = -(q * q.clamp_min(1e-300).log()).sum(-1)
                # defined wherever a text key is visible, however small its share (float64 weights keep it)
                want_text = torch.where(mass[..., 0] > 0, per_query, torch.nan).nanmean(-1)  # [H]
                full = w[:, start:]
                p = torch.cat([full, (1 - full.sum(-1, keepdim=True)).clamp_min(0)], -1)  # the sink as one more cell
                entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
                keys = (full > 0).sum(-1).double() if family != "gemma3_text" else None
                rows = frame[(frame.bos == condition) & (frame.prompt == prompt) & (frame.layer == layer)]
                rows = rows.sort_values("head")
                # float32 engine against float64 weights: entropies of O(1) agree to ~1e-6
                assert rows["entropy_text"].to_numpy() == pytest.approx(want_text.numpy(), abs=1e-4)
                if keys is not None:  # (sliding windows: zero weight is not the only way to miss a key)
                    want_norm = torch.where(keys > 1, entropy / keys.clamp_min(2).log(), torch.nan)
                    assert rows["entropy_norm"].to_numpy() == pytest.approx(want_norm.nanmean(-1).numpy(),
                                                                            abs=1e-4)


def test_residual_measures_use_the_same_text_rows_in_every_condition():
    """Matrix entropy and rank collapse on the text rows: at depth 0 (the embeddings of the same text tokens)
    they agree between add and strip exactly as computed from those rows, while the all-rows measures differ."""
    import sinkscope as ss

    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    texts = ["the cat sat on the mat .", "the dog ran far away and it was very quiet ."]
    entropy = ss.matrix_entropy_by_depth(lm, texts, conditions=["add", "strip"], progress=False).to_frame()
    first = entropy[entropy.depth == 0].set_index(["prompt", "bos"])
    for prompt in range(len(texts)):
        # float64 on the same embedding rows: equal to rounding
        assert first.loc[(prompt, "add"), "entropy_text"] == pytest.approx(first.loc[(prompt, "strip"),
                                                                                      "entropy_text"], abs=1e-9)
        assert first.loc[(prompt, "add"), "entropy"] != pytest.approx(first.loc[(prompt, "strip"), "entropy"],
                                                                      abs=1e-6)
    rank = ss.rank_collapse(lm, texts, conditions=["add", "strip"], progress=False).tables["text_rows"]
    at_zero = rank[(rank.depth == 0) & (rank.measure == "frobenius_residual")].pivot(
        index="prompt", columns="bos", values="value")
    assert at_zero["add"].to_numpy() == pytest.approx(at_zero["strip"].to_numpy(), abs=1e-9)
    assert set(rank["n_rows"]) == {len(t.split()) for t in texts}


def test_spread_over_prompts_matches_transformers_hidden_states():
    """Fig. 2 with prompts as units: S per depth against transformers' own hidden states of both sequences,
    nothing moves before the swap, and the condition's intervention applies."""
    import sinkscope as ss
    from sinkscope.experiments.inputs import encode_one
    from sinkscope.experiments.spread import swap_index

    model = tiny_model("llama")
    lm = ss.load(model, tokenizer=word_tokenizer())
    texts = ["the cat sat on the mat and the dog ran far away .", "then the sun rose over the hills ."]
    result = ss.spread(lm, texts, conditions=["add", "strip", "add+scale:0.3"], progress=False)
    frame = result.to_frame()
    assert result.summary["max_delta_before_swap"] == 0.0 and set(frame["condition"]) == {
        "add", "strip", "add+scale:0.3"}
    tokenizer = word_tokenizer()
    for prompt, text in enumerate(texts):
        ids = encode(tokenizer, text, "add")
        unit = encode_one(tokenizer, text, "add", 64, prompt)
        j = swap_index(unit, 0.25)
        swapped = list(ids)
        swapped[j] = next(t for t in ids[1:] if t != ids[j])
        with torch.inference_mode():
            a = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            b = model(torch.tensor([swapped]), output_hidden_states=True).hidden_states
        # transformers' last hidden state is after the final norm; depths 0..L-1 are the raw stream
        want = [float((x[0, j + 1:] - y[0, j + 1:]).double().norm(dim=-1).sum()) for x, y in zip(a[:-1], b[:-1],
                                                                                                 strict=True)]
        got = frame[(frame.prompt == prompt) & (frame.bos == "add")].sort_values("depth")["S"].to_numpy()[:-1]
        assert got == pytest.approx(want, rel=1e-4)  # float32 forwards in another order: ~1e-6 relative
    by = frame.groupby("bos")["S"].sum()
    assert by["add+scale:0.3"] != pytest.approx(by["add"], rel=1e-3)


def test_stream_applies_an_intervention_step_by_step():
    """Through the full cache, token by token, add+knockout predicts the text tokens exactly as strip does
    (RoPE: the same computation), and the streaming caches run under it."""
    import sinkscope as ss

    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    text = " ".join(["the cat sat on the mat .", "the dog ran far away and it was very quiet ."] * 4)
    knocked = ss.stream(lm, text, window=8, sinks=(1,), length=40, conditions="add+knockout", progress=False)
    stripped = ss.stream(lm, text, window=8, sinks=(1,), length=40, conditions="strip", progress=False)
    plain = ss.stream(lm, text, window=8, sinks=(1,), length=40, conditions="add", progress=False)

    def full(result):
        frame = result.to_frame()
        return frame[frame["cache"] == "full"].sort_values("position")["nll"].to_numpy()

    # position p + 1 with <bos> predicts the same text token as position p without it
    with_bos, without = full(knocked), full(stripped)
    n = min(len(with_bos) - 1, len(without))
    assert n >= 30
    assert with_bos[1:1 + n] == pytest.approx(without[:n], abs=1e-4)  # float32, another op order
    assert np.abs(full(plain)[1:1 + n] - without[:n]).max() > 0.01
    assert set(knocked.to_frame()["condition"]) == {"add+knockout"}


def test_ablate_records_where_the_sink_is_under_each_condition():
    import sinkscope as ss

    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())
    result = ss.ablate(lm, TEXT, conditions=["add", "strip", "add+scale:0.3@0"], window=24, max_windows=3,
                       progress=False)
    where = result.tables["whereabouts"]
    assert set(where["condition"]) == {"add", "strip", "add+scale:0.3@0"} and where["unit"].nunique() == 3
    summary = result.summary["whereabouts"]
    assert summary["add+scale:0.3@0"]["alpha_first"] < summary["add"]["alpha_first"]
    layer0 = where[where["layer"] == 0].groupby("condition")["alpha_first"].mean()
    assert layer0["add+scale:0.3@0"] < layer0["add"]  # the dose acts where it is applied


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_following_engine_intervenes_on_calls_a_harness_makes(family):
    """lm-eval calls the model itself: under a following engine those calls are captured and intervened on,
    equal to the engine's own forward (padding included); without follow they are refused."""
    model = tiny_model(family)
    ids = _ids(rows=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as a harness batches generation prompts
    with CaptureEngine(model) as engine, engine.intervening("add+scale:0.3"):
        want = engine.forward(ids, mask, logits=True).logits
    with CaptureEngine(model, follow=True) as engine, engine.intervening("add+scale:0.3"), torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < LOGIT_TOL
    with CaptureEngine(model) as engine, pytest.raises(RuntimeError, match="engine.forward"), torch.inference_mode():
        model(input_ids=ids)


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_zero_value_in_one_head_of_a_kv_group(family):
    """One query head of a GQA group: its keys and values are expanded for the recomputation; the other head of
    the group still reads the first token's value."""

    class OneHead(Literal):
        def on_attention(self, call: AttentionCall) -> torch.Tensor | None:
            zeroed = super().on_attention(call)
            values = call.value.double().repeat_interleave(call.n_heads // call.value.shape[1], 1)
            plain = (call.weights.double() @ values).to(zeroed.dtype)
            head = torch.zeros(call.n_heads, dtype=torch.bool)
            head[1] = True
            return torch.where(head[None, :, None, None], zeroed, plain)

    model = tiny_model(family)
    ids = _ids()
    got = _logits(model, ids, "add+zero-value@/1")
    want = _logits(model, ids, probes=[OneHead("zero-value")], path="eager", precision="float64")
    assert (got - want).abs().max() < LOGIT_TOL
    assert (got - _logits(model, ids)).abs().max() > 100 * LOGIT_TOL
