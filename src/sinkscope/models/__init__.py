"""Loading models: bundled registry, hub ids, local directories, GGUF files, live objects."""

from .bundled import BUNDLED, DEFAULT_MODEL
from .loader import LoadedModel, ModelInfo, load

__all__ = ["BUNDLED", "DEFAULT_MODEL", "LoadedModel", "ModelInfo", "load"]
