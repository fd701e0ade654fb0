"""`sinkscope kv`: what compressing the KV cache costs, with and without the sink kept."""

from __future__ import annotations

from typing import Annotated

import typer

from . import CONSEQUENCES, app, options, run_each_condition, user_errors


@app.command("kv", rich_help_panel=CONSEQUENCES)
@user_errors
def kv_command(
    model: options.Model = "gemma3-270m", text: options.Text = None,
    window: Annotated[int, typer.Option(help="text tokens per window (<bos> comes on top)")] = 160,
    context: Annotated[int, typer.Option(help="text tokens prefilled (and compressed) before scoring")] = 128,
    max_windows: Annotated[int, typer.Option(help="windows of the text")] = 4,
    step: Annotated[int, typer.Option(help="tokens per forward when scoring through the cache")] = 32,
    bits: Annotated[list[int] | None, typer.Option(help="quantisation bits: 2 | 4 | 8; repeat (default all)")] = None,
    axis: Annotated[list[str] | None, typer.Option(help="scales per token | channel; repeat (default both)")] = None,
    group_size: Annotated[int, typer.Option(help="channels (per token) or tokens (per channel) per scale")] = 32,
    protect: Annotated[list[int] | None, typer.Option(
        help="first tokens kept at full precision / never evicted; repeat (default 0, 1, 4)")] = None,
    press: Annotated[list[str] | None, typer.Option(
        help="eviction policy: window | knorm | snapkv | expected_attention (kvpress's definitions), or the earlier "
             "*_sinkscope variants; repeat (default: window, knorm, snapkv)")] = None,
    ratio: Annotated[list[float] | None, typer.Option(help="fraction evicted, in (0, 1); repeat (default 0.5, 0.75)")]
    = None,
    policy: Annotated[list[str] | None, typer.Option(
        help="which k tokens a --protect budget keeps: first (the first k) | found (the k keys drawing the most "
             "attention in the context: the sinks found) | massive (the k tokens with the largest activations); "
             "repeat (default first)")] = None,
    no_quant: Annotated[bool, typer.Option("--no-quant", help="skip the quantised caches")] = False,
    no_press: Annotated[bool, typer.Option("--no-press", help="skip the eviction presses")] = False,
    passkey_length: Annotated[int, typer.Option(help="passkey prompt length in text tokens (0 = no passkey)")] = 160,
    passkey_trials: Annotated[int, typer.Option(help="passkey prompts (one key each)")] = 2,
    max_delta_loss: Annotated[float, typer.Option(
        help="the recommendation: Δloss tolerance (nats), by the upper end of its interval")] = 0.02,
    max_retrieval_drop: Annotated[float, typer.Option(
        help="the recommendation: passkey accuracy drop tolerated, by the lower end of its interval")] = 0.02,
    bos: options.Bos = None, out: options.Out = None, resume: options.Resume = False, quiet: options.Quiet = False,
) -> None:
    """KV-cache quantisation and eviction with and without the sink kept: Δloss, passkey, bytes, sink mass."""
    from ..experiments.kv import DEFAULT_PRESSES, KV

    run_each_condition(
        lambda condition: KV(text=text, window=window, context=context, max_windows=max_windows, step=step,
                             bits=() if no_quant else tuple(bits or (8, 4, 2)),
                             axes=tuple(axis or ("token", "channel")),
                             group_size=group_size, protect=tuple((0, 1, 4) if protect is None else protect),
                             presses=() if no_press else tuple(press or DEFAULT_PRESSES),
                             ratios=tuple(ratio or (0.5, 0.75)), passkey_length=passkey_length,
                             passkey_trials=passkey_trials, bos=condition, max_delta_loss=max_delta_loss,
                             max_retrieval_drop=max_retrieval_drop, policies=tuple(policy or ("first",))),
        bos, "add", model, out=out, resume=resume, quiet=quiet)
