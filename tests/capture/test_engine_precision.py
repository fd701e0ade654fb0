"""Low-precision models: with a bf16 or fp16 model and the engine's default ``precision="float32"``, every
statistic a probe reports is computed in float32 from the model's own (bf16/fp16) q, k and v.

Oracle: the same q, k, v (recorded from the call), upcast to float64, through an explicit softmax written
here (scale, soft-cap, window, learned sink column). Whatever the model's dtype, the only error left is
float32 arithmetic, so alpha, entropy, max weight and value shares must agree to ~1e-5. The layer's output
is returned in the model's dtype (the model continues with it), so its norm is checked to that dtype's
rounding.
"""

from __future__ import annotations

import pytest
import torch

from helpers import WINDOW, tiny_model
from sinkscope.capture import AttentionEntropy, FirstTokenAttention, Probe, ValueNorms, capture

LENGTH = 3 * WINDOW + 2
# |got - fp64 reference| allowed for what is computed in float32 from the recorded q/k/v (observed: <= 1.1e-6
# for weights and shares, <= 7e-6 for entropy, whose linear-memory formula subtracts two O(log n) terms)...
FLOAT32_TOLERANCE = {"attention": 5e-6, "first_k": 5e-6, "sink_logit": 5e-6, "max_weight": 5e-6,
                     "first_share": 5e-6, "value_norm": 5e-6, "entropy": 5e-5}
# ...and, relative, for the layer output, which is rounded to the model's dtype (unit roundoff 2^-8, 2^-11).
OUTPUT_RTOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


class Inputs(Probe):
    """Records each call's q, k, v and logit settings: the oracle's inputs."""

    def __init__(self) -> None:
        self.calls: dict[int, dict] = {}

    def on_attention(self, call) -> None:
        self.calls[call.layer] = dict(query=call.query.clone(), key=call.key.clone(), value=call.value.clone(),
                                      scaling=call.scaling, softcap=call.softcap, layer_type=call.layer_type,
                                      sinks=None if call.sinks is None else call.sinks.detach().clone())


def reference(inputs: dict) -> dict[str, torch.Tensor]:
    """The probes' quantities in float64 from one call's inputs (queries at positions 0..T-1, no padding)."""
    q, k, v = (inputs[name].double() for name in ("query", "key", "value"))
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = q @ k.transpose(-1, -2) * inputs["scaling"]
    if inputs["softcap"] is not None:
        scores = torch.tanh(scores / inputs["softcap"]) * inputs["softcap"]
    t = q.shape[2]
    query, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = key <= query
    if inputs["layer_type"] == "sliding_attention":
        allowed &= query - key < WINDOW
    scores = scores.masked_fill(~allowed, float("-inf"))
    sinks = inputs["sinks"]
    column = (torch.full((*scores.shape[:3], 1), float("-inf"), dtype=torch.float64) if sinks is None
              else sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1))
    full = torch.softmax(torch.cat([scores, column], -1), -1)
    p, sink = full[..., :-1], full[..., -1]
    entropy = -(full * full.log()).nan_to_num(0.0).sum(-1)
    norms = v.norm(dim=-1)  # [B, H, S]
    out = {"attention": p[..., 0], "first_k": p[..., :3].sum(-1), "entropy": entropy, "max_weight": p.amax(-1),
           "value_norm": norms, "first_share": p[..., 0] * norms[..., :1] / (p @ norms[..., None])[..., 0],
           "output_norm": (p @ v).norm(dim=-1)}
    if sinks is not None:
        out["sink_logit"] = sink
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_oss", "gemma2"])
def test_low_precision_model_statistics_are_float32_accurate(family, dtype):
    model = tiny_model(family).to(dtype)
    ids = torch.randint(3, 90, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    for path in ("fused", "chunked", "eager", "flex"):
        for with_max in (False, True):
            recorder, first, entropy, values = Inputs(), FirstTokenAttention(first_k=3), \
                AttentionEntropy(with_max=with_max), ValueNorms()
            with capture(model, [recorder, first, entropy, values], path=path, chunk_size=5) as engine:
                engine.forward(ids)
            for layer, inputs in recorder.calls.items():
                expected = reference(inputs)
                got = {**first.records[layer], **entropy.records[layer], **values.records[layer]}
                for name, tolerance in FLOAT32_TOLERANCE.items():
                    if name in expected and name in got:
                        error = (got[name].double() - expected[name]).abs().max().item()
                        assert error <= tolerance, f"{family} {path} layer {layer} {name}: {error:.2e}"
                assert (got["entropy"] >= -1e-6).all()
                torch.testing.assert_close(got["output_norm"].double(), expected["output_norm"],
                                           rtol=OUTPUT_RTOL[dtype], atol=1e-6)
                assert ("max_weight" in got) == with_max
                assert ("sink_logit" in got) == (family == "gpt_oss")
