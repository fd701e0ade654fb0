"""Capturing what attention does: one engine (`CaptureEngine`), pluggable probes."""

from .engine import AttentionCall, BatchInfo, CaptureEngine, Probe, capture
from .probes import AttentionWeights, FirstTokenAttention

__all__ = ["AttentionCall", "AttentionWeights", "BatchInfo", "CaptureEngine", "FirstTokenAttention", "Probe", "capture"]
