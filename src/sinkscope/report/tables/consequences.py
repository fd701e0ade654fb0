"""Terminal tables of the consequences experiments (registered with `table_for_experiment`)."""

from __future__ import annotations
