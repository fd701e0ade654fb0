"""Prompt sources: the built-in probe set and user files (.txt, .jsonl, .csv)."""

from __future__ import annotations

import csv
import io
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


def _decode(path: Path) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped, as spreadsheet exports add one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); "
                         "save the file as UTF-8") from error


def _from_txt(text: str) -> list[str]:
    # Blank-line separated paragraphs if there are any, else one prompt per line.
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    if len([b for b in blocks if b]) > 1:
        return [b for b in blocks if b]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_jsonl(text: str, path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
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


def _from_csv(text: str, path: Path) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # bad quoting is an error, not a merge
    try:
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise InputError(f"{path}: a CSV of prompts needs a 'text' column (found {reader.fieldnames})")
        return [
            Prompt(str(row.get("id") or f"p{i}"), row["text"] or "", str(row.get("domain") or ""))
            for i, row in enumerate(reader)
        ]
    except csv.Error as error:
        raise InputError(f"{path}:{reader.line_num + 1}: not valid CSV ({error})") from error  # the line being read


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .txt (one per line, or blank-line separated), .jsonl (``text`` field) or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such prompt file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".txt", ".md", ""):
        raise InputError(f"{path}: unsupported prompt file type '{suffix}' (use .txt, .jsonl or .csv)")
    text = _decode(path)
    if suffix == ".jsonl":
        prompts = _from_jsonl(text, path)
    elif suffix == ".csv":
        prompts = _from_csv(text, path)
    else:
        prompts = [Prompt(f"p{i}", block) for i, block in enumerate(_from_txt(text))]
    prompts = [p for p in prompts if p.text.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts found (a .txt needs one prompt per line, a .jsonl or .csv a 'text' "
                         "field)")
    return prompts
