"""What every experiment shares: provenance, `<bos>` conditions, and a result type that saves itself."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import __version__
from ..errors import TokenizationError
from ..models.loader import LoadedModel
from ..models.tokens import encode, parse_bos
from ..report.rundir import write_json, write_table

CSV_MAX_ROWS = 20_000  # tables up to this size are also written as CSV


def versions() -> dict[str, str]:
    import transformers

    return {
        "sinkscope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def provenance(loaded: LoadedModel, command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The run's provenance, stored in every summary.json."""
    return {"model": loaded.info.to_dict(), "versions": versions(), "command": command or " ".join(sys.argv),
            **extra}


def encode_conditions(loaded: LoadedModel, text: str, bos: Sequence[str], max_tokens: int | None = None
                      ) -> dict[str, list[int]]:
    """Token ids of one text under each `<bos>` condition (same text tokens, different position 0)."""
    if loaded.tokenizer is None:
        raise TokenizationError("this model has no tokenizer; load it with tokenizer=...")
    return {str(parse_bos(mode)): encode(loaded.tokenizer, text, mode, max_tokens) for mode in bos}


@dataclass
class ExperimentResult:
    """Tidy tables + a summary. Subclasses override `plot` to draw their figures into a run directory."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self, name: str | None = None) -> pd.DataFrame:
        """The main table (the first one) or the one named."""
        key = name or next(iter(self.tables))
        return self.tables[key].copy()

    def plot(self, out: Path) -> list[Path]:
        return []

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in self.tables.items():
            write_table(out / f"{name}.parquet", frame)
            if len(frame) <= CSV_MAX_ROWS:
                write_table(out / f"{name}.csv", frame)
        write_json(out / "summary.json", {**self.summary, "provenance": self.meta})
        self.plot(out)
        return out


@dataclass(frozen=True)
class Sequence_:
    """One encoded prompt under one `<bos>` condition. ``text_start`` is where its text tokens begin
    (1 when a prefix such as `<bos>` sits at position 0), so conditions can be compared on the same tokens."""

    bos: str
    prompt: int
    ids: list[int]
    text_start: int


def encode_prompts(loaded: LoadedModel, texts: Sequence[str], bos: Sequence[str], max_tokens: int | None
                   ) -> list[Sequence_]:
    """Every text under every `<bos>` condition, with the start of its text tokens."""
    out = []
    for index, text in enumerate(texts):
        try:
            stripped = len(encode(loaded.tokenizer, text, "strip", max_tokens))
            for mode, ids in encode_conditions(loaded, text, bos, max_tokens).items():
                out.append(Sequence_(mode, index, ids, max(0, len(ids) - stripped)))
        except TokenizationError as error:
            raise TokenizationError(f"prompt {index}: {error}") from error
    return out


def progress_bar(title: str, enabled: bool) -> Any:
    """A rich progress bar with the columns sinkscope uses everywhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{title}[/] " + "{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled)
