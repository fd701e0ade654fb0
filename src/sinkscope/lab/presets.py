"""Preset runs and sweeps.

``cpu-demo`` fits in about ten minutes on two CPU cores: the Bigram-Backcopy task (Guo et al. 2024), on
which sinks form within a few million tokens, a 2-layer model of ~30k parameters, a context-length sweep at
constant tokens per step, and the packing grid of Barbero et al.'s Table 2 at the same scale.
``cpu-paper`` is cpu-demo with more seeds, so that the paper report's lab verdicts rest on at least 10 runs
(or pairs). ``depth-demo`` trains the same model with 1, 2, 4 and 8 layers (same width, same tokens per run).

``paper`` is the paper's setting (Barbero et al. 2025, §4-5; ../docs notes E4/E6): ~120M-parameter
LLaMA-style models on natural text, context 128...2048 at constant tokens per step, 5B tokens per run; the
packing grid at 30B tokens. It needs GPUs (about a day per run on one H100) and a large text dataset.
"""

from __future__ import annotations

from typing import Any

_DEMO_BASE: dict[str, Any] = {
    "seed": 0,
    "context_length": 64,
    "tokens_per_step": 4096,
    "steps": 800,
    "data": {"kind": "bigram_backcopy", "vocab": 64, "triggers": 8, "concentration": 0.1, "doc_min": 16,
             "doc_max": 256},
    "model": {"hidden_size": 32, "layers": 2, "heads": 4},
    "packing": {"mask": "causal", "bos": "fixed"},
    "optimizer": {"lr": 3e-3, "warmup_steps": 50, "min_lr_ratio": 0.1},
    # probes of 31 text tokens for every context length, so the metric is comparable across the sweep
    "tracking": {"every": 50, "probe_count": 32, "probe_length": 31, "checkpoint_every": 200},
}

_PAPER_BASE: dict[str, Any] = {
    "seed": 0,
    "context_length": 2048,
    "tokens_per_step": 524288,  # 2^19 tokens per step at every context length
    "steps": 9537,  # ~5B tokens
    "micro_batch_rows": 16,  # per process and forward pass; the step still sees all 2^19 tokens
    "data": {"kind": "text", "dataset": "monology/pile-uncopyrighted", "tokenizer": "smollm2-135m"},
    "model": {"hidden_size": 768, "layers": 12, "heads": 12},
    "packing": {"mask": "causal", "bos": "eos"},
    "optimizer": {"lr": 6e-4, "warmup_steps": 500, "min_lr_ratio": 0.1, "weight_decay": 0.1},
    "tracking": {"every": 250, "probe_count": 170, "probe_length": 63, "checkpoint_every": 500},
}

SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": {
        "description": "sinks emerging on Bigram-Backcopy: context-length sweep and packing grid (2 CPU cores)",
        "base": _DEMO_BASE,
        "grids": [
            {"group": "context", "context_length": [32, 64, 128, 256], "seed": [0, 1]},
            {"group": "packing", "packing.mask": ["causal", "intra_doc"], "packing.bos": ["fixed", "eos"],
             "seed": [0, 1]},
        ],
    },
    "cpu-paper": {
        "description": "cpu-demo with enough seeds for the paper report's verdicts: 12 runs over context lengths, "
                       "10 fixed-vs-eos pairs in the packing grid (2 CPU cores, ~16 min)",
        "base": _DEMO_BASE,
        "grids": [
            {"group": "context", "context_length": [32, 64, 128, 256], "seed": [0, 1, 2]},
            {"group": "packing", "packing.mask": ["causal", "intra_doc"], "packing.bos": ["fixed", "eos"],
             "seed": [0, 1, 2, 3, 4]},
        ],
    },
    "variants-demo": {
        "description": "the same task under each attention variant (softmax, off-by-one, learned sink, sigmoid, "
                       "softpick, gated head-wise and element-wise)",
        "base": _DEMO_BASE,
        "grids": [{"group": "variants",
                   "model.attention": ["softmax", "off_by_one", "learned_sink", "sigmoid", "softpick",
                                       "gated_headwise", "gated_elementwise"]}],
    },
    "depth-demo": {
        "description": "sinks vs depth: 1, 2, 4, 8 layers at the cpu-demo width and token budget (2 CPU cores)",
        "base": _DEMO_BASE,
        "grids": [{"group": "depth", "model.layers": [1, 2, 4, 8], "seed": [0, 1, 2]}],
    },
    "text-demo": {
        "description": "context-length sweep on natural text (all of Shakespeare, BPE-512): ~25 min on 2 CPU cores",
        "base": {**_DEMO_BASE, "tokens_per_step": 8192, "steps": 1500,
                 "data": {"kind": "text", "paths": ["shakespeare"], "tokenizer": "train:512"},
                 "model": {"hidden_size": 64, "layers": 4, "heads": 4},
                 "tracking": {"every": 100, "probe_count": 32, "probe_length": 63, "checkpoint_every": 500}},
        "grids": [{"group": "context", "context_length": [64, 128, 256, 512]}],
    },
    "paper": {
        "description": "Barbero et al. 2025 Fig. 5 and Table 2 at the paper's scale (GPUs)",
        "base": _PAPER_BASE,
        "grids": [
            {"group": "context", "context_length": [128, 256, 512, 1024, 2048]},
            {"group": "packing", "steps": [57221], "packing.mask": ["causal", "intra_doc"],
             "packing.bos": ["fixed", "eos"]},  # 30B tokens
        ],
    },
}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": {**_DEMO_BASE, "name": "cpu-demo"},
    "tiny": {**_DEMO_BASE, "name": "tiny", "steps": 20,
             "tracking": {**_DEMO_BASE["tracking"], "every": 10, "probe_count": 4, "checkpoint_every": 10}},
    "paper": {**_PAPER_BASE, "name": "paper"},
}
