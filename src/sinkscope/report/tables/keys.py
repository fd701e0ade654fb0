"""Terminal table of `keys`: position 0 against every other key, and the tokens that act as sinks."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from . import table_for_experiment


@table_for_experiment("keys")
def keys_table(result: Any, top: int = 10) -> list[Any]:
    s = result.summary
    first, other = s["position0"], s["other_keys"]
    overview = Table("keys", "mean alpha_k", f"sink rate @ {s['eps']}", title=f"{s['model']} bos={s['bos']}: "
                     f"attention received per key ({s['n_sequences']} sequence(s), {max(s['n_tokens'])} tokens)")
    overview.add_row(f"position 0 ({s['first_token']})", f"{first['alpha_mean']:.3f}", f"{first['sink_rate']:.3f}")
    low, high = other["sink_rate_ci"]
    overview.add_row(f"positions > 0 (>= {s['min_queries']} queries)", f"{other['alpha_mean']:.4f}",
                     f"{other['sink_rate']:.5f} [{low:.5f}, {high:.5f}]")
    tokens = Table("token", "keys", "sink keys", "mean alpha_k", "max alpha_k", "sink rate", "strongest (layer:head)",
                   title="tokens that act as sinks besides position 0")
    for r in result.tables["sink_tokens"].head(top).itertuples():
        tokens.add_row(repr(r.token), str(r.n_keys), str(r.n_sink_keys), f"{r.alpha_mean:.4f}", f"{r.alpha_max:.3f}",
                       f"{r.sink_rate:.4f}", f"{r.top_layer}:{r.top_head} ({r.top_alpha:.3f})")
    keys = Table("position", "token", "mean alpha_k", "sink in (layer, head)s",
                 title="the keys after position 0 that receive the most attention")
    strongest = result.tables["sink_positions"]
    strongest = strongest[(strongest["position"] > 0) & (strongest["n_queries_min"] >= s["min_queries"])]
    for r in strongest.head(top).itertuples():
        keys.add_row(f"{r.position}" + (f" (seq {r.sequence})" if s["n_sequences"] > 1 else ""), repr(r.token),
                     f"{r.alpha_mean:.4f}", str(r.n_sink_heads))
    return [overview, tokens, keys]
