"""Run directories: atomic writes, a fingerprint for --resume, results written batch by batch, and file
names from user input (model ids, prompt ids, conditions like ``replace:<tok>``) that stay inside ``--out``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import InputError

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"  # written last by a finished run (`experiments.base.Result.save`)
PARTS_DIR = "parts"
NAME_MAX = 96  # characters of a name from safe_name; file systems allow 255 bytes per component
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """One portable file-name component from user text, e.g. ``replace:eos`` -> ``replace_eos-653adb4b8c``.

    Keeps ASCII letters, digits, ``.``, ``_`` and ``-``; runs of anything else (``/``, ``:``, NUL, spaces,
    non-ASCII) become ``_``; no leading ``.`` or ``-`` (no ``..``, no hidden files, no option look-alikes).
    When that changed the text, or the name is longer than `NAME_MAX`, a short hash of the original text
    is appended, so different inputs (``replace:\\n`` and ``replace:n``) never share a name.
    """
    name = _UNSAFE.sub("_", str(text)).lstrip(".-")
    if name and name == text and len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name[: NAME_MAX - 11]}-{digest}" if name else f"_-{digest}"


def child(out: str | os.PathLike[str], *parts: str) -> Path:
    """``out / part / ...``, refused with `InputError` unless the result lies strictly inside ``out``.

    Guards names built from user input: ``..``, absolute parts, NUL bytes, over-long components and
    symlinks already in ``out`` that point elsewhere are all refused. Pass names through `safe_name`
    first to turn hostile text into a harmless name instead of an error.
    """
    if not parts:
        raise InputError("a file inside the run directory needs a name")
    for part in parts:
        text = os.fspath(part)
        if "\0" in text:
            raise InputError(f"output name {text!r} contains a NUL byte")
        if not text or Path(text).is_absolute():
            raise InputError(f"output name {text!r} must be a relative path inside --out")
        if any(len(os.fsencode(piece)) > 255 for piece in Path(text).parts):
            raise InputError(f"output name {text[:40]!r}... is longer than a file system allows")
    root = Path(out)
    resolved_root = root.resolve()
    resolved = root.joinpath(*parts).resolve()  # follows '..' and the symlinks that already exist
    if resolved == resolved_root or resolved_root not in resolved.parents:
        raise InputError(f"output name {os.path.join(*parts)!r} would leave the run directory {root}")
    return root / resolved.relative_to(resolved_root)


class _Writing:
    """Where a file is written: a temporary file beside it, renamed over it when complete. A file system
    that is full, read-only or gone becomes one `InputError` naming the file; what was already written
    (finished batches, earlier files) stays as it is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temp: str | None = None

    def __enter__(self) -> str:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, self.temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            os.close(handle)
        except OSError as error:
            raise _write_error(self.path, error) from None
        return self.temp

    def __exit__(self, kind: Any, error: Any, _trace: Any) -> None:
        assert self.temp is not None
        if kind is None:
            try:
                os.replace(self.temp, self.path)
                return
            except OSError as failure:
                error = failure
        Path(self.temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(self.path, error) from None


def _write_error(path: Path, error: OSError) -> InputError:
    reason = error.strerror or str(error)
    return InputError(f"cannot write {path}: {reason}; free some space or pick another --out "
                      "(results already written are kept; rerun with --resume)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _Writing(path) as temp, open(temp, "wb") as stream:
        stream.write(data)


def write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n").encode())


def write_table(path: Path, frame: pd.DataFrame) -> None:
    """Parquet (or CSV, by suffix), written to a temporary file and renamed."""
    with _Writing(path) as temp:
        if path.suffix == ".csv":
            frame.to_csv(temp, index=False)
        else:
            frame.to_parquet(temp, index=False)


def atomic_path(path: Path) -> _Writing:
    """``with atomic_path(path) as temp:`` write ``temp`` (any writer); it replaces ``path`` on success."""
    return _Writing(path)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


class RunDir:
    """``--out DIR``: ``run.json`` (what is being computed), ``parts/`` (one table per finished batch)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def start(self, fingerprint: dict[str, Any], resume: bool, replace_stale: bool = False) -> str:
        """Start the run ``fingerprint`` describes here, or (``resume``) continue the same one. Returns "new",
        "resumed" (the same run, continued) or "finished" (the same run, already summarised). A run here with
        another fingerprint is refused, or with ``replace_stale`` deleted and started anew."""
        fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as run.json holds it
        run_file = self.path / RUN_FILE
        if run_file.exists():
            changed = _differences(json.loads(run_file.read_text()), fingerprint)
            if changed and replace_stale:  # measured with other settings, another model file or other versions
                shutil.rmtree(self.path)
            elif not resume:
                raise InputError(f"{self.path} already holds a run; pass --resume to continue it or pick another --out")
            elif changed:
                raise InputError(f"cannot resume {self.path}: the run was started with different {', '.join(changed)}")
            else:
                return "finished" if (self.path / SUMMARY_FILE).is_file() else "resumed"
        elif self.path.exists() and any(self.path.iterdir()) and not resume:
            raise InputError(f"{self.path} exists and is not empty; pick another --out")
        write_json(run_file, fingerprint)
        return "new"

    # -- batches of an experiment run: parts/batch-NNNNNN/<table>.parquet, then parts/batch-NNNNNN.done ---------
    def _batch_dir(self, index: int) -> Path:
        return self.path / PARTS_DIR / f"batch-{index:06d}"

    def write_batch(self, index: int, tables: dict[str, pd.DataFrame], seconds: float | None = None) -> None:
        """Write one batch's tables; the marker written last (the table names and the seconds measuring took)
        makes the batch count as done (a kill before it leaves a batch that is simply measured again)."""
        directory = self._batch_dir(index)
        for name, frame in tables.items():
            write_table(directory / f"{name}.parquet", frame)
        write_json(directory.with_suffix(".done"), {"tables": sorted(tables), "seconds": seconds})

    def finished_batches(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in (self.path / PARTS_DIR).glob("batch-*.done")}

    def _marker(self, index: int) -> dict[str, Any]:
        marker = json.loads(self._batch_dir(index).with_suffix(".done").read_text())
        return marker if isinstance(marker, dict) else {"tables": marker, "seconds": None}  # older runs: names

    def read_batch(self, index: int) -> dict[str, pd.DataFrame]:
        directory = self._batch_dir(index)
        return {name: pd.read_parquet(directory / f"{name}.parquet") for name in self._marker(index)["tables"]}

    def batch_seconds(self) -> dict[int, float | None]:
        """Seconds each finished batch took to measure, across every resume (None where not recorded)."""
        return {index: self._marker(index)["seconds"] for index in sorted(self.finished_batches())}

    def write_part(self, index: int, frame: pd.DataFrame) -> None:
        write_table(self.path / PARTS_DIR / f"part-{index:06d}.parquet", frame)

    def read_parts(self) -> pd.DataFrame | None:
        parts = sorted((self.path / PARTS_DIR).glob("part-*.parquet"))
        if not parts:
            return None
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
