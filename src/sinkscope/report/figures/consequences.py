"""Figures of the consequences experiments (registered per experiment with `figure_for`)."""

from __future__ import annotations
