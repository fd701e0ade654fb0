"""sinkscope: measure, explain and exploit attention sinks in transformer language models."""

__version__ = "0.1.0"

from .capture import CaptureEngine, FirstTokenAttention, Probe, capture  # noqa: E402
from .errors import SinkscopeError  # noqa: E402
from .experiments import ScanResult, scan  # noqa: E402
from .models import LoadedModel, ModelInfo, load  # noqa: E402

__all__ = [
    "CaptureEngine", "FirstTokenAttention", "LoadedModel", "ModelInfo", "Probe", "ScanResult",
    "SinkscopeError", "capture", "load", "scan", "__version__",
]
