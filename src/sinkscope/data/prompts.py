"""Prompt sources: the built-in probe set and user files (.txt, .jsonl, .csv)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    domain: str = ""


def probe_set() -> list[Prompt]:
    """The built-in multi-domain probe set (180 prompts over 18 domains, written for this project)."""
    source = files("sinkscope.data").joinpath("probe_set.jsonl").read_text(encoding="utf-8")
    return [Prompt(r["id"], r["text"], r["domain"]) for r in map(json.loads, source.splitlines()) if r]


def _from_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    # Blank-line separated paragraphs if there are any, else one prompt per line.
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    if len([b for b in blocks if b]) > 1:
        return [b for b in blocks if b]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}: each line needs a string field 'text'")
        prompts.append(Prompt(str(record.get("id", f"p{len(prompts)}")), record["text"], str(record.get("domain", ""))))
    return prompts


def _from_csv(path: Path) -> list[Prompt]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise InputError(f"{path}: a CSV of prompts needs a 'text' column (found {reader.fieldnames})")
        return [
            Prompt(str(row.get("id") or f"p{i}"), row["text"] or "", str(row.get("domain") or ""))
            for i, row in enumerate(reader)
        ]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .txt (one per line, or blank-line separated), .jsonl (``text`` field) or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such prompt file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            prompts = _from_jsonl(path)
        elif suffix == ".csv":
            prompts = _from_csv(path)
        elif suffix in (".txt", ".md", ""):
            prompts = [Prompt(f"p{i}", text) for i, text in enumerate(_from_txt(path))]
        else:
            raise InputError(f"{path}: unsupported prompt file type '{suffix}' (use .txt, .jsonl or .csv)")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text") from error
    prompts = [p for p in prompts if p.text.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts found")
    return prompts
