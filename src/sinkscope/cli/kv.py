"""`sinkscope kv`: what compressing the KV cache costs, with and without the sink kept."""

from __future__ import annotations

from typing import Annotated

import typer

from . import CONSEQUENCES, app, options, run_each_condition, user_errors


@app.command("kv", rich_help_panel=CONSEQUENCES)
@user_errors
def kv_command(
    model: options.Model = "gemma3-270m", text: options.Text = None,
    grid: Annotated[str | None, typer.Option(
        help="a preset of the settings below: quick (a smoke test) | docs (2048-token prefill, 16 windows, "
             "ratios .5/.75/.9, RULER-style retrieval, 20 prompts per task: the docs' tables) | long (the same at "
             "4096); any option given overrides its grid's value")] = None,
    window: Annotated[int | None, typer.Option(help="text tokens per window (<bos> comes on top) [160]")] = None,
    context: Annotated[int | None, typer.Option(
        help="text tokens prefilled (and compressed) before scoring [128]")] = None,
    max_windows: Annotated[int | None, typer.Option(help="windows of the text [4]")] = None,
    step: Annotated[int | None, typer.Option(help="tokens per forward when scoring through the cache [32]")] = None,
    bits: Annotated[list[int] | None, typer.Option(help="quantisation bits: 2 | 4 | 8; repeat [all]")] = None,
    axis: Annotated[list[str] | None, typer.Option(help="scales per token | channel; repeat [both]")] = None,
    group_size: Annotated[int | None, typer.Option(
        help="channels (per token) or tokens (per channel) per scale [32]")] = None,
    protect: Annotated[list[int] | None, typer.Option(
        help="tokens kept at full precision / never evicted; repeat [0, 1, 4]")] = None,
    press: Annotated[list[str] | None, typer.Option(
        help="eviction policy: window | knorm | snapkv | expected_attention (kvpress's definitions), or the earlier "
             "*_sinkscope variants; repeat [window, knorm, snapkv]")] = None,
    ratio: Annotated[list[float] | None, typer.Option(help="fraction evicted, in (0, 1); repeat [0.5, 0.75]")]
    = None,
    policy: Annotated[list[str] | None, typer.Option(
        help="which k tokens a --protect budget keeps: first (the first k) | found (the k keys drawing the most "
             "attention in the context: the sinks found) | massive (the k tokens with the largest activations); "
             "repeat [first]")] = None,
    press_policy: Annotated[list[str] | None, typer.Option(
        help="--policy for the eviction presses alone; repeat")] = None,
    quant_policy: Annotated[list[str] | None, typer.Option(
        help="--policy for the quantised caches alone; repeat")] = None,
    no_quant: Annotated[bool, typer.Option("--no-quant", help="skip the quantised caches")] = False,
    no_press: Annotated[bool, typer.Option("--no-press", help="skip the eviction presses")] = False,
    task: Annotated[list[str] | None, typer.Option(
        help="retrieval through the cache: passkey | a RULER-style task (niah_single, niah_multikey, ...; "
             "`sinkscope ruler --help`); repeat [passkey]")] = None,
    retrieval_length: Annotated[int | None, typer.Option(
        "--retrieval-length", "--passkey-length", help="retrieval prompt length in text tokens (0 = none) [160]")
    ] = None,
    retrieval_trials: Annotated[int | None, typer.Option(
        "--retrieval-trials", "--passkey-trials", help="retrieval prompts per task, one key each [2]")] = None,
    retrieval_depth: Annotated[list[float] | None, typer.Option(
        help="where the needle sits (fraction of the context), cycled over a task's prompts; repeat [0.5]")] = None,
    max_delta_loss: Annotated[float | None, typer.Option(
        help="the recommendation: Δloss tolerance (nats), by the upper end of its interval [0.02]")] = None,
    max_retrieval_drop: Annotated[float | None, typer.Option(
        help="the recommendation: retrieval drop tolerated, by the lower end of its paired interval [0.02]")] = None,
    bos: options.Bos = None, out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
) -> None:
    """KV-cache quantisation and eviction with and without the sink kept: Δloss, retrieval through the cache,
    bytes, sink mass, and the cheapest cache within tolerance."""
    from ..experiments.kv import KV, kv_settings

    def listed(values: list[int] | list[str] | list[float] | None) -> tuple[object, ...] | None:
        return None if values is None else tuple(values)

    given = {"window": window, "context": context, "max_windows": max_windows, "step": step, "bits": listed(bits),
             "axes": listed(axis), "group_size": group_size, "protect": listed(protect), "presses": listed(press),
             "ratios": listed(ratio), "policies": listed(policy), "press_policies": listed(press_policy),
             "quant_policies": listed(quant_policy), "tasks": listed(task), "retrieval_length": retrieval_length,
             "retrieval_trials": retrieval_trials, "retrieval_depths": listed(retrieval_depth),
             "max_delta_loss": max_delta_loss, "max_retrieval_drop": max_retrieval_drop}
    if policy is not None:  # --policy sets both kinds unless one is given on its own
        given["press_policies"] = given["press_policies"] or tuple(policy)
        given["quant_policies"] = given["quant_policies"] or tuple(policy)
    settings = kv_settings(grid, given)
    if no_quant:
        settings["bits"] = ()
    if no_press:
        settings["presses"] = ()
    run_each_condition(lambda condition: KV(text=text, bos=condition, **settings), bos, "add", model, out=out,
                       resume=resume, quiet=quiet)
