"""sinkscope: measure, explain and exploit attention sinks in transformer language models."""

from .capture import CaptureEngine, FirstTokenAttention, Probe, capture
from .errors import SinkscopeError
from .experiments import ScanResult, scan
from .experiments.ablate import ablate
from .experiments.conditional_heads import conditional_heads
from .experiments.downstream import downstream
from .experiments.generate import generate_side_by_side
from .experiments.keys import keys
from .experiments.knockout import knockout
from .experiments.massive import massive_activations
from .experiments.matrix_entropy import matrix_entropy_by_depth
from .experiments.noop import noop
from .experiments.oversquash import oversquash
from .experiments.passkey import passkey
from .experiments.perturb import perturb
from .experiments.rank_collapse import rank_collapse
from .experiments.repr_collapse import representational_collapse
from .experiments.ruler import ruler
from .experiments.smoothing import attention_smoothing
from .experiments.spread import spread
from .experiments.stream import stream
from .models import LoadedModel, ModelInfo, load
from .version import __version__

__all__ = [
    "CaptureEngine", "FirstTokenAttention", "LoadedModel", "ModelInfo", "Probe", "ScanResult", "SinkscopeError",
    "__version__", "ablate", "attention_smoothing", "spread", "capture", "conditional_heads", "downstream",
    "generate_side_by_side", "keys", "knockout", "load", "massive_activations", "matrix_entropy_by_depth", "noop",
    "oversquash", "passkey", "perturb", "rank_collapse", "representational_collapse", "ruler", "scan", "stream",
]
