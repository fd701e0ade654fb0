"""Terminal tables of the explain experiments (registered with `table_for_experiment`)."""

from __future__ import annotations
