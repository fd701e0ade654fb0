"""Lab configuration: one training run (`TrainConfig`) and a sweep of runs (`SweepConfig`).

Files are TOML, YAML or JSON with the same shape as `TrainConfig` (nested tables for ``data``, ``model``,
``packing``, ``optimizer`` and ``tracking``). A sweep file has a ``base`` table and ``grids``: each grid maps
dotted keys to lists of values, and contributes the product of its axes as runs::

    name = "context"
    [base]
    steps = 600
    [base.model]
    layers = 2
    [[grids]]
    context_length = [32, 64, 128, 256]

A name that is not a file is looked up among the presets (`presets.py`).
"""

from __future__ import annotations

import copy
import itertools
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import SinkscopeError
from .data import Packing, inference_condition
from .models import ModelSpec


class LabConfigError(SinkscopeError):
    """A lab config that cannot be read or does not make sense."""


@dataclass
class DataSpec:
    kind: str = "bigram_backcopy"  # or "text"
    # bigram-backcopy
    vocab: int = 64
    triggers: int = 3
    doc_min: int = 16
    doc_max: int = 256
    concentration: float = 0.3
    world_seed: int = 0
    # natural text
    paths: list[str] = field(default_factory=lambda: ["shakespeare"])
    dataset: str | None = None
    tokenizer: str = "train:512"


@dataclass
class OptimizerSpec:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass
class TrackingSpec:
    every: int = 50  # evaluate the sink metric and validation loss every N steps (and at the last step)
    probe_count: int = 32  # fixed probe documents
    probe_length: int = 64  # text tokens per probe (capped at context length - 1)
    eps: list[float] = field(default_factory=lambda: [0.3, 0.8])
    inference: list[str] = field(default_factory=lambda: ["bos+text", "text"])
    validation_windows: int = 16
    checkpoint_every: int = 200


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    context_length: int = 64
    tokens_per_step: int = 4096  # constant across a context-length sweep: rows = tokens_per_step / context
    steps: int = 600
    micro_batch_rows: int | None = None  # rows per forward/backward (gradient accumulation); None = all at once
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    packing: Packing = field(default_factory=Packing)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def __post_init__(self) -> None:
        if self.context_length < 4:
            raise LabConfigError("context_length must be at least 4")
        if self.tokens_per_step % self.context_length:
            raise LabConfigError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of "
                                 f"context_length ({self.context_length})")
        if self.steps < 1:
            raise LabConfigError("steps must be >= 1")
        if self.micro_batch_rows is not None and self.micro_batch_rows < 1:
            raise LabConfigError("micro_batch_rows must be >= 1 (or unset)")
        if self.data.kind not in ("bigram_backcopy", "text"):
            raise LabConfigError(f"data.kind must be 'bigram_backcopy' or 'text', not {self.data.kind!r}")
        for mode in self.tracking.inference:  # bos+text, text, or an add/strip condition
            inference_condition(mode)

    @property
    def batch_rows(self) -> int:
        return self.tokens_per_step // self.context_length

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_NESTED = {"data": DataSpec, "model": ModelSpec, "packing": Packing, "optimizer": OptimizerSpec,
           "tracking": TrackingSpec}


def _check_type(name: str, value: Any, hint: Any, where: str) -> None:
    """Settings come from files and --set: say which one has the wrong type, in the user's terms."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if base in (str, bool, list, dict) and isinstance(value, base):
            return
        if base not in (float, int, str, bool, list, dict, type(None)):
            return  # nested settings are checked by their own class
    wanted = " or ".join("none" if o is type(None) else getattr(typing.get_origin(o) or o, "__name__", str(o))
                         for o in options)
    raise LabConfigError(f"{where}: '{name}' must be {wanted}, not {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LabConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(name, value, hints[name], where)
    try:
        return cls(**values)
    except (TypeError, ValueError, SinkscopeError) as error:
        raise LabConfigError(f"{where}: {error}") from error


def train_config(values: dict[str, Any]) -> TrainConfig:
    values = copy.deepcopy(values)
    for key, cls in _NESTED.items():
        if key in values:
            if not isinstance(values[key], dict):
                raise LabConfigError(f"'{key}' must be a table of settings")
            values[key] = _build(cls, values[key], key)
    return _build(TrainConfig, values, "config")


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(values)
    for key, value in overrides.items():
        _set_dotted(out, key, value)
    return out


def _short(key: str, value: Any) -> str:
    return f"{key.split('.')[-1]}={value}"


@dataclass
class SweepRun:
    name: str
    group: str
    overrides: dict[str, Any]
    config: TrainConfig
    directory: str = ""  # where the run lives: its own name, or that of an identical earlier run

    def __post_init__(self) -> None:
        self.directory = self.directory or self.name


@dataclass
class SweepConfig:
    name: str
    base: dict[str, Any]
    grids: list[dict[str, list[Any]]]
    description: str = ""

    def runs(self) -> list[SweepRun]:
        out: list[SweepRun] = []
        seen: set[str] = set()
        trained: dict[str, str] = {}  # config (without its name) -> directory of the run that trains it
        for index, grid in enumerate(self.grids):
            grid = dict(grid)
            group = str(grid.pop("group", f"grid{index}"))
            for key, options in grid.items():
                if not isinstance(options, list) or not options:
                    raise LabConfigError(f"grid '{group}': '{key}' must be a non-empty list of values")
            for combo in itertools.product(*grid.values()):
                overrides = dict(zip(grid.keys(), combo, strict=True))
                name = "-".join(_short(k, v) for k, v in overrides.items()).replace("/", "_") or "base"
                name = f"{group}.{name}"
                if name in seen:
                    continue
                seen.add(name)
                values = apply_overrides(self.base, overrides)
                values["name"] = name
                config = train_config(values)
                # a run identical to an earlier one (e.g. the packing grid's default cell and the context
                # sweep's default length) is trained once and shown in both groups
                key = json.dumps({**config.as_dict(), "name": None}, sort_keys=True, default=str)
                out.append(SweepRun(name, group, overrides, config, trained.setdefault(key, name)))
        if not out:
            out.append(SweepRun("base", "base", {}, train_config({**self.base, "name": "base"})))
        return out


def read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if path.suffix == ".json":
            return json.loads(text)
    except Exception as error:  # each parser has its own error type
        raise LabConfigError(f"{path}: cannot parse: {str(error).splitlines()[0][:200]}") from error
    raise LabConfigError(f"{path}: config files are .toml, .yaml or .json")


def load_train_config(source: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    from .presets import TRAIN_PRESETS

    path = Path(source).expanduser()
    if path.is_file():
        values = read_mapping(path)
        values.setdefault("name", path.stem)
    elif source in TRAIN_PRESETS:
        values = copy.deepcopy(TRAIN_PRESETS[source])
    else:
        raise LabConfigError(f"no config file {source!r} and no such preset (presets: {', '.join(TRAIN_PRESETS)})")
    return train_config(apply_overrides(values, overrides or {}))


def load_sweep_config(source: str) -> SweepConfig:
    from .presets import SWEEP_PRESETS

    path = Path(source).expanduser()
    if path.is_file():
        values = read_mapping(path)
        name = str(values.get("name", path.stem))
    elif source in SWEEP_PRESETS:
        values = copy.deepcopy(SWEEP_PRESETS[source])
        name = source
    else:
        raise LabConfigError(f"no sweep file {source!r} and no such preset (presets: {', '.join(SWEEP_PRESETS)})")
    unknown = sorted(set(values) - {"name", "base", "grids", "description"})
    if unknown:
        raise LabConfigError(f"sweep {source}: unknown setting(s) {unknown}; expected name, base, grids")
    sweep = SweepConfig(name, dict(values.get("base", {})), list(values.get("grids", [])),
                        str(values.get("description", "")))
    sweep.runs()  # validate every run now, not halfway through the sweep
    return sweep

