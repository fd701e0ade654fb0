"""Figures, terminal tables and commands register under an experiment's name: every name registered must be an
experiment that exists (a misspelt name would leave its result without figures, silently)."""

from __future__ import annotations

from sinkscope.experiments.base import RESULT_TYPES, import_all
from sinkscope.report import figures, tables


def test_every_registered_figure_and_table_names_an_experiment():
    experiments = import_all()
    figures._import_all()
    tables._import_all()
    assert set(figures.FIGURES) <= set(experiments), sorted(set(figures.FIGURES) - set(experiments))
    assert set(tables.TABLES) <= set(experiments), sorted(set(tables.TABLES) - set(experiments))
    assert {"scan", "kv", "ablate"} <= set(figures.FIGURES)


def test_every_experiment_names_its_result_type_and_the_result_its_experiment():
    for name, cls in import_all().items():
        if not cls.__module__.startswith("sinkscope."):  # one a test defines
            continue
        assert RESULT_TYPES[name] is cls.result_type and cls.result_type.experiment == name
