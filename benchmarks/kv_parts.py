"""Two parts of a `sinkscope kv` grid, each against its earlier way measured in the same run, on the docs
grid's inputs (a 2048-token prefill):

- scoring one text window through the full cache with only the sink-mass probe attached (what `kv` does)
  against the earlier way, with SnapKV's query probe attached too (probes only read: the loss must be equal);
- one RULER retrieval prompt decoded through the full cache until the answer scores 1 (what `kv` does)
  against decoding to the token budget (the score must be equal).

    python benchmarks/kv_parts.py --model gemma3-270m
    python benchmarks/record.py --as kv_parts-gemma3-270m kv_parts --model gemma3-270m
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import sinkscope as ss
from sinkscope.capture.kvcache import cached_forward
from sinkscope.experiments.decoding import greedy_through_cache
from sinkscope.experiments.kv import KV, kv_settings
from sinkscope.experiments.loss import output_logits


def best_of(repeats: int, work: Callable[[], Any]) -> tuple[float, Any]:
    """The median seconds of ``repeats`` calls, and the last call's value."""
    seconds, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = work()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="retrieval prompts timed (the first of each task)")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = ss.load(args.model)
    experiment = KV(**kv_settings("docs", {}))
    ctx = experiment.prepare(loaded)
    full = ctx.units[0]
    print(f"kv parts on {args.model}: docs grid inputs, {args.repeats} repeats each (median seconds)")
    with experiment.open(ctx) as engine:
        _, ids = ctx.windows[0]
        experiment._window(ctx, engine, full, 0, ids)  # the prefill (shared by every cache), not timed
        only_mass = best_of(args.repeats, lambda: experiment._window(ctx, engine, full, 0, ids))
        with engine.probing([ctx.queries]):  # the earlier way: every probe on every forward
            both = best_of(args.repeats, lambda: experiment._window(ctx, engine, full, 0, ids))
        assert only_mass[1]["loss"] == both[1]["loss"], "a probe changed the loss"
        print(f"window of {only_mass[1]['n_tokens']} tokens   all probes {both[0]:7.2f} s   "
              f"the sink mass only {only_mass[0]:7.2f} s   ratio {both[0] / only_mass[0]:.2f}x")

        tasks = sorted({item.task for item in ctx.retrievals} - {"passkey"})
        per_task = max(1, args.prompts // len(tasks))
        items = [item for task in tasks for item in [i for i in ctx.retrievals if i.task == task][:per_task]]
        until, to_budget = [], []
        for item in items:
            key = ("retrieval", ctx.retrievals.index(item))
            experiment._filled(ctx, engine, full, key, item.context)  # the prefill, not timed
            prefilled = ctx.prefills[key][0]
            start = len(item.context) + len(item.question)

            def decode(stop: Any, item: Any = item, prefilled: Any = prefilled, start: int = start) -> str:
                cache = copy.deepcopy(prefilled)
                asked = cached_forward(engine, cache, torch.tensor([item.question]), range(len(item.context), start))
                with torch.inference_mode():
                    first = int(output_logits(engine.model, asked.last_hidden_state[0, -1:]).argmax(-1)[0])
                tokens = greedy_through_cache(engine, cache, first, start, item.max_new_tokens,
                                              lambda h: output_logits(engine.model, h), stop)
                return str(ctx.tokenizer.decode(tokens, skip_special_tokens=True))

            early = best_of(args.repeats,
                            lambda decode=decode, item=item: decode(experiment._scored_in_full(ctx, item)))
            whole = best_of(args.repeats, lambda decode=decode: decode(None))
            assert item.score(early[1]) == item.score(whole[1]), "stopping early changed a score"
            until.append(early[0])
            to_budget.append(whole[0])
            print(f"retrieval {item.task} prompt {item.trial}: score {item.score(whole[1]):.2f}   "
                  f"to the budget {whole[0]:6.2f} s   until it scores 1 {early[0]:6.2f} s")
        print(f"retrieval, {len(items)} prompts   to the budget {sum(to_budget):7.2f} s   until it scores 1 "
              f"{sum(until):7.2f} s   ratio {sum(to_budget) / sum(until):.2f}x")


if __name__ == "__main__":
    main()
