"""`sinkscope matrix-entropy`: the residual stream's matrix entropy per depth next to the position-0 norm
and the sink rate per layer, with vs without <bos>."""

from __future__ import annotations

from ..experiments.matrix_entropy import MatrixEntropy
from . import EXPLAIN, app, options, run_command, user_errors
from .settings import RunOptions, Settings, with_run_options, with_settings


@app.command("matrix-entropy", rich_help_panel=EXPLAIN)
@user_errors
@with_settings(MatrixEntropy)
@with_run_options
def matrix_entropy(
    model: options.Model = "gemma3-270m", prompts: options.Prompts = None, limit: options.Limit = None,
    bos: options.Bos = None, max_tokens: options.MaxTokens = 64,
    batch_size: options.BatchSize = 8, run: RunOptions = RunOptions(), settings: Settings = None,
) -> None:
    """Matrix entropy of the residual stream per depth (compression valley), <bos> norm, sink rate per layer."""
    experiment = MatrixEntropy(prompts=options.prompts_from(prompts, limit), bos=tuple(bos or ["add", "strip"]),
                               max_tokens=max_tokens, batch_size=batch_size, **(settings or {}))
    run_command(experiment, model, run)
