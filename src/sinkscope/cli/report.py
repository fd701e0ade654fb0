"""`sinkscope paper`, `report`: the paper re-measured, with a verdict per claim, in one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import InputError
from . import REPORT, app, check_out, command_line, console, user_errors

ModelsOption = Annotated[list[str], typer.Option("--model", "-m", help="bundled name, hub id, local dir or .gguf "
                                                                       "file; repeat for several models")]
FindingsOption = Annotated[Path | None, typer.Option("--findings-md", help="also write the findings table here "
                                                                           "(e.g. docs/generated/findings.md)")]


def _verdict_table(findings: list[Any]) -> Table:
    colours = {"reproduced": "green", "not reproduced": "red", "inconclusive": "yellow"}
    table = Table("section", "model", "measurement", "value [95% CI]", "verdict", title="findings")
    for f in findings:
        colour = colours.get(f.verdict, "white")
        table.add_row(f.section, f.model, f.measurement, f.interval, f"[{colour}]{f.verdict}[/]")
    return table


def _timing_table(seconds: dict[str, float], total: float) -> Table:
    from ..paper.plan import SECTIONS

    titles = {s.key: s.title for s in SECTIONS} | {"load": "model loading"}
    table = Table("section", "seconds", title=f"time per section (total {total:.0f} s)")
    for key, value in seconds.items():
        table.add_row(titles.get(key, key), f"{value:.1f}")
    return table


def _print_report(built: tuple[dict[str, Path], list[Any]]) -> None:
    written, findings = built
    console.print(_verdict_table(findings))
    console.print(f"report: {written['html']}  (also {written['md'].name}, {written['findings'].name})",
                  highlight=False)


@app.command(rich_help_panel=REPORT)
@user_errors
def paper(
    model: ModelsOption = ["gemma3-270m"],  # noqa: B006 (typer reads the default list)
    out: Annotated[Path, typer.Option(help="report directory (each experiment in its own sub-directory)")] = Path(
        "runs/paper"),
    quick: Annotated[bool, typer.Option(help="a small plan (fewer prompts, shorter texts): minutes on a CPU")] = False,
    prompts: Annotated[Path | None, typer.Option(help=".txt/.jsonl/.csv prompts for the prompt-set sections "
                                                      "(default: the built-in probe set)")] = None,
    lab: Annotated[Path | None, typer.Option(help="a finished `sinkscope sweep` directory for Fig. 5 (default: "
                                                  "run cpu-demo in full mode, skip with --quick)")] = None,
    findings_md: FindingsOption = None,
    quiet: Annotated[bool, typer.Option(help="no progress display")] = False,
) -> None:
    """Reproduce the paper: every section on each model (one load per model), a verdict per claim, and one
    self-contained report.html (+ report.md, tidy data). Re-running with the same --out recomputes only what
    changed."""
    from ..data import read_prompts
    from ..paper import FULL, QUICK, build_report, run_paper
    from ..paper.plan import Inputs

    if lab is not None and not (lab / "summary.csv").is_file():
        raise InputError(f"--lab {lab}: not a finished sweep directory (no summary.csv); run `sinkscope sweep` first")
    check_out(out)
    inputs = Inputs(read_prompts(prompts), prompts.name) if prompts is not None else Inputs()
    manifest = run_paper(model, out, QUICK if quick else FULL, inputs, lab=lab, progress=not quiet,
                         command=command_line())
    built = build_report([out], out, findings_md=findings_md, prompt_texts=[(p.id, p.text) for p in inputs.prompts])
    console.print(_timing_table(manifest["section_seconds"], manifest["seconds"]))
    _print_report(built)
    console.print(f"open {built[0]['html'].resolve()}", highlight=False, soft_wrap=True)  # a path: never wrapped


@app.command(rich_help_panel=REPORT)
@user_errors
def report(
    run_dir: Annotated[list[Path], typer.Argument(help="`sinkscope paper` output directories or scan runs; several "
                                                       "put their models side by side")],
    out: Annotated[Path | None, typer.Option(help="where to write the report (default: the first RUN_DIR)")] = None,
    findings_md: FindingsOption = None,
) -> None:
    """Build the paper report from saved runs (no model is loaded): report.html, report.md, findings."""
    from ..paper import build_report

    for directory in run_dir:
        if not directory.is_dir():
            raise InputError(f"{directory} is not a directory")
    target = out or run_dir[0]
    check_out(target)
    _print_report(build_report(list(run_dir), target, findings_md=findings_md))
