"""Sink-aware protect policies for KV caches: the k tokens a protect budget keeps are the first k, the sinks
found in the context (the keys drawing the most attention), or the tokens with massive activations. Each
score against an independent reference (transformers' eager weights; the hidden states themselves), eviction
of given positions against masking, and the experiment at one budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers
from helpers import TEXT, eager_twin, lm, tiny_model
from sinkscope.capture import CaptureEngine
from sinkscope.capture.kvcache import EvictingCache, WindowPress, cached_forward
from sinkscope.errors import InputError
from sinkscope.experiments.kv import KV, kv, protection_ranking
from sinkscope.metrics.activations import token_massive_ratio
from sinkscope.metrics.sink import key_sink_scores

SMALL = dict(window=24, context=14, max_windows=3, step=4, group_size=4, retrieval_length=0)


def ss_load(family: str):
    from helpers import word_tokenizer
    from sinkscope import load

    return load(tiny_model(family), tokenizer=word_tokenizer())


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, helpers.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_key_sink_scores_by_hand():
    received = np.array([[[4.0, 1.0, 0.5]], [[2.0, 3.0, 0.9]]])  # [L=2, H=1, n=3]
    queries = np.array([[[4.0, 3.0, 1.0]]])  # key 2 is seen by one query only
    np.testing.assert_allclose(key_sink_scores(received, queries), [1.0, 1.0, 0.9], rtol=1e-12)  # float64, 1 division
    np.testing.assert_allclose(key_sink_scores(received, queries, min_queries=2), [1.0, 1.0, 0.0], rtol=1e-12)


def test_token_massive_ratio_by_hand():
    h = np.ones((2, 3, 4))
    h[0, 1, 2] = -50.0  # token 1, depth 0: 50x the depth's median |h| (= 1)
    h[1, 2, 0] = 7.0
    np.testing.assert_allclose(token_massive_ratio(h), [1.0, 50.0, 7.0], rtol=1e-12)  # exact in float64


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_found_sinks_rank_keys_as_eager_attention_does(family):
    model = tiny_model(family)
    ids = tokens(40)
    with CaptureEngine(model) as engine:
        ranked = protection_ranking(engine, ids[0].tolist(), "found")
    twin = eager_twin(model)
    with torch.no_grad():
        weights = torch.stack(twin(input_ids=ids, output_attentions=True).attentions)[:, 0].double()  # [L, H, T, T]
    # the queries that may see each key, per layer (a sliding layer's window included): those with a weight on it
    seen = (weights > 0).sum(-2).double()
    alpha = torch.where(seen >= 10, weights.sum(-2) / seen.clamp(min=1), torch.zeros_like(seen))  # min(16, 40 // 4)
    reference = alpha.amax(dim=(0, 1)).numpy()
    top = ranked[:5]
    np.testing.assert_allclose(np.sort(reference[top])[::-1], np.sort(reference)[::-1][:5], rtol=1e-5)


def test_massive_tokens_rank_as_their_hidden_states_say():
    model = tiny_model("llama")
    ids = tokens(20)
    with CaptureEngine(model) as engine:
        ranked = protection_ranking(engine, ids[0].tolist(), "massive")
    twin = eager_twin(model)
    captured = []
    hook = twin.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        states = twin(input_ids=ids, output_hidden_states=True).hidden_states
    hook.remove()
    depths = torch.stack([*states[1:-1], captured[-1]])[:, 0].numpy()  # after each layer, the last before the norm
    assert ranked[0] == int(np.argmax(token_massive_ratio(depths)))
    with CaptureEngine(model) as engine, pytest.raises(InputError, match="unknown protect policy"):
        protection_ranking(engine, ids[0].tolist(), "middle")


def test_eviction_keeps_the_positions_given():
    model = tiny_model("llama")
    ids = tokens(16)
    context = 10
    cache = EvictingCache(model)
    with CaptureEngine(model, []) as engine:
        cached_forward(engine, cache, ids[:, :context])
        cache.compress(WindowPress(), 0.5, protect=[3, 5])  # the window keeps 7, 8, 9; 3 and 5 protected
        hidden = cached_forward(engine, cache, ids[:, context:], positions=range(context, 16)).last_hidden_state
    kept = [3, 5, 7, 8, 9]
    assert cache.layers[0].positions[0, 0].tolist() == kept + list(range(context, 16))
    allowed = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    allowed[context:, :context] = False
    allowed[context:, kept] = True
    with torch.inference_mode():
        additive = torch.where(allowed, 0.0, float("-inf"))[None, None]
        reference = eager_twin(model).model(input_ids=ids, attention_mask=additive).last_hidden_state
    torch.testing.assert_close(hidden, reference[:, context:], atol=1e-5, rtol=1e-5)


def test_policies_compare_at_the_same_budget():
    result = kv(lm(), TEXT, bits=(2,), axes=("token",), protect=(0, 2), presses=("window",), ratios=(0.5,),
                policies=("first", "found", "massive"), progress=False, **SMALL)
    table = result.tables["kv"].set_index("method")
    # k = 0 keeps nothing whatever the policy: one cache; k = 2 under each policy
    assert sorted(table.index) == sorted(["full", "int2-token k=0", "int2-token k=2", "int2-token k=2 found",
                                          "int2-token k=2 massive", "window@0.5 k=0", "window@0.5 k=2",
                                          "window@0.5 k=2 found", "window@0.5 k=2 massive"])
    for family in ("int2-token k=2", "window@0.5 k=2"):  # the same bytes: the same number of tokens kept whole
        for policy in ("found", "massive"):
            assert table.loc[f"{family} {policy}", "bytes"] == table.loc[family, "bytes"]
    assert set(table["policy"]) == {"first", "found", "massive"}
    assert result.summary["policies"] == ["first", "found", "massive"]
    with pytest.raises(InputError, match="--policy"):
        KV(policies=("last",))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_rankings_on_the_shared_prefill_are_those_of_a_forward_of_their_own(family, monkeypatch):
    """The `found` and `massive` rankings ride on the uncompressed prefill every press copies (no forward of
    their own): they must rank as `protection_ranking`'s own forward does (the same context, the same attention,
    the same residual stream)."""
    from sinkscope.experiments import kv as kv_module
    from sinkscope.experiments.kv import Method

    own_forwards = []
    monkeypatch.setattr(kv_module, "protection_ranking", lambda *args: own_forwards.append(args) or [])
    model = ss_load(family)
    experiment = KV(text=TEXT, bits=(2,), axes=("token",), presses=("window",), ratios=(0.5,), protect=(0, 2),
                    press_policies=("first", "found"), quant_policies=("first", "massive"), **SMALL)
    ctx = experiment.prepare(model)
    ids = tokens(14)[0].tolist()
    with experiment.open(ctx) as engine:
        experiment._filled(ctx, engine, Method("press", 2, press="window", ratio=0.5, policy="found"), ("window", 0),
                           ids)
        found, massive = (ctx.rankings[("window", 0, policy)] for policy in ("found", "massive"))
        assert not own_forwards and sorted(found) == sorted(massive) == list(range(14))
        assert found == protection_ranking(engine, ids, "found")
        # the massive ranking orders the tokens as the scores of a forward of its own do: float32 residuals
        # through another code path (a cache) agree to ~1e-6 relative, well inside 1e-5
        with engine.probing([]):
            residual = engine.forward(torch.tensor([ids]), residual=True).residual[:, 0]
        scores = token_massive_ratio(residual[1:].float().numpy())
        np.testing.assert_allclose(scores[massive], np.sort(scores)[::-1], rtol=1e-5)
        # a quantised cache spends its budget on that ranking, without a forward of its own
        quant = Method("quant", 2, bits=2, axis="token", policy="massive")
        assert experiment._protected(ctx, engine, quant, ("window", 0), ids) == sorted(massive[:2])
        assert not own_forwards
