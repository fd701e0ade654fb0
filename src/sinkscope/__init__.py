"""sinkscope: measure, explain and exploit attention sinks in transformer language models."""

__version__ = "0.1.0"

from .capture import CaptureEngine, FirstTokenAttention, Probe, capture  # noqa: E402
from .errors import SinkscopeError  # noqa: E402
from .experiments import ScanResult, scan  # noqa: E402
from .experiments.ablate import ablate  # noqa: E402
from .experiments.conditional_heads import conditional_heads  # noqa: E402
from .experiments.downstream import downstream  # noqa: E402
from .experiments.generate import generate_side_by_side  # noqa: E402
from .experiments.keys import keys  # noqa: E402
from .experiments.knockout import knockout  # noqa: E402
from .experiments.massive import massive_activations  # noqa: E402
from .experiments.matrix_entropy import matrix_entropy_by_depth  # noqa: E402
from .experiments.noop import noop  # noqa: E402
from .experiments.oversquash import oversquash  # noqa: E402
from .experiments.passkey import passkey  # noqa: E402
from .experiments.perturb import perturb  # noqa: E402
from .experiments.rank_collapse import rank_collapse  # noqa: E402
from .experiments.repr_collapse import representational_collapse  # noqa: E402
from .experiments.ruler import ruler  # noqa: E402
from .experiments.smoothing import attention_smoothing  # noqa: E402
from .experiments.spread import spread  # noqa: E402
from .experiments.stream import stream  # noqa: E402
from .models import LoadedModel, ModelInfo, load  # noqa: E402

__all__ = [
    "CaptureEngine", "FirstTokenAttention", "LoadedModel", "ModelInfo", "Probe", "ScanResult", "SinkscopeError",
    "__version__", "ablate", "attention_smoothing", "spread", "capture", "conditional_heads", "downstream",
    "generate_side_by_side", "keys", "knockout", "load", "massive_activations", "matrix_entropy_by_depth", "noop",
    "oversquash", "passkey", "perturb", "rank_collapse", "representational_collapse", "ruler", "scan", "stream",
]
