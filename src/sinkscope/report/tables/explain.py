"""Terminal tables of the explain experiments (registered with `table_for_experiment`)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from . import table_for_experiment


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _columns(table: Table, names: list[str], left: tuple[str, ...]) -> None:
    for name in names:
        table.add_column(name, justify="left" if name in left else "right")


@table_for_experiment("smoothing")
def smoothing_table(result: Any) -> list[Any]:
    summary = result.summary
    table = Table("bos", "mean entropy (nats)", "mean max weight", title="attention smoothing over text tokens")
    for mode in summary["bos"]:
        table.add_row(mode, f"{summary['mean_entropy'][mode]:.3f}", f"{summary['mean_max_weight'][mode]:.3f}")
    return [table]


@table_for_experiment("noop")
def noop_table(result: Any) -> list[Any]:
    table = Table("bos", "first value smallest", "median ||v0||/median", "sink heads ||v0||/median",
                  "first-token output share", "||o|| sinking", "||o|| other", title="the no-op mechanism")
    for mode in result.summary["bos"]:
        s = result.summary[mode]
        sink_ratio = s["sink_heads_median_first_value_ratio"]
        table.add_row(mode, f"{s['first_value_smallest_fraction']:.2f}", f"{s['median_first_value_ratio']:.3f}",
                      "-" if sink_ratio is None else f"{sink_ratio:.3f}", f"{s['mean_first_share']:.3f}",
                      f"{s['output_norm_sinking']:.3f}", f"{s['output_norm_other']:.3f}")
    return [table]


@table_for_experiment("conditional_heads")
def conditional_heads_table(result: Any) -> list[Any]:
    table = Table("rank", "layer", "head", "alpha other", "alpha after trigger", "drop", "attn on trigger token",
                  title=f"heads whose sink attention drops after {result.summary['trigger']!r}")
    for row in result.summary["top_heads"]:
        table.add_row(str(row["rank"]), str(row["layer"]), str(row["head"]), f"{row['alpha_other']:.3f}",
                      f"{row['alpha_trigger']:.3f}", f"{row['drop']:.3f}",
                      f"{row['previous_token_attention_trigger']:.3f}")
    return [table]


@table_for_experiment("rank_collapse")
def rank_collapse_table(result: Any) -> list[Any]:
    summary = result.summary
    table = Table(title=f"last depth (the output of layer {summary['n_layers'] - 1}, before the final norm), mean "
                  f"over {summary['n_prompts']} prompts", title_justify="left")
    _columns(table, ["bos", "first token", *(m.replace("_", " ") for m in summary["measures"])],
             ("bos", "first token"))
    for condition, by_tokens in summary["final_depth_mean"].items():
        for tokens, values in by_tokens.items():
            first = "excluded" if tokens == "first_token_excluded" else "kept"
            table.add_row(condition, first, *(f"{values[m]:.4g}" for m in summary["measures"]))
    return [table]


@table_for_experiment("repr_collapse")
def repr_collapse_table(result: Any) -> list[Any]:
    frame = result.to_frame()
    sizes = result.summary["lengths"]
    table = Table(title="L2 distance of the last token's residual at the last depth (relative to its norm) by n; "
                  f"L-inf and cosine at n={sizes[-1]}", title_justify="left")
    _columns(table, ["family", "bos", *(f"n={n}" for n in sizes), "L-inf", "cosine"], ("family", "bos"))
    if "repeat_token" in frame:  # more repeated tokens: the first one's rows (as the summary's curves)
        frame = frame[(frame["family"] != "repeated") | (frame["repeat_token"] == result.summary["repeat_token"])]
    for (name, condition), rows in frame.groupby(["family", "bos"], sort=False):
        rows = rows.sort_values("n")
        cells = [f"{v:.3g} ({r:.2g})" for v, r in zip(rows["l2"], rows["relative_l2"], strict=True)]
        table.add_row(name, condition, *cells, f"{rows['linf'].iloc[-1]:.3g}", f"{rows['cosine'].iloc[-1]:.3g}")
    return [table]


@table_for_experiment("massive")
def massive_table(result: Any) -> list[Any]:
    table = Table(title=f"largest max|h|/median|h| over {result.summary['n_prompts']} prompts and all depths; "
                  ">1000x: share of (prompt, depth) states with an entry above 1000x the median; top at pos 0, "
                  "top dims: where the largest entry of each state above 100x sits", title_justify="left")
    _columns(table, ["bos", "max ratio", "at depth/token/dim", "value", ">1000x", "top at pos 0", "top dims"],
             ("bos", "at depth/token/dim"))
    for condition, stats in result.summary["conditions"].items():
        at = stats["max_ratio_at"]
        at_zero = stats["flagged_top1_at_position0"]
        table.add_row(condition, f"{stats['max_ratio']:.0f}",
                      f"depth {at['depth']} {at['token']!r}@{at['token_index']} dim {at['dim']}",
                      f"{at['value']:.4g}", f"{stats['share_1000x']:.0%}", "-" if at_zero is None else f"{at_zero:.0%}",
                      " ".join(f"{d}x{n}" for d, n in list(stats["flagged_top1_dims"].items())[:2]))
    return [table]


@table_for_experiment("perturb")
def perturb_table(result: Any) -> list[Any]:
    summary = result.summary
    swap = summary["swap"]
    table = Table("bos", "position 0", "S_total", "S_final", "S_total (rel)", "S_final (rel)",
                  title=f"perturbation spread after '{swap['old']}' -> '{swap['new']}' "
                        f"(text token {summary['perturbed_position']})")
    for mode, stats in summary["conditions"].items():
        table.add_row(mode, stats["first_token"], *(_number(stats[k]) for k in ("S_total", "S_final", "S_total_rel",
                                                                               "S_final_rel")))
    shown: list[Any] = [table]
    if "R_total" in summary:
        shown.append(Text(f"R = S(strip)/S(add): total {summary['R_total']:.3f}, final {summary['R_final']:.3f} "
                          f"(relative: {summary['R_total_rel']:.3f}, {summary['R_final_rel']:.3f}); "
                          "R > 1: the change spreads further without <bos>"))
    return shown


@table_for_experiment("oversquash")
def oversquash_table(result: Any) -> list[Any]:
    summary = result.summary
    title = f"sensitivity of '{summary['target_token']}' to earlier tokens ({summary['method']})"
    table = Table("bos", "position 0", "s self", "s² mean ± se (unbiased)", "s at position 0",
                  "log10 slope / token", "B (c=1/H) mean", "passes f+b", title=title)
    for mode, stats in summary["conditions"].items():
        passes = summary["passes"][mode]
        table.add_row(mode, stats["first_token"], _number(stats["s_self"]),
                      f"{_number(stats['s2_mean'])} ± {_number(stats['s2_mean_se'])}",
                      _number(stats["s_prefix"] if stats["s_prefix"] is not None else stats["s_first_text"]),
                      _number(stats["decay_slope"]), _number(stats["B_mean_mean"]),
                      f"{passes['forward']}+{passes['backward']}")
    shown: list[Any] = [table]
    if "R_s_mean" in summary:
        shown.append(Text(f"R = s²_mean(strip)/s²_mean(add) = {summary['R_s2_mean']:.3f} (unbiased; with s: "
                          f"{summary['R_s_mean']:.3f}); path-sum R = "
                          f"{summary['R_B_mean']:.3f}; s larger without <bos> for "
                          f"{summary['frac_sources_s_larger_without_bos']:.0%} of sources"))
    return shown
