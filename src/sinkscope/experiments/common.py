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
