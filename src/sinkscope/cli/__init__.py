"""The `sinkscope` command line: parse, call an experiment, print a table.

`app` is the typer application; each module in this package registers its commands on it.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import InputError, SinkscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Measure, explain and exploit attention sinks in transformer language models.")
# --help groups the commands in these panels, in this order, each panel's commands by name (see the end)
MEASURE, EXPLAIN, CONSEQUENCES, LAB, REPORT = "Measure", "Explain", "Consequences", "Lab", "Report"
PANEL_ORDER = (MEASURE, EXPLAIN, CONSEQUENCES, LAB, REPORT)
PANEL_TITLES = {"measure": MEASURE, "explain": EXPLAIN, "consequences": CONSEQUENCES}  # experiments.settings.PANELS
# In a multi-process run (torchrun / accelerate launch) only the first process prints; errors show from all.
console = Console(quiet=os.environ.get("RANK", "0").strip() not in ("", "0"))
errors = Console(stderr=True)

def user_errors(command: Any) -> Any:
    """Turn sinkscope's own errors into one line on stderr and exit code 2 (bugs keep their traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SinkscopeError as error:
            errors.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted: finished work is saved under --out; rerun with --resume to continue")
            raise typer.Exit(130) from None

    return wrapper


def load_model(model: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """Load with a spinner and print what was loaded."""
    from ..experiments.distributed import local_device
    from ..models import load

    device = local_device(device)
    with console.status(f"loading {model} ..."):
        loaded = load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    console.print(f"[bold]{loaded!r}[/]", highlight=False)
    return loaded


def command_line() -> str:
    """The command as typed, for provenance."""
    return " ".join(["sinkscope"] + sys.argv[1:])


def check_out(out: Path | None) -> None:
    """An --out that is a file, or that cannot be created, fails before any work starts."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {out}: cannot create it ({error.strerror}); pick a writable directory") from None
    probe = out / ".sinkscope-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"--out {out}: not writable ({error.strerror}); pick a writable directory") from None


def run_command(experiment: Any, model: str, run: Any, *, loaded: Any = None,
                show: dict[str, Any] | None = None) -> Any:
    """What every experiment command does: check --out, load the model, run the experiment on the shared
    protocol (saving to --out as it goes), print its table and where the files are. ``run``: the command's
    `settings.RunOptions`; ``show``: display options for the experiment's terminal table."""
    from ..experiments.base import run as run_experiment
    from ..experiments.distributed import from_environment
    from ..report.tables import table_for

    if run.resume and run.out is None:
        raise InputError("--resume needs --out (the run directory to continue)")
    check_out(run.out)
    loaded = loaded or load_model(model, run.device, run.dtype, run.trust_remote_code)
    result = run_experiment(experiment, loaded, out=run.out, resume=run.resume, progress=not run.quiet,
                            command=command_line(), shard=from_environment())
    for table in table_for(result, **(show or {})):
        console.print(table)
    if run.out is not None:
        console.print(f"results written to {run.out}/", highlight=False, soft_wrap=True)
    return result


def run_each_condition(make: Any, conditions: list[str] | None, default: str, model: str, run: Any, *,
                       show: dict[str, Any] | None = None) -> list[Any]:
    """`run_command` once per condition (``make(condition)`` builds the experiment) for commands whose
    experiment takes one condition: the model is loaded once; with several conditions each run goes to its
    own sub-directory of --out, named after the condition."""
    from dataclasses import replace

    from ..experiments.inputs import bos_conditions
    from ..rundir import child, safe_name

    chosen = bos_conditions(conditions or [default])
    experiments = [make(condition) for condition in chosen]  # settings are checked before the model loads
    check_out(run.out)
    loaded = load_model(model, run.device, run.dtype, run.trust_remote_code)
    results = []
    for condition, experiment in zip(chosen, experiments, strict=True):
        target = run.out if run.out is None or len(chosen) == 1 else child(run.out, "bos-" + safe_name(condition))
        if len(chosen) > 1:
            console.print(f"[bold]condition {condition}[/]", highlight=False)
        results.append(run_command(experiment, model, replace(run, out=target), loaded=loaded, show=show))
    return results


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="print the version")] = False) -> None:
    if version:
        from ..version import __version__

        console.print(f"sinkscope {__version__}")
        raise typer.Exit()


def _register_commands() -> None:
    """Every command: the command modules of this package register theirs when imported; every experiment that
    declares a command gets one built (`commands`). Then --help's order: typer shows a panel where its first
    registered command is, so the commands are sorted by panel, then by name."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    from .commands import register_experiment_commands

    register_experiment_commands()
    app.registered_commands.sort(key=lambda c: (PANEL_ORDER.index(c.rich_help_panel or REPORT),
                                                c.name or c.callback.__name__.replace("_", "-")))


_register_commands()


def main() -> None:
    app()
