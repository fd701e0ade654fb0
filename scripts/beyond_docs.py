"""Write docs/generated/*.md from finished run directories of `keys`, `knockout`, `matrix-entropy`, `ruler`,
`kv`.

    python scripts/beyond_docs.py [--stem STEM] RUN_DIR [RUN_DIR ...]

Each run directory's experiment decides the page: keys-<model>.md, knockout-control-<model>.md,
matrix-entropy-<model>.md, ruler-<model>.md or kv-<model>.md (with docs/images/kv-<model>.png);
``--stem ruler-long`` writes ruler-long-<model>.md, for a second run of the same experiment. Every number on
a page is read from the run's files; the page names the command that made them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from sinkscope.experiments.base import Result
from sinkscope.report.figures import save_figure

GENERATED = Path(__file__).resolve().parent.parent / "docs" / "generated"


def _command(result: Result) -> str:
    version = result.provenance["versions"]["sinkscope"]
    return f"Made by `{result.provenance.get('command', '?')}` (sinkscope {version})."


def _interval(values: list[float], digits: int = 3) -> str:
    return f"[{values[0]:+.{digits}f}, {values[1]:+.{digits}f}]"


def _token(token: str) -> str:
    return "`" + token.replace("`", "'").replace("|", "\\|") + "`" if token.strip() else repr(token)


def keys_page(result: Result) -> str:
    s = result.summary
    first, other = s["position0"], s["other_keys"]
    lines = [
        f"**{s['model']}**, `--bos {s['bos']}`, {s['n_sequences']} sequence(s) of {max(s['n_tokens'])} tokens "
        f"({s['text']}), {s['n_layers']} layers x {s['n_heads']} heads. {_command(result)}",
        "",
        f"| keys | mean alpha_k | share of (key, layer, head) with alpha_k > {s['eps']} |",
        "|---|---|---|",
        f"| position 0 ({_token(s['first_token'])}) | {first['alpha_mean']:.3f} | {first['sink_rate']:.3f} |",
        f"| positions > 0 seen by >= {s['min_queries']} queries ({other['n_keys']} key x head entries) | "
        f"{other['alpha_mean']:.4f} | {other['sink_rate']:.5f} (95% over keys: [{other['sink_rate_ci'][0]:.5f}, "
        f"{other['sink_rate_ci'][1]:.5f}]) |",
        "",
        f"{other['n_sink_positions']} key positions after position 0 are a sink (alpha_k > {s['eps']}) in at least "
        f"one head ({other['n_sink_entries']} (key, layer, head) entries). The keys after position 0 that receive the "
        "most attention (mean over all layers x heads):",
        "",
        "| position | token | in context | mean alpha_k | sink in how many (layer, head) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {p['position']} | {_token(p['token'])} | {_token(p.get('context', ''))} | {p['alpha_mean']:.4f} | "
              f"{p['n_sink_heads']} |"
              for p in s["top_sink_positions"]]
    lines += ["", "By token (positions > 0), highest sink rate first:", "",
              "| token | keys | keys that are a sink in some head | mean alpha_k | max alpha_k | sink rate |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {_token(t['token'])} | {t['n_keys']} | {t['n_sink_keys']} | {t['alpha_mean']:.4f} | "
              f"{t['alpha_max']:.3f} | {t['sink_rate']:.4f} |" for t in s["top_sink_tokens"][:6]]
    return "\n".join(lines) + "\n"


def knockout_page(result: Result) -> str:
    s = result.summary
    control = s["control"]
    lines = [
        f"**{s['model']}**, `--bos {s['bos']}`, {s['n_windows']} windows x {s['window']} text tokens ({s['text']}), "
        f"baseline loss {s['baseline']['loss']:.3f}. {_command(result)}",
        "",
        "| knocked out (all heads) | Δloss (nats) | 95% interval over windows |",
        "|---|---|---|",
        f"| the first key (the sink) | {s['all_heads']['delta_loss']:+.3f} | "
        f"{_interval(s['all_heads']['delta_loss_ci'])} |",
    ]
    if control:
        paired = control["first_minus_random"]["all_heads"]
        lines += [
            f"| one random other key per query (seed {control['seed']}) | {control['all_heads']['delta_loss']:+.3f} | "
            f"{_interval(control['all_heads']['delta_loss_ci'])} |",
            f"| difference, first - random (paired over windows) | {paired['delta_loss']:+.3f} | "
            f"{_interval(paired['delta_loss_ci'])} |",
            "",
            "Per layer (all heads of one layer; of the layers run, up to five, largest Δloss first):",
            "",
            "| layer | Δloss, first key | Δloss, random key | first - random (95%) |",
            "|---|---|---|---|",
        ]
        for row in s["top_layers"]:
            layer = row["layer"]
            diff = control["first_minus_random"]["by_layer"][str(layer)]
            lines.append(f"| {layer} | {row['delta_loss']:+.4f} {_interval(row['delta_loss_ci'], 4)} | "
                         f"{control['delta_loss_by_layer'][str(layer)]:+.4f} "
                         f"{_interval(control['delta_loss_by_layer_ci'][str(layer)], 4)} | "
                         f"{diff['delta_loss']:+.4f} {_interval(diff['delta_loss_ci'], 4)} |")
        by_layer = control["first_minus_random"]["by_layer"]
        above = sorted(int(layer) for layer, d in by_layer.items() if d["delta_loss_ci"][0] > 0)
        below = sorted(int(layer) for layer, d in by_layer.items() if d["delta_loss_ci"][1] < 0)
        lines += ["", f"Of the {len(by_layer)} layers run, removing the first key costs more than removing a random "
                  f"key (95% interval of the difference above 0) in {len(above)}"
                  + (f" (layers {', '.join(map(str, above))})" if above else "")
                  + f", less in {len(below)}" + (f" (layers {', '.join(map(str, below))})" if below else "")
                  + ", and the two are not told apart in the others."]
    return "\n".join(lines) + "\n"


def entropy_page(result: Result) -> str:
    s = result.summary
    per_depth = result.tables["per_depth"]
    conditions = list(s["bos"])
    lines = [f"**{s['model']}**, {s['n_prompts']} prompts of at most {s['max_tokens']} tokens, "
             f"sink at alpha > {s['eps']}. {_command(result)}", "",
             "| `<bos>` | entropy at depth 0 | valley: depth, entropy (95% over prompts) | entropy at depth "
             f"{s['n_layers']} | lowest centred entropy (depth) | mean sink rate |", "|---|---|---|---|---|---|"]
    for c in conditions:
        v = s["conditions"][c]
        centred_values = v.get("entropy_centred_by_depth")
        lowest = "–" if not centred_values else (
            f"{min(centred_values[1:-1] or centred_values):.3f} "
            f"({centred_values.index(min(centred_values[1:-1] or centred_values))})")
        lines.append(f"| {c} | {v['embedding_entropy']:.3f} | {v['valley_depth']}, {v['valley_entropy']:.3f} "
                     f"[{v['valley_entropy_ci'][0]:.3f}, {v['valley_entropy_ci'][1]:.3f}] | {v['final_entropy']:.3f} | "
                     f"{lowest} | {v['sink_rate']:.3f} |")
    centred = "entropy_centred" in per_depth
    shown = "entropy / centred / ‖h₀‖÷median / sink rate" if centred else "entropy / ‖h₀‖÷median / sink rate"
    header = " | ".join(f"{shown}, {c}" for c in conditions)
    lines += ["", f"| depth (layer) | {header} |", "|---" * (1 + len(conditions)) + "|"]
    for depth in sorted(per_depth["depth"].unique()):
        cells = []
        for c in conditions:
            row = per_depth[(per_depth["bos"] == c) & (per_depth["depth"] == depth)].iloc[0]
            rate = "–" if row["sink_rate"] != row["sink_rate"] else f"{row['sink_rate']:.2f}"
            extra = f" / {row['entropy_centred']:.2f}" if centred else ""
            cells.append(f"{row['entropy']:.2f}{extra} / {row['first_norm_ratio']:.1f} / {rate}")
        layer = "embeddings" if depth == 0 else f"after layer {depth - 1}"
        lines.append(f"| {depth} ({layer}) | " + " | ".join(cells) + " |")
    difference = s.get("entropy_difference")
    if difference:
        first, second = difference["conditions"]
        by_depth = difference["by_depth"]
        lowest = min(range(len(by_depth)), key=lambda d: by_depth[d]["mean"])
        lines += ["", f"Entropy with `{first}` minus with `{second}` (paired over prompts): largest drop at depth "
                  f"{lowest}, {by_depth[lowest]['mean']:+.3f} {_interval(by_depth[lowest]['ci'])}."]
    return "\n".join(lines) + "\n"


def ruler_page(result: Result) -> str:
    s = result.summary
    accuracy = result.tables["accuracy"]
    conditions = list(s["bos"])
    lengths = [int(n) for n in s["lengths"]]
    lines = [f"**{s['model']}**, {len(s['tasks'])} tasks x lengths {', '.join(map(str, lengths))} (text tokens) x "
             f"depths {', '.join(f'{d:g}' for d in s['depths'])} x {s['trials']} trials, values: {s['values']}, "
             f"haystack: {s['haystack'] or 'repeated filler'}; {s['n_prompts']} prompts answered greedily. "
             f"{_command(result)}", "",
             "| `<bos>` | accuracy (95% interval over trials) |", "|---|---|"]
    for c in conditions:
        a = s["accuracy"][c]
        lines.append(f"| {c} | {a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}] |")
    for label, d in s.get("difference", {}).items():
        lines.append(f"| {label} (paired) | {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")
    lines += ["", "Accuracy per task and length, " + " / ".join(f"`{c}`" for c in conditions) + ":", "",
              "| task | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (1 + len(lengths)) + "|"]
    for task in s["tasks"]:
        cells = []
        for n in lengths:
            rows = accuracy[(accuracy["task"] == task) & (accuracy["length"] == n)].set_index("bos")["accuracy"]
            cells.append(" / ".join(f"{rows[c]:.2f}" if c in rows else "–" for c in conditions))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if s.get("skipped"):
        skipped = "; ".join(f"{x['task']} at {x['length']} ({x['reason']})" for x in s["skipped"])
        lines += ["", f"Not run: {skipped}."]
    return "\n".join(lines) + "\n"


def _kv_number(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)  # NaN (no retrieval) as "-"


def _kv_interval(r: Any) -> str:
    return f"{r.delta_loss:+.3f} [{r.delta_low:+.3f}, {r.delta_high:+.3f}]"


def _kv_retrieval(r: Any) -> str:
    """The mean retrieval score and its paired difference from the full cache [95% CI]."""
    if r.retrieval != r.retrieval:
        return "-"
    return f"{r.retrieval:.2f} ({r.retrieval_delta:+.2f} [{r.retrieval_delta_low:+.2f}, {r.retrieval_delta_high:+.2f}])"


def kv_page(result: Result) -> str:
    """A saved `kv` run as Markdown: settings, the table of every cache, retrieval task by task, protected vs
    unprotected pairs, protect policies at the same budget, and the recommendation."""
    s, table = result.summary, result.tables["kv"]
    provenance = result.provenance  # "full layers": the full-attention layers alone (what eviction compresses)
    tasks = ", ".join(s.get("tasks", []))
    lines = [
        f"**{s['model']}** — {s['n_windows']} windows of {s['text']}: `<bos>` + {s['context']} text tokens "
        f"prefilled, then {s['scored_per_window']} tokens per window scored through the cache ({s['step']} per "
        f"forward); retrieval through the cache: {s['n_retrieval_prompts']} prompts of {s['retrieval_length']} "
        f"tokens ({tasks}). Full cache: loss {s['full']['loss']:.3f}, retrieval "
        f"{_kv_number(s['full']['retrieval'], '.2f')}, sink mass {s['full']['sink_mass']:.3f}. Command: "
        f"`{provenance.get('command', '')}` (sinkscope {provenance.get('versions', {}).get('sinkscope', '?')}, "
        f"{provenance.get('seconds', 0):.0f} s).",
        "",
        "Retrieval: mean score (Δ vs the full cache over the same prompts [95% CI]). Bytes: the whole cache, and its "
        "full-attention layers alone (what eviction compresses), relative to the full cache.",
        "",
        "| cache | loss | Δloss [95% CI] | retrieval (Δ [95% CI]) | answer NLL | bytes / full | full layers | "
        "sink mass | kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.loss:.3f} | {_kv_interval(r)} | {_kv_retrieval(r)} | "
                     f"{_kv_number(r.answer_nll, '.2f')} | {r.bytes_ratio:.3f} | {r.bytes_full_layers_ratio:.3f} | "
                     f"{r.sink_mass:.3f} | {r.sink_mass_kept:.2f} |")
    chosen = s.get("recommendation", {})
    if chosen.get("method"):
        lines += ["", f"**Recommended** (the fewest bytes with Δloss ≤ {chosen['max_delta_loss']:g} nats and "
                  f"retrieval within {chosen['max_retrieval_drop']:g} of the full cache, both by their intervals): "
                  f"`{chosen['method']}`" + (" — nothing cheaper stays within both." if chosen["method"] == "full"
                                               else f", {chosen['bytes_ratio']:.3f} of the full cache's bytes.")]
    lines += _kv_tasks(result.tables.get("retrieval_tasks"))
    protected = sorted(k for k in table["protect"].unique() if k > 0)
    if protected and 0 in set(table["protect"]):
        k = protected[-1]
        lines += ["", f"Protecting the first {k} tokens, cache by cache (protect 0 → {k}):", "",
                  f"| cache | Δloss, protect 0 | Δloss, protect {k} | retrieval 0 → {k} |", "|---|---|---|---|"]
        others = table[(table["kind"] != "full") & (table["policy"] == "first")]
        for _, group in others.groupby(["family", others["ratio"].fillna(-1)], sort=False):
            rows = {int(r.protect): r for r in group.itertuples()}
            if 0 in rows and k in rows:
                name = rows[0].method.rsplit(" k=", 1)[0]
                before, after = (_kv_number(rows[p].retrieval, ".2f") for p in (0, k))
                lines.append(f"| {name} | {_kv_interval(rows[0])} | {_kv_interval(rows[k])} | {before} → {after} |")
    lines += _kv_policies(table)
    return "\n".join(lines) + "\n"


def _kv_tasks(by_task: Any) -> list[str]:
    """Retrieval through the cache, task by task: mean score (Δ vs the full cache [95% CI])."""
    if by_task is None or by_task.empty:
        return []
    tasks = list(dict.fromkeys(by_task["task"]))
    lines = ["", "Retrieval task by task: mean score (Δ vs the full cache over the same prompts [95% CI]):", "",
             "| cache | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for method, rows in by_task.groupby("method", sort=False):
        cells = {r.task: _kv_retrieval(r) for r in rows.itertuples()}
        lines.append(f"| {method} | " + " | ".join(cells.get(t, "-") for t in tasks) + " |")
    return lines


def _kv_policies(table: Any) -> list[str]:
    """Which k tokens a protect budget keeps, at the same k (the same bytes): Δloss [95% CI] and retrieval."""
    if table["policy"].nunique() < 2:
        return []
    policies = list(dict.fromkeys(table["policy"]))
    lines = ["", "The same protect budget spent on other tokens (the same bytes): the first k, the sinks found in the "
             "context (the keys drawing the most attention), the tokens with massive activations. Δloss [95% CI]; "
             "retrieval (Δ vs full):", "", "| cache | " + " | ".join(policies) + " |",
             "|---|" + "---|" * len(policies)]
    budgets = table[(table["kind"] != "full") & (table["protect"] > 0)]
    for _, group in budgets.groupby(["family", budgets["ratio"].fillna(-1), "protect"], sort=False):
        rows = {r.policy: r for r in group.itertuples()}
        if len(rows) < 2:
            continue
        name = next(iter(rows.values())).method.rsplit(" ", 1)[0] if "first" not in rows else rows["first"].method
        cells = [f"{_kv_interval(rows[p])}; {_kv_retrieval(rows[p])}" if p in rows else "-" for p in policies]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


PAGES: dict[str, tuple[str, Any]] = {"keys": ("keys", keys_page), "knockout": ("knockout-control", knockout_page),
                                     "matrix_entropy": ("matrix-entropy", entropy_page), "ruler": ("ruler", ruler_page),
                                     "kv": ("kv", kv_page)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--stem", help="page name before -<model>.md (default: by the run's experiment)")
    args = parser.parse_args()
    if args.stem is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.stem):
        parser.error("--stem: lower-case letters, digits and '-' only (the page stays in docs/generated)")
    GENERATED.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        result = Result.load(run)
        experiment = result.experiment or result.provenance.get("experiment", "")  # the saved run says which
        if experiment not in PAGES:
            parser.error(f"{run}: a {experiment or 'unknown'} run has no page (pages: {', '.join(PAGES)})")
        stem, page = PAGES[experiment]
        path = GENERATED / f"{args.stem or stem}-{result.summary['model']}.md"
        path.write_text(page(result), encoding="utf-8")
        print(f"wrote {path}")
        if experiment == "kv":  # its Pareto figure beside the page, drawn from the saved result
            image = GENERATED.parent / "images" / f"kv-{result.summary['model']}.png"
            save_figure(result.figures()["kv_pareto"], image)
            print(f"wrote {image}")


if __name__ == "__main__":
    main()
