"""The one experiment protocol: an `Experiment` says what it measures; `run` does everything else.

An experiment (one small class per file, kvpress-style) supplies

- its settings (dataclass fields: every one that changes a number goes into the resume fingerprint),
- `prepare(loaded)`: the run's `Context`: the work units (prompt x condition, text windows, interventions,
  trials, ...) and whatever else it derives from the settings and the model (prefixes, probes, ...),
- `batches(units)`: how units are grouped into one forward pass (default: one unit each),
- `open(ctx)`: the capture engine and probes (default: an engine with `probes(ctx)`),
- `measure(ctx, engine, units)`: tidy rows for one batch of units, as ``{table name: DataFrame}``,
- `summarise(ctx, tables)`: the headline numbers, from the tables (every batch's, read back from disk after a
  resume) and the context.

Run state lives in the context, never on the experiment: an experiment is its settings, and running it does
not write to it, so one experiment object can run twice (or on two models) and means the same each time. A
resumed run rebuilds the context from the settings and the model (`prepare`, and `begin` where a summary
needs what it measures), so a summary reads nothing a killed process held.

`run` loads the model, builds units and batches, writes each finished batch to ``--out DIR/parts/``
(atomically; a batch counts as done only once its marker exists), resumes exactly where a killed run
stopped, can take every ``world``-th batch for one of several processes, gathers the tables in batch
order, adds provenance to the summary and saves tables, ``summary.json`` and figures. Every command returns
a `Result`: ``.to_frame()``, ``.summary`` (with ``provenance``), ``.figures()``, ``.save(dir)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import pkgutil
import platform
import sys
import time
import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, cast

import pandas as pd
import torch

from ..capture import CaptureEngine, Probe
from ..conditions import parse_condition
from ..errors import InputError, SinkscopeError
from ..faults import stall_at
from ..models.loader import LoadedModel, load
from ..rundir import SUMMARY_FILE, RunDir, write_json, write_table
from ..version import __version__
from . import distributed
from .distributed import Shard
from .settings import Command
from .whereabouts import TABLE as WHEREABOUTS
from .whereabouts import WhereaboutsRider, measures_prompts, whereabouts_rows, whereabouts_summary

CSV_MAX_ROWS = 20_000  # tables up to this size are also written as CSV
RESULT_TYPES: dict[str, type[Result]] = {}  # experiment name -> its result class (for Result.load)
EXPERIMENTS: dict[str, type[Experiment]] = {}  # experiment name -> its class, as each module defines it


def takes_conditions(function: Callable[..., Any]) -> Callable[..., Any]:
    """Lets a public experiment function take ``conditions=`` (`sinkscope.conditions` syntax: one string or
    several) as the name of its ``bos=`` argument."""

    @functools.wraps(function)
    def wrapper(*args: Any, conditions: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        if conditions is not None:
            if "bos" in kwargs:
                raise InputError("give conditions= or bos=, not both")
            single = inspect.signature(function).parameters["bos"].default
            kwargs["bos"] = conditions if isinstance(conditions, str) or not isinstance(single, str) else (
                _one(conditions))
        return function(*args, **kwargs)

    return wrapper


def _one(conditions: Sequence[str]) -> str:
    if len(conditions) != 1:
        raise InputError(f"this experiment runs one condition at a time, not {len(conditions)}; call it once each")
    return str(conditions[0])


def versions() -> dict[str, str]:
    import transformers

    return {"sinkscope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def provenance(loaded: LoadedModel, command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The run's provenance, stored in every summary.json."""
    return {"model": loaded.info.to_dict(), "versions": versions(), "command": command or " ".join(sys.argv),
            **extra}


class Result:
    """Tidy tables + a summary (``summary["provenance"]``: where the numbers came from). ``experiment``: the
    name of the experiment that makes it, set when that experiment's class is defined."""

    experiment: ClassVar[str] = ""

    def __init__(self, tables: dict[str, pd.DataFrame], summary: dict[str, Any]) -> None:
        self.tables = tables
        self.summary = summary
        self.run_status = "loaded"  # `run` sets measured | resumed | reused

    @property
    def provenance(self) -> dict[str, Any]:
        return self.summary.get("provenance", {})

    def to_frame(self, name: str | None = None) -> pd.DataFrame:
        """The main table (the first one) or the one named."""
        key = name or next(iter(self.tables))
        return self.tables[key].copy()

    def figures(self) -> dict[str, Any]:
        """{file stem: matplotlib figure} — drawn by `sinkscope.report.figures`, where every plot lives."""
        from ..report.figures import figures_for

        return figures_for(self)

    def save(self, out: str | Path) -> Path:
        from ..report.figures import save_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in self.tables.items():
            write_table(out / f"{name}.parquet", frame)
            if len(frame) <= CSV_MAX_ROWS:
                write_table(out / f"{name}.csv", frame)
        write_json(out / SUMMARY_FILE, {"experiment": self.experiment, **self.summary})
        for stem, figure in self.figures().items():
            save_figure(figure, out / f"{stem}.png")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Result:
        """A saved result (of this class, or of whatever experiment the directory holds)."""
        directory = Path(directory)
        summary_path = directory / SUMMARY_FILE
        if not summary_path.is_file():
            raise InputError(f"{directory} holds no finished run (no summary.json)")
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{summary_path}: not a valid summary ({error})") from None
        name = summary.pop("experiment", cls.experiment)
        if name and name not in RESULT_TYPES:  # its module not imported yet: each registers its result type
            import_all()
        kind = RESULT_TYPES.get(name, cls) if cls.experiment in ("", name) else cls
        if cls.experiment and name != cls.experiment:
            raise InputError(f"{directory} holds a {name or 'different'} run, not a {cls.experiment} run")
        tables = {p.stem: pd.read_parquet(p) for p in sorted(directory.glob("*.parquet"))}
        order = summary.get("provenance", {}).get("tables")
        if order:
            tables = {t: tables[t] for t in order if t in tables}
        return kind(tables, summary)


def import_all() -> dict[str, type[Experiment]]:
    """Every experiment, its module imported (each registers itself in `EXPERIMENTS` when defined)."""
    for module in pkgutil.iter_modules(sys.modules[__package__].__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    return EXPERIMENTS


ResultT = TypeVar("ResultT", bound=Result)


@dataclasses.dataclass
class Context:
    """One run's state, made by `Experiment.prepare` and handed to every later step: the model, the units, and
    (in an experiment's own subclass, as typed fields) what it derives from its settings and the model or
    measures once for every batch (`begin`). A resumed run makes it again."""

    loaded: LoadedModel
    units: list[Any]

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


@dataclasses.dataclass
class Experiment(Generic[ResultT]):
    """Base of every experiment. Subclasses are dataclasses whose fields are their settings, named by their
    result type: ``class Ruler(Experiment[RulerResult])`` makes `run` return a ``RulerResult``, and
    ``Result.load`` find that type for a saved ``ruler`` run."""

    name: ClassVar[str] = ""
    result_type: ClassVar[type[Result]] = Result
    unit_label: ClassVar[str] = "units"  # what the progress bar counts
    # prompt units get a `whereabouts` table (one more forward per batch); off where that forward is the cost
    records_whereabouts: ClassVar[bool] = True
    # ... read on the experiment's own forward when it makes exactly one over the units' ids and its probes leave
    # the attention output alone (`WhereaboutsRider`; otherwise the extra forward is made anyway)
    whereabouts_rides: ClassVar[bool] = False
    # `begin` computes what `summarise` reads too (e.g. a baseline), so a run resumed with nothing left to
    # measure still calls it
    summary_needs_begin: ClassVar[bool] = False
    # its command-line command, built by the CLI from this and the declared settings (None: none, or its own)
    command: ClassVar[Command | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):  # Experiment[R], PromptExperiment[R], ...
            found = [a for a in typing.get_args(base) if isinstance(a, type) and issubclass(a, Result)]
            if found:
                cls.result_type = found[0]
        if cls.name and "name" in cls.__dict__:
            EXPERIMENTS[cls.name] = cls
            if cls.result_type is not Result:
                cls.result_type.experiment = cls.name
                RESULT_TYPES[cls.name] = cls.result_type

    # -- what a subclass supplies ---------------------------------------------------------------------
    def prepare(self, loaded: LoadedModel) -> Context:
        """The run's context: the work units, in a fixed order (validating the settings against the model), and
        what the later steps need from the settings and the model."""
        raise NotImplementedError

    def batches(self, units: Sequence[Any]) -> list[list[int]]:
        """Indices of the units run together (default: one at a time)."""
        return [[i] for i in range(len(units))]

    def probes(self, ctx: Any) -> list[Probe]:
        return []

    def open(self, ctx: Any) -> AbstractContextManager[Any]:
        """What the units are measured in: by default a capture engine with `probes(ctx)`."""
        return CaptureEngine(ctx.loaded, self.probes(ctx), **self.engine_options())

    def engine_options(self) -> dict[str, Any]:
        return {}

    def begin(self, ctx: Any, engine: Any) -> None:
        """Called once before the first batch (e.g. a baseline every unit is compared with, kept on ``ctx``);
        also when nothing is left to measure, if `summary_needs_begin`."""

    def measure(self, ctx: Any, engine: Any, units: Sequence[Any]) -> dict[str, pd.DataFrame]:
        raise NotImplementedError

    def summarise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        return {}

    def finalise(self, ctx: Any, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Tables after gathering every batch (e.g. sorted, or with derived columns)."""
        return tables

    def kept(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The tables the result keeps, after `summarise` has read them all (e.g. per-token losses a summary
        needs but a setting leaves out of the saved result)."""
        return tables

    # -- what the base does with them -----------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Every setting, JSON-ready: the fingerprint a resumed run must match."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def units_digest(self, ctx: Any) -> str:
        """A hash of the inputs themselves (token ids, texts), so a resumed run measures the same things."""
        return digest(ctx.units)

    def describe(self, units: Sequence[Any]) -> str:
        """Progress-bar text for a batch."""
        return ""

    # -- conditions -----------------------------------------------------------------------------------
    def condition_names(self) -> list[str]:
        """Every condition this experiment runs (`sinkscope.conditions` syntax; default: its ``bos`` setting)."""
        bos = getattr(self, "bos", None)
        if bos is None:
            return []
        return [bos] if isinstance(bos, str) else [str(b) for b in bos]

    def condition_of(self, units: Sequence[Any]) -> str | None:
        """The condition a batch runs under — its intervention is applied to every forward of `measure` —
        from the units' ``bos`` (or ``condition``), else the experiment's single ``bos``. A batch never mixes
        conditions; an experiment that runs several inside one batch sets `engine.intervening` itself."""
        names = {getattr(u, "bos", None) or getattr(u, "condition", None) for u in units} - {None}
        if len(names) > 1:
            raise SinkscopeError(f"{self.name}: a batch mixes the conditions {sorted(names)}")
        if names:
            return str(next(iter(names)))
        bos = getattr(self, "bos", None)
        return bos if isinstance(bos, str) else None


def digest(units: Sequence[Any]) -> str:
    """sha256 of units (dataclasses, ids, texts) as JSON."""
    return hashlib.sha256(json.dumps([_jsonable(u) for u in units], default=str).encode()).hexdigest()


def _jsonable(unit: Any) -> Any:
    if dataclasses.is_dataclass(unit) and not isinstance(unit, type):
        return dataclasses.asdict(unit)
    return unit


def fingerprint(experiment: Experiment, ctx: Context) -> dict[str, Any]:
    """Everything that changes a number: experiment, settings, the model (and its file's hash), its dtype and
    device, the inputs, and the versions of what computes them."""
    info = ctx.loaded.info
    return {
        "experiment": experiment.name, "settings": experiment.settings(), "model": info.name,
        "revision": info.revision, "dtype": info.dtype, "device": info.device, "n_units": len(ctx.units),
        "units_sha256": experiment.units_digest(ctx),
        "versions": {k: v for k, v in versions().items() if k != "python"},
    }


def run(
    experiment: Experiment[ResultT],
    model: LoadedModel | Any,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | Any = True,
    command: str | None = None,
    shard: Shard | None = None,
    save: bool = True,
    reuse: bool = False,
    replace_stale: bool = False,
) -> ResultT:
    """Run an experiment on a model: measure every batch (resuming from ``out``), summarise, save.

    ``reuse`` (with ``resume``): a finished run of the same fingerprint in ``out`` is loaded, not measured again;
    ``replace_stale``: a run in ``out`` with another fingerprint is deleted instead of refused. The result's
    ``run_status`` says which happened: measured | resumed | reused.

    ``progress``: True/False, or a rich ``Progress`` shared with other runs (one display over a plan).
    ``shard``: this process's share of a multi-process run (`distributed.from_environment()` under torchrun /
    accelerate launch); every process then returns the whole result. Default: one process, even inside a
    launched program (e.g. the lab's tracking scan, which only the first training process runs).
    """
    loaded = load(model)
    for condition in experiment.condition_names():  # layers/heads an intervention names must exist
        parse_condition(condition).check(loaded.info.n_layers, loaded.info.n_heads)
    ctx = experiment.prepare(loaded)
    units = ctx.units
    if not units:
        raise InputError(f"{experiment.name}: nothing to measure")
    batches = experiment.batches(units)
    shard = shard or Shard()  # one process unless asked: the CLI passes the launcher's shard
    distributed.join(shard)
    rundir = RunDir(out) if out is not None else None
    finished: set[int] = set()
    status = "measured"
    if rundir is not None:
        # the first process starts (or checks) the run directory; the others then join it as a resume
        state = distributed.on_main(shard, lambda: rundir.start(fingerprint(experiment, ctx), resume, replace_stale))
        if not shard.main:
            state = rundir.start(fingerprint(experiment, ctx), True)
        if reuse and state == "finished":
            reused = Result.load(rundir.path)
            reused.run_status = "reused"
            return cast(ResultT, reused)
        status = "resumed" if state in ("resumed", "finished") else status
        finished = rundir.finished_batches() if resume else set()
    mine = [b for b in range(len(batches)) if shard.owns(b)]
    todo = [b for b in mine if b not in finished]
    started = time.time()
    with experiment.open(ctx) as engine, _progress(progress if shard.main else False) as bar:
        measured = _measure(experiment, ctx, engine, batches, todo, rundir, bar,
                            total=sum(len(batches[b]) for b in mine))
    kernels = distributed.kernels_used(shard, sorted(getattr(engine, "kernels_used", ()) or ()))
    if rundir is not None:  # this process's resumed batches, so every process can send all of its own
        measured.update({b: rundir.read_batch(b) for b in mine if b not in measured})
    measured = distributed.exchange(shard, measured)
    tables = _gather(batches, measured, rundir)
    where = tables.pop(WHEREABOUTS, None)
    single = getattr(experiment, "bos", None)
    tables = with_condition_column(experiment.finalise(ctx, tables), single if isinstance(single, str) else None)
    summary = experiment.summarise(ctx, tables)
    tables = experiment.kept(tables)
    if where is not None:
        tables[WHEREABOUTS] = where
        summary["whereabouts"] = whereabouts_summary(where)
    summary["provenance"] = provenance(loaded, command, experiment=experiment.name, settings=experiment.settings(),
                                       tables=list(tables), kernels=kernels,
                                       seconds=round(time.time() - started, 3),
                                       **({"processes": shard.world} if shard.world > 1 else {}))
    result = cast(ResultT, experiment.result_type(tables, summary))
    result.run_status = status
    if out is not None and save and shard.main:
        result.save(out)
    distributed.barrier(shard)
    return result


def _measure(experiment: Experiment, ctx: Context, engine: Any, batches: Sequence[Sequence[int]],
             todo: Sequence[int], rundir: RunDir | None, bar: Any, total: int) -> dict[int, dict[str, pd.DataFrame]]:
    """Measure the batches ``todo``, writing each to the run directory as soon as it is done."""
    units = ctx.units
    measured: dict[int, dict[str, pd.DataFrame]] = {}
    task = bar.add_task(experiment.name, total=total, completed=total - sum(len(batches[b]) for b in todo))
    if todo or experiment.summary_needs_begin:
        experiment.begin(ctx, engine)
    written = 0
    stall_for_tests(rundir, written)
    for b in todo:
        chosen = [units[i] for i in batches[b]]
        bar.update(task, description=f"{experiment.name} {experiment.describe(chosen)}".rstrip())
        began = time.perf_counter()
        try:
            with _under(engine, experiment.condition_of(chosen), experiment.name):
                where = (experiment.records_whereabouts and isinstance(engine, CaptureEngine)
                         and measures_prompts(chosen))
                rider = WhereaboutsRider(chosen) if where and experiment.whereabouts_rides else None
                with engine.probing([*engine.probes, rider]) if rider is not None else nullcontext():
                    tables = experiment.measure(ctx, engine, chosen)
                if where:
                    rows = rider.rows(len(engine.attention_layers)) if rider is not None else None
                    tables[WHEREABOUTS] = rows if rows is not None else whereabouts_rows(engine, chosen)
        except torch.OutOfMemoryError as error:
            raise SinkscopeError(f"{experiment.name}: out of memory on a batch of {len(chosen)} "
                                 f"{experiment.unit_label}; use smaller batches or shorter inputs "
                                 "(finished batches are saved under --out)") from error
        if rundir is not None:
            rundir.write_batch(b, tables, round(time.perf_counter() - began, 3))
            written += 1
            stall_for_tests(rundir, written)
        measured[b] = tables
        bar.advance(task, len(chosen))
    return measured


def _under(engine: Any, condition: str | None, experiment: str) -> AbstractContextManager[Any]:
    """The engine's `intervening` context for a condition; an intervention where the experiment does not run
    through the capture engine is refused (it would silently not happen)."""
    if condition is None or parse_condition(condition).intervention is None:
        return nullcontext()
    if not isinstance(engine, CaptureEngine):
        raise InputError(f"{experiment} does not run through the capture engine, so it cannot apply the "
                         f"intervention of '{condition}'; give a condition without one (e.g. add, strip)")
    return engine.intervening(condition)


def with_condition_column(tables: dict[str, pd.DataFrame], single: str | None) -> dict[str, pd.DataFrame]:
    """Every table gets a ``condition`` column (`sinkscope.conditions` syntax): its ``bos`` column where it has
    one, else the run's single condition ``single``; a table that names its rows' conditions keeps them."""
    out = {}
    for name, frame in tables.items():
        if "condition" not in frame and ("bos" in frame or single is not None):
            frame = frame.assign(condition=frame["bos"] if "bos" in frame else single)
        out[name] = frame
    return out


def stall_for_tests(rundir: RunDir | None, written: int) -> None:
    """`faults.stall_at` ``batches N`` once a run writing to ``--out`` has written N batch markers."""
    if rundir is not None:
        stall_at(f"batches {written}")


def _gather(batches: Sequence[Sequence[int]], measured: dict[int, dict[str, pd.DataFrame]],
            rundir: RunDir | None) -> dict[str, pd.DataFrame]:
    """Every batch's tables, concatenated in batch order (read back from disk for resumed batches)."""
    pieces: dict[str, list[pd.DataFrame]] = {}
    for b in range(len(batches)):
        tables = measured.get(b)
        if tables is None:
            if rundir is None:
                raise SinkscopeError(f"batch {b} was neither measured nor saved")
            tables = rundir.read_batch(b)
        for name, frame in tables.items():
            pieces.setdefault(name, []).append(frame)
    return {name: pd.concat(frames, ignore_index=True) for name, frames in pieces.items()}


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Shared:
    """A progress display owned by someone else: entering and leaving it does nothing."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __enter__(self) -> Any:
        return self.bar

    def __exit__(self, *exc: Any) -> None:
        return None


def progress_bar(title: str, enabled: bool) -> Any:
    """A rich progress bar with the columns sinkscope uses everywhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{title}[/] " + "{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def _progress(progress: bool | Any) -> Any:
    if progress is True:
        return progress_bar("", True)
    if progress is False or progress is None:
        return _NoProgress()
    return _Shared(progress)
