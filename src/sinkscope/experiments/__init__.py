"""Experiments: each combines the engine, probes and metrics into a result with tidy tables."""

from .scan import ScanResult, scan

__all__ = ["ScanResult", "scan"]
