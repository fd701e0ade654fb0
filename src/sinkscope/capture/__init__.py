"""Capturing what attention does: one engine (`CaptureEngine`), pluggable probes."""

from .engine import AttentionCall, BatchInfo, CaptureEngine, Probe, capture
from .probes import (
    AttentionEntropy,
    AttentionWeights,
    FirstTokenAttention,
    SinkKnockout,
    ValueNorms,
)

__all__ = [
    "AttentionCall", "AttentionEntropy", "AttentionWeights", "BatchInfo", "CaptureEngine", "FirstTokenAttention",
    "Probe", "SinkKnockout", "ValueNorms", "capture",
]
