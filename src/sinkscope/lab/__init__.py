"""The emergence lab: pre-train small LLaMA-style models and watch attention sinks form.

- `data`: Bigram-Backcopy and natural-text sources, the packing collator ({causal, intra-doc} x {fixed <bos>,
  eos-separated});
- `models`: transformers LLaMA models from a small spec;
- `track`: validation loss and the sink metric (through the capture engine) during training;
- `train`: the training loop (single process or `accelerate launch`), checkpoints, exact resume;
- `sweep`: grids of runs (context length, packing) and their combined table and figure;
- `config`, `presets`: run and sweep settings, ``cpu-demo`` and ``paper``.
"""

from .config import SweepConfig, TrainConfig, load_sweep_config, load_train_config
from .train import TrainResult, train

__all__ = ["SweepConfig", "TrainConfig", "TrainResult", "load_sweep_config", "load_train_config", "train"]
