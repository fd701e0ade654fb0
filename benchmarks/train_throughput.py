"""Training throughput of the emergence lab (tokens/s), against the plain baseline measured in the same run.

For each context length, times training steps (batch built, forward, backward, AdamW) of the cpu-demo model
with a constant number of tokens per step, and prints tokens/s and the ratio to the baseline: softmax
attention (PyTorch SDPA) with causal packing. The other rows are

- the attention variants: off-by-one and learned sink through the same fused op as softmax (the sink's share
  from the op's log-sum-exp; target >= 0.9x the baseline at context 256), gated attention (SDPA, then the
  gate), and sigmoid and softpick (explicit n x n weights: no fused op computes them),
- intra-document masking (an explicit block-diagonal mask instead of SDPA's causal fast path),
- ``--model`` sizes other than the demo's via ``--hidden``/``--layers``/``--heads``.

Times are the median step over ``--steps`` steps after ``--warmup`` steps, in one process with ``--threads``
torch threads. Run from the repository root::

    .venv/bin/python benchmarks/train_throughput.py
    .venv/bin/python benchmarks/train_throughput.py --contexts 64,512 --tokens-per-step 8192 --hidden 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sinkscope.lab import data
from sinkscope.lab.models import ModelSpec, build_model, count_parameters
from sinkscope.lab.track import token_losses

SETTINGS = [  # (label, attention variant, packing mask)
    ("softmax, causal (baseline)", "softmax", "causal"),
    ("softmax, intra-doc mask", "softmax", "intra_doc"),
    ("off-by-one", "off_by_one", "causal"),
    ("learned sink", "learned_sink", "causal"),
    ("gated, head-wise", "gated_headwise", "causal"),
    ("gated, element-wise", "gated_elementwise", "causal"),
    ("sigmoid", "sigmoid", "causal"),
    ("softpick", "softpick", "causal"),
]


def step_seconds(spec: ModelSpec, source: data.BigramBackcopy, context: int, tokens: int, mask: str,
                 steps: int, warmup: int) -> float:
    model = build_model(spec, source.vocab_size, context, source.bos_id, source.eos_id, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    packing = data.Packing(mask, "fixed")
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        batch = data.make_batch(source, 0, step, range(tokens // context), context, packing)
        loss, count = token_losses(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="64,256", help="comma-separated context lengths")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = data.BigramBackcopy(vocab=64, triggers=8, concentration=0.1)
    spec = ModelSpec(hidden_size=args.hidden, layers=args.layers, heads=args.heads)
    parameters = count_parameters(build_model(spec, source.vocab_size, 64, 0, 1, 0))
    print(f"model: {parameters:,} parameters; {args.tokens_per_step} tokens per step; {args.threads} thread(s)")
    print(f"{'context':>8}  {'setting':<28} {'tokens/s':>10} {'ratio':>7}")
    for context in (int(c) for c in args.contexts.split(",")):
        baseline = None
        for label, variant, mask in SETTINGS:
            variant_spec = ModelSpec(hidden_size=args.hidden, layers=args.layers, heads=args.heads, attention=variant)
            seconds = step_seconds(variant_spec, source, context, args.tokens_per_step, mask, args.steps,
                                   args.warmup)
            throughput = args.tokens_per_step / seconds
            baseline = baseline or throughput
            print(f"{context:>8}  {label:<28} {throughput:>10,.0f} {throughput / baseline:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
