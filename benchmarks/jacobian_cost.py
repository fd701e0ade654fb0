"""Cost of the k-probe Jacobian estimator (`sinkscope oversquash`) against single forward+backward passes.

On one ~64-token text, times

- ``single``: one forward (with autograd, through the capture engine) + one backward pass from the last
  token's final residual to the input of the first layer — the unit of cost;
- ``estimator``: the whole `oversquash` experiment with k probes (one condition, no path-sum bound),

and prints ``ratio = estimator / ((k + 1) x single)``. The estimator does one forward and k backward
passes, so the target is ratio <= 1. It also prints the pass count the experiment records. Times are the
minimum over ``--repeats`` runs, and the single pass is re-timed next to each estimator run so both see
the same machine load (the machine is shared and noisy; the ratio is the point). ``--threads`` defaults
to 1: on a loaded 2-core machine several multi-threaded processes oversubscribe the cores and make
timings erratic.

Run from the repository root::

    .venv/bin/python benchmarks/jacobian_cost.py
    .venv/bin/python benchmarks/jacobian_cost.py --model gemma3-270m --probes 4,16 --repeats 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import sinkscope as ss
from sinkscope.capture import CaptureEngine
from sinkscope.experiments.inputs import encode_one
from sinkscope.experiments.oversquash import oversquash
from sinkscope.experiments.perturb import SHAKESPEARE


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def single_pass(loaded: ss.LoadedModel, ids: list[int]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            inputs = loaded.model.get_input_embeddings()(torch.tensor([ids]))
        inputs.requires_grad_(True)
        with CaptureEngine(loaded) as engine:
            out = engine.forward(inputs_embeds=inputs, grad=True, residual=True)
        output = out.residual[-1, 0, -1]
        torch.autograd.grad(output, out.hidden_states[0], grad_outputs=torch.randn_like(output))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64, help="sequence length, <bos> included")
    parser.add_argument("--probes", default="4,16,32", help="comma-separated k values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = ss.load(args.model)
    ids = encode_one(loaded.tokenizer, SHAKESPEARE, "add", args.tokens).ids
    single_pass(loaded, ids)()  # warm-up
    print(f"{loaded.info.name}: {len(ids)} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'k':>4} {'single s':>9} {'estimator s':>12} {'(k+1) x single s':>17} {'ratio':>7} {'passes f+b':>11}")
    for k in (int(v) for v in args.probes.split(",")):
        results = []

        def estimate(k: int = k, results: list = results) -> None:
            results.append(oversquash(loaded, SHAKESPEARE, probes=k, bos=("add",), path_sum=False,
                                      max_tokens=args.tokens, progress=False))

        single = best_of(args.repeats, single_pass(loaded, ids))
        seconds = best_of(args.repeats, estimate)
        passes = results[-1].summary["passes"]["add"]
        budget = (k + 1) * single
        print(f"{k:>4} {single:>9.3f} {seconds:>12.3f} {budget:>17.3f} {seconds / budget:>7.3f} "
              f"{passes['forward']:>5}+{passes['backward']:<5}")
    print("target: ratio <= 1 (the estimator costs at most k+1 forward+backward passes)")


if __name__ == "__main__":
    main()
