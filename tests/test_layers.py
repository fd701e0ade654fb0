"""The package's layers, pinned: every import (lazy ones inside functions included) goes to the same layer or
one below it. The order is the pipeline: the attention core, loading models, capturing what attention does,
presenting saved results, experiments, the applications on top (the lab, then the paper report), the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "sinkscope"

LAYERS: list[set[str]] = [
    {"errors", "version", "faults"},
    {"metrics", "data", "conditions", "rundir"},  # pure functions, inputs, condition strings, run directories
    {"attention"},  # the attention function, kernels, masks, variants
    {"models"},
    {"capture"},  # the engine, its probes, interventions, KV caches
    {"report"},  # figures and tables of saved results
    {"experiments"},
    {"lab"},
    {"paper"},
    {"cli"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str | None:
    """The layer unit of a dotted module inside sinkscope ("sinkscope.capture.engine" -> "capture")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sinkscope" else None


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in one file (or in ``source``, as if it were that file), relative
    ones resolved."""
    package = ".".join(("sinkscope", *path.relative_to(PACKAGE).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    out = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: -node.level]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from . import x`
    return out


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())) and p.name != "__init__.py"}
    assert units - set(LAYER) == set(), "a new module or package needs its place in LAYERS"


def upward(path: Path, source: str | None = None) -> list[str]:
    """The imports of one file that run from its layer up to a higher one."""
    mine = _unit(".".join(("sinkscope", *path.relative_to(PACKAGE).with_suffix("").parts)))
    if mine is None or mine == "__init__":  # the package's face re-exports from every layer
        return []
    found = []
    for line, module in _imports(path, source):
        theirs = _unit(module)
        if theirs in LAYER and LAYER[theirs] > LAYER[mine]:
            found.append(f"{path.relative_to(PACKAGE)}:{line} imports {module} ({theirs} is above {mine})")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up_a_layer(path):
    assert not upward(path), "\n".join(upward(path))


def test_an_upward_import_is_caught_lazy_or_relative():
    tables = PACKAGE / "report" / "tables" / "kv.py"
    lazy = "def write_docs():\n    from ...experiments.base import Result\n"
    found = upward(tables, lazy)
    assert found and all(f.startswith("report/tables/kv.py:2 imports sinkscope.experiments.base") for f in found)
    assert all(f.endswith("(experiments is above report)") for f in found)
    assert upward(PACKAGE / "models" / "loader.py", "from ..capture import CaptureEngine\n")
    assert not upward(PACKAGE / "capture" / "engine.py", "from ..models.loader import load\n")  # downward
