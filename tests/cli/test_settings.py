"""Settings declared once (`experiments.settings.setting`): the options generated from them (`cli.settings`)
carry the field's flag, help and default, reach the experiment, and unknown names are refused."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import typer

from sinkscope.cli.settings import RunOptions, Settings, with_run_options, with_settings
from sinkscope.errors import InputError
from sinkscope.experiments.kv import KV
from sinkscope.experiments.settings import declared_settings, given_settings, setting


@dataclass
class Toy:
    name = "toy"

    size: int = setting(3, "how many")
    ratios: tuple[float, ...] = setting((0.5,), "fractions", flag="--ratio")
    label: str | None = setting(None, "a label", aliases=("--tag",))
    hidden: int = 7  # not declared: no option


def toy_app() -> tuple[typer.Typer, list[dict]]:
    app, seen = typer.Typer(), []

    @app.command("toy")
    @with_settings(Toy)
    def toy(verbose: bool = False, settings: Settings = None) -> None:
        seen.append({"verbose": verbose, **(settings or {})})

    @app.command("other")
    def other() -> None:  # a second command, so typer keeps sub-command names
        pass

    return app, seen


def test_declared_settings_have_their_flags_types_and_defaults():
    declared = {d.name: d for d in declared_settings(Toy)}
    assert set(declared) == {"size", "ratios", "label"}
    assert declared["ratios"].flag == "--ratio" and declared["ratios"].repeated and declared["ratios"].element is float
    assert declared["size"].flag == "--size" and not declared["size"].repeated and declared["size"].element is int
    assert declared["label"].element is str and declared["label"].aliases == ("--tag",)
    assert declared["ratios"].shown_default == "0.5" and declared["label"].shown_default == "none"


def test_generated_options_reach_the_command_by_field_name():
    from typer.testing import CliRunner

    app, seen = toy_app()
    runner = CliRunner()
    assert runner.invoke(app, ["toy", "--size", "5", "--ratio", "0.1", "--ratio", "0.2", "--tag", "x",
                               "--verbose"]).exit_code == 0
    assert seen[-1] == {"verbose": True, "size": 5, "ratios": (0.1, 0.2), "label": "x"}
    assert runner.invoke(app, ["toy"]).exit_code == 0
    assert seen[-1] == {"verbose": False}  # nothing given: the dataclass defaults apply
    assert runner.invoke(app, ["toy", "--hidden", "3"]).exit_code != 0
    shown = runner.invoke(app, ["toy", "--help"], env={"COLUMNS": "200"}).output
    assert "how many [3]" in shown and "fractions; repeat [0.5]" in shown
    assert "a label [none]" in shown  # escaped: rich markup would take "[none]" for a style tag


def test_every_declared_setting_is_an_option_of_its_command():
    from typer.testing import CliRunner

    from sinkscope.cli import app

    generated = {c.name or c.callback.__name__: c.callback.settings_of for c in app.registered_commands
                 if hasattr(c.callback, "settings_of")}
    assert generated["kv"] is KV and len(generated) >= 2
    for command, cls in generated.items():
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output
        for declared in declared_settings(cls):
            assert declared.flag in shown, (command, declared.name)
            for alias in declared.aliases:
                assert alias in shown, (command, alias)


def test_run_options_reach_the_command_as_one_object_beside_the_settings(tmp_path):
    from typer.testing import CliRunner

    app, seen = typer.Typer(), []

    @app.command("toy")
    @with_settings(Toy)
    @with_run_options
    def toy(verbose: bool = False, run: RunOptions = RunOptions(), settings: Settings = None) -> None:
        seen.append((verbose, run, settings))

    @app.command("other")
    def other() -> None:
        pass

    runner = CliRunner()
    assert runner.invoke(app, ["toy", "--out", str(tmp_path), "--resume", "--device", "cuda:1", "--size", "2"]
                         ).exit_code == 0
    assert seen[-1] == (False, RunOptions(out=tmp_path, resume=True, device="cuda:1"), {"size": 2})
    assert runner.invoke(app, ["toy"]).exit_code == 0
    assert seen[-1] == (False, RunOptions(), {})
    shown = runner.invoke(app, ["toy", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--out", "--resume", "--quiet", "--device", "--dtype", "--trust-remote-code", "--size"):
        assert flag in shown


def test_given_settings_drop_what_was_not_given_and_refuse_unknown_names():
    assert given_settings(Toy, {"size": None, "ratios": [0.3]}) == {"ratios": (0.3,)}
    with pytest.raises(InputError, match="no setting 'sizes'"):
        given_settings(Toy, {"sizes": 2})
