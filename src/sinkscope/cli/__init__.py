"""The `sinkscope` command line: parse, call an experiment, print a table.

`app` is the typer application; each module in this package registers its commands on it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import SinkscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, explain and exploit attention sinks in transformer language models.")
console = Console()
errors = Console(stderr=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="bundled name, hub id, local dir or .gguf file")]
BosOption = Annotated[list[str] | None, typer.Option(
    help="auto | add | strip | replace:<token>; repeat to compare conditions side by side")]


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
    from ..models import load

    with console.status(f"loading {model} ..."):
        loaded = load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    console.print(f"[bold]{loaded!r}[/]", highlight=False)
    return loaded


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="print the version")] = False) -> None:
    if version:
        from .. import __version__

        console.print(f"sinkscope {__version__}")
        raise typer.Exit()


# Command modules register themselves on `app` when imported.
from . import collapse as _collapse  # noqa: E402,F401
from . import consequences as _consequences  # noqa: E402,F401
from . import explain as _explain  # noqa: E402,F401
from . import lab as _lab  # noqa: E402,F401
from . import perturb as _perturb  # noqa: E402,F401
from . import scan as _scan  # noqa: E402,F401
from . import streaming as _streaming  # noqa: E402,F401


def main() -> None:
    app()
