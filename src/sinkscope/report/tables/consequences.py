"""Terminal tables of the consequences experiments (registered with `table_for_experiment`)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from . import table_for_experiment


def _printable(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")  # "\n" shown as such, not as a line break


@table_for_experiment("ablate")
def ablate_table(result: Any) -> list[Any]:
    s = result.summary
    buckets = list(dict.fromkeys(b for c in s["conditions"] for b in s["by_bucket"][c]))
    table = Table("bos", "position 0", "loss", "ppl", f"Δ vs {s['reference']}", *[f"ppl {b}" for b in buckets],
                  title=f"{s['n_windows']} windows x {s['window']} text tokens ({s['text']})")
    for c in s["conditions"]:
        loss = s["loss"][c]
        table.add_row(c, _printable(s["first_tokens"][c]), f"{loss['mean_loss']:.3f}", f"{loss['ppl']:.2f}",
                      f"{loss['delta_loss_vs_' + s['reference']]:+.3f}",
                      *[f"{s['by_bucket'][c][b]['ppl']:.2f}" if b in s["by_bucket"][c] else "-" for b in buckets])
    return [table]


@table_for_experiment("knockout")
def knockout_table(result: Any, top: int = 8) -> list[Any]:
    """The all-heads row, then the ``top`` layers and heads whose knock-out raises the loss most."""
    s = result.summary
    table = Table("knocked out", "key", "loss", "Δloss", "95% interval (windows)", "± se (tokens)",
                  title=f"sink knock-out, baseline loss {s['baseline']['loss']:.3f} (ppl {s['baseline']['ppl']:.2f}), "
                  f"{s['n_tokens']} tokens in {s['n_windows']} windows")
    frame = result.tables["knockout"]
    first, random = frame[frame["target"] == "first"], frame[frame["target"] == "random"]
    layers = first[first["scope"] == "layer"].nlargest(top, "delta_loss")
    shown = [first[first["scope"] == "all"], random[random["scope"] == "all"], layers,
             random[random["layer"].isin(layers["layer"]) & (random["scope"] == "layer")],
             first[first["scope"] == "head"].nlargest(top, "delta_loss")]
    for part in shown:
        for r in part.itertuples():
            label = {"all": "all heads", "layer": f"layer {r.layer}"}.get(r.scope, f"layer {r.layer} head {r.head}")
            table.add_row(label, "first" if r.target == "first" else "random other", f"{r.loss:.3f}",
                          f"{r.delta_loss:+.4f}", f"[{r.delta_loss_low:+.4f}, {r.delta_loss_high:+.4f}]",
                          f"{r.delta_se:.4f}")
    tables: list[Any] = [table]
    if s.get("control"):
        paired = s["control"]["first_minus_random"]["all_heads"]
        low, high = paired["delta_loss_ci"]
        tables.append(f"all heads: Δloss(first key) - Δloss(random key) = {paired['delta_loss']:+.4f} "
                      f"[{low:+.4f}, {high:+.4f}] (paired over windows)")
    return tables


@table_for_experiment("generate")
def generate_table(result: Any) -> list[Any]:
    conditions = result.summary["conditions"]
    table = Table("prompt", *conditions, title="greedy continuations", show_lines=True)
    for item in result.summary["prompts"]:
        table.add_row(item["prompt"], *[item["continuations"][c]["text"] for c in conditions])
    return [table]


@table_for_experiment("passkey")
def passkey_table(result: Any) -> list[Any]:
    s = result.summary
    lengths = [str(n) for n in s["lengths"]]
    table = Table("bos", "accuracy", *[f"{n} tok" for n in lengths],
                  title=f"passkey retrieval ({len(s['depths'])} depths x {s['trials']} trials per length)")
    for mode in s["bos"]:
        table.add_row(mode, f"{s['accuracy'][mode]:.2f}", *[f"{s['accuracy_by_length'][mode][n]:.2f}" for n in lengths])
    return [table]


@table_for_experiment("stream")
def stream_table(result: Any) -> list[Any]:
    s = result.summary
    table = Table("cache", f"ppl (positions >= {s['eval_start']})", "peak cache (MiB)", "cache at end (MiB)",
                  "peak RSS (MiB)", title=f"{s['length']} tokens streamed, window {s['window']} ({s['text']})")
    for label in s["caches"]:
        table.add_row(label, f"{s['ppl'][label]:.2f}", f"{s['peak_cache_bytes'][label] / 2**20:.1f}",
                      f"{s['cache_bytes_at_end'][label] / 2**20:.1f}", f"{s['peak_rss_bytes'][label] / 2**20:.0f}")
    return [table]


@table_for_experiment("downstream")
def downstream_table(result: Any) -> list[Any]:
    conditions = result.summary["bos"]
    table = Table("task", "metric", *conditions, title="downstream scores")
    frame = result.tables["downstream"]
    if not frame.empty:
        pivot = frame.pivot_table("value", ["task", "metric"], "bos")
        for (task_name, metric), row in pivot.iterrows():
            table.add_row(task_name, metric, *[f"{row[b]:.4f}" for b in conditions])
    return [table]
