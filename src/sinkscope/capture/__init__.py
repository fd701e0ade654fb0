"""Capturing what attention does: one engine (`CaptureEngine`), pluggable probes."""

from .engine import AttentionCall, BatchInfo, CaptureEngine, Probe, capture
from .probes import FirstTokenAttention

__all__ = ["AttentionCall", "BatchInfo", "CaptureEngine", "FirstTokenAttention", "Probe", "capture"]
