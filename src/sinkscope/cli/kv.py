"""`sinkscope kv`: what compressing the KV cache costs, with and without the sink kept.

Its options are `experiments.kv.KV`'s declared settings (`cli.settings.with_settings`), plus the grid and the
switches below."""

from __future__ import annotations

from typing import Annotated

import typer

from ..experiments.kv import GRIDS, KV, kv_settings
from . import CONSEQUENCES, app, options, run_each_condition
from .commands import experiment_options
from .settings import RunOptions, Settings


@app.command("kv", rich_help_panel=CONSEQUENCES)
@experiment_options(KV)
def kv_command(
    model: options.Model = "gemma3-270m", text: options.Text = None,
    grid: Annotated[str | None, typer.Option(
        help=f"a preset of the settings below ({' | '.join(GRIDS)}): quick (a smoke test), docs (2048-token "
             "prefill, 16 windows, ratios .5/.75/.9, RULER-style retrieval with 20 prompts per task: the docs' "
             "tables), long (the same at 4096); an option given overrides its grid's value")] = None,
    no_quant: Annotated[bool, typer.Option("--no-quant", help="skip the quantised caches")] = False,
    no_press: Annotated[bool, typer.Option("--no-press", help="skip the eviction presses")] = False,
    bos: options.Bos = None, run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """KV-cache quantisation and eviction with and without the sink kept: Δloss, retrieval through the cache,
    bytes, sink mass, and the cheapest cache within tolerance."""
    given = dict(settings or {})
    if "policies" in given:  # --policy sets both kinds of cache unless one is given on its own
        given.setdefault("press_policies", given["policies"])
        given.setdefault("quant_policies", given["policies"])
    chosen = kv_settings(grid, given)
    if no_quant:
        chosen["bits"] = ()
    if no_press:
        chosen["presses"] = ()
    run_each_condition(lambda condition: KV(text=text, bos=condition, **chosen), bos, "add", model, run)
