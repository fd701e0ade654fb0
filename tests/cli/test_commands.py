"""Commands built from an experiment's declaration (`experiments.settings.Command`, `cli.commands`): the
inputs it declares, its settings and the run options reach the experiment; every declared command is on
`sinkscope --help`, in its panel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import sinkscope.cli.commands as commands
from sinkscope.cli import PANEL_TITLES, app
from sinkscope.experiments.base import Result, import_all
from sinkscope.experiments.inputs import PromptExperiment
from sinkscope.experiments.loss import TextLoss
from sinkscope.experiments.settings import Command, declared_settings, setting


@dataclass
class Counting(PromptExperiment[Result]):
    """A prompt experiment that is never run: the command's parsing is what is tested."""

    command = Command("counting", "measure", "Count what the prompts hold.", inputs="prompts", limit=2)
    every: int = setting(3, "count every n-th token")


@dataclass
class Reading(TextLoss[Result]):
    command = Command("reading", "consequences", "Read a text.", inputs="text")


def built(cls: type, monkeypatch: pytest.MonkeyPatch) -> tuple[typer.Typer, list[tuple[Any, str, Any]]]:
    toy, made = typer.Typer(), []
    monkeypatch.setattr(commands, "run_command", lambda experiment, model, run: made.append((experiment, model, run)))
    commands.experiment_command(cls, on=toy)

    @toy.command("other")
    def other() -> None:  # a second command, so typer keeps sub-command names
        pass

    return toy, made


def test_a_declared_prompt_command_passes_its_inputs_settings_and_run_options(monkeypatch, tmp_path):
    toy, made = built(Counting, monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\nfour five six\nseven eight nine\n", encoding="utf-8")
    result = CliRunner().invoke(toy, ["counting", "--model", "tiny", "--prompts", str(prompts), "--bos", "strip",
                                      "--every", "5", "--max-tokens", "12", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    (experiment, model, run), = made
    assert isinstance(experiment, Counting) and model == "tiny"
    assert [p.text for p in experiment.prompts] == ["one two three", "four five six"]  # --limit 2, declared
    assert experiment.bos == ("strip",) and experiment.every == 5 and experiment.max_tokens == 12
    assert run.out == tmp_path / "out" and run.quiet and not run.resume
    CliRunner().invoke(toy, ["counting", "--limit", "3", "--prompts", str(prompts)])
    assert len(made[-1][0].prompts) == 3
    assert made[-1][0].bos == ("add", "strip") and made[-1][0].every == 3  # nothing given: the class's defaults
    shown = CliRunner().invoke(toy, ["counting", "--help"], env={"COLUMNS": "200"}).output
    assert "Count what the prompts hold." in shown and "count every n-th token [3]" in shown


def test_a_declared_text_command_reads_its_text_option(monkeypatch, tmp_path):
    toy, made = built(Reading, monkeypatch)
    text = tmp_path / "text.txt"
    text.write_text("a short text to read " * 20, encoding="utf-8")
    assert CliRunner().invoke(toy, ["reading", "--text", str(text), "--window", "16"]).exit_code == 0
    experiment = made[-1][0]
    assert experiment.source == f"file:{text}" and experiment.window == 16
    assert "--prompts" not in CliRunner().invoke(toy, ["reading", "--help"], env={"COLUMNS": "200"}).output


def test_every_declared_command_is_in_its_panel_with_its_settings():
    declared = {cls.command.name: cls for cls in import_all().values()
                if "command" in cls.__dict__ and cls.command is not None}
    assert {"rank-collapse", "ablate", "passkey", "spread"} <= set(declared)
    registered = {c.name: c for c in app.registered_commands}
    for name, cls in declared.items():
        assert registered[name].rich_help_panel == PANEL_TITLES[cls.command.panel]
        shown = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "250"}).output
        assert cls.command.help.split(" (")[0][:40] in shown, name
        for option in ("--model", "--bos", "--out", "--resume", *(d.flag for d in declared_settings(cls))):
            assert option in shown, (name, option)


def test_help_shows_the_panels_in_order_each_by_name():
    panels = [c.rich_help_panel for c in app.registered_commands]
    order = [p for i, p in enumerate(panels) if p not in panels[:i]]
    assert order == ["Measure", "Explain", "Consequences", "Lab", "Report"]
    for panel in order:
        names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands
                 if c.rich_help_panel == panel]
        assert names == sorted(names)
