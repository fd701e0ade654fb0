"""`perturb`: how far a one-word change spreads through depth and sequence, with vs without `<bos>`
(Barbero et al. 2025, Fig. 2).

The text x and a copy x' with one word swapped (the paper: the App. C.1 Shakespeare paragraph,
"greatest" -> "best", same token count) run under each `<bos>` condition. For every layer l (0 = the
embeddings, the last one taken before the final norm) and text token j,

    Delta[l, j] = ||h_j^(l)(x) - h_j^(l)(x')||_2       and      Delta[l, j] / ||h_j^(l)(x)||_2.

Conditions are aligned on the text tokens: a prefix at position 0 that is not text (`<bos>`, a
replacement token) is dropped. Summaries (p = the last changed position): S_total = sum over layers and
tokens j > p, S_final = mean over tokens j > p at the last layer, and R = S(strip) / S(add). The paper's
claim predicts R > 1: without the sink the change spreads further.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import CaptureEngine
from ..errors import InputError, TokenizationError
from ..metrics import sensitivity
from ..models.loader import LoadedModel, load
from ..models.tokens import encode
from .common import ExperimentResult, encode_conditions, progress_bar, provenance

# Barbero et al. 2025, App. C.1 (the Fig. 2 prompt).
SHAKESPEARE = (
    "William Shakespeare was an English playwright, poet and actor. He is widely regarded as the greatest "
    "writer in the English language and the world's pre-eminent dramatist. He is often called England's "
    "national poet and the Bard of Avon. His extant works, including collaborations, consist of some 39 "
    "plays, 154 sonnets, and three long narrative poems."
)
DEFAULT_SWAP = ("greatest", "best")
SPREAD_KEYS = ("S_total", "S_final", "S_total_rel", "S_final_rel")


def parse_swap(spec: str) -> tuple[str, str]:
    """``"old=new"`` -> ("old", "new"); a malformed spec is an InputError."""
    if spec.count("=") != 1:
        raise InputError(f"--swap must look like old=new (e.g. greatest=best), got '{spec}'")
    old, new = (part.strip() for part in spec.split("="))
    if not old or not new:
        raise InputError(f"--swap needs a word on both sides of '=', got '{spec}'")
    return old, new


def swap_word(text: str, old: str, new: str) -> tuple[str, int]:
    """Replace the first whole-word occurrence of ``old`` by ``new``; returns the text and its character offset."""
    if old == new:
        raise InputError(f"--swap {old}={new} changes nothing")
    match = re.search(rf"(?<!\w){re.escape(old)}(?!\w)", text)
    if match is None:
        raise InputError(f"--swap: the word '{old}' does not occur in the text")
    return text[:match.start()] + new + text[match.end():], match.start()


def token_label(tokenizer: Any, token_id: int) -> str:
    """A readable tick label for one token (decoded text, whitespace made visible)."""
    text = tokenizer.decode([int(token_id)])
    return text.replace("\n", "\\n").replace("\t", "\\t").strip() or repr(text)


def text_start(loaded: LoadedModel, text: str, ids: Sequence[int], max_tokens: int | None) -> int:
    """Where the text tokens begin in ``ids`` (1 after a `<bos>` or replacement prefix, else 0)."""
    stripped = encode(loaded.tokenizer, text, "strip", max_tokens)
    start = len(ids) - len(stripped)
    if start < 0 or list(ids[start:]) != stripped:
        raise TokenizationError("cannot align this <bos> condition on the text tokens (the tokenizer adds "
                                "tokens after the text); use --bos add, strip or replace:<token>")
    return start


class PerturbResult(ExperimentResult):
    """Tables: ``delta`` (one row per bos x layer x text token). Figure: ``perturbation.png``."""

    def plot(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import PowerNorm

        frame = self.tables["delta"]
        conditions = list(self.summary["conditions"])
        labels = self.summary["token_labels"]
        changed = set(self.summary["changed_positions"])
        n_tokens, n_rows = len(labels), int(frame["layer"].max()) + 1
        width = min(2.0 + 0.12 * n_tokens, 14.0)
        fig, axes = plt.subplots(2, len(conditions), figsize=(width * len(conditions), 2.5 + 0.36 * n_rows),
                                 squeeze=False, constrained_layout=True)
        for row, (column, title) in enumerate((("delta", "||h(x) - h(x')||"),
                                               ("delta_rel", "||h(x) - h(x')|| / ||h(x)||"))):
            cubes = {c: frame[frame["bos"] == c].pivot(index="layer", columns="position", values=column).to_numpy()
                     for c in conditions}
            # One scale for all panels, set by the spread (tokens after the swap): the swapped token's own
            # change would otherwise wash everything out, so its column saturates. sqrt scale: the spread
            # spans orders of magnitude between early and late layers.
            after = [cube[:, self.summary["perturbed_position"] + 1:] for cube in cubes.values()]
            vmax = max((float(np.nanmax(a)) for a in after if a.size), default=0.0) or 1.0
            norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)
            image = None
            for ax, condition in zip(axes[row], conditions, strict=True):
                image = ax.imshow(cubes[condition], aspect="auto", origin="lower", cmap="magma", norm=norm,
                                  interpolation="nearest")
                stats = self.summary["conditions"][condition]
                suffix = "_rel" if column == "delta_rel" else ""
                ax.set_title(f"bos={condition}  S_total{suffix}={stats['S_total' + suffix]:.3g}  "
                             f"S_final{suffix}={stats['S_final' + suffix]:.3g}", fontsize=9)
                ax.set_ylabel("layer (0 = embeddings)")
                ax.yaxis.get_major_locator().set_params(integer=True)
                ax.set_xticks(range(n_tokens))
                ax.set_xticklabels(labels, rotation=90, fontsize=5)
                for position in changed:
                    ax.get_xticklabels()[position].set_color("tab:red")
                    ax.axvline(position, color="tab:cyan", linewidth=0.6, alpha=0.7)
            fig.colorbar(image, ax=axes[row].tolist(), label=f"{title} (sqrt scale)", shrink=0.9, extend="max")
        swap = self.summary["swap"]
        fig.suptitle(f"{self.summary['model']}: perturbation '{swap['old']}' -> '{swap['new']}' "
                     f"(R_total={self.summary.get('R_total', float('nan')):.3g}, "
                     f"R_final={self.summary.get('R_final', float('nan')):.3g})", fontsize=10)
        path = out / "perturbation.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return [path]


def _residual(engine: CaptureEngine, ids: list[int], start: int) -> np.ndarray:
    """[layers + 1, text tokens, d] residual stream (pre-final-norm at the top), float64."""
    out = engine.forward(torch.tensor([ids]), residual=True)
    return out.residual[:, 0, start:].double().cpu().numpy()


def perturb(
    model: LoadedModel | Any,
    text: str = SHAKESPEARE,
    *,
    swap: tuple[str, str] = DEFAULT_SWAP,
    bos: Sequence[str] = ("add", "strip"),
    max_tokens: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> PerturbResult:
    """Perturbation spread of a one-word swap under each `<bos>` condition (see the module docstring).

    ``swap``: (old, new); the first whole-word occurrence of old is replaced. Swaps whose word is absent,
    that change nothing, or that change the token count are refused (InputError).
    """
    loaded = load(model)
    if loaded.tokenizer is None:
        raise InputError("perturb needs a tokenizer; load the model with tokenizer=...")
    conditions = list(dict.fromkeys(bos))
    if not conditions:
        raise InputError("give at least one --bos condition")
    old, new = swap
    perturbed_text, _ = swap_word(text, old, new)
    original = encode_conditions(loaded, text, conditions, max_tokens)
    changed_ids = encode_conditions(loaded, perturbed_text, conditions, max_tokens)
    starts: dict[str, int] = {}
    for mode, ids in original.items():
        if len(ids) != len(changed_ids[mode]):
            raise InputError(f"--swap {old}={new} changes the token count ({len(ids)} -> {len(changed_ids[mode])} "
                             f"tokens with bos={mode}); pick a replacement with as many tokens")
        starts[mode] = text_start(loaded, text, ids, max_tokens)
    first_mode = next(iter(original))
    text_ids = original[first_mode][starts[first_mode]:]
    text_ids_perturbed = changed_ids[first_mode][starts[first_mode]:]
    changed = [j for j, (a, b) in enumerate(zip(text_ids, text_ids_perturbed, strict=True)) if a != b]
    if not changed:
        raise InputError(f"--swap {old}={new} leaves the tokens unchanged (within --max-tokens?)")
    position = changed[-1]  # spread is measured after the last changed token
    tokenizer = loaded.tokenizer
    labels = [token_label(tokenizer, t) for t in text_ids]
    for j in changed:
        labels[j] = f"{labels[j]}→{token_label(tokenizer, text_ids_perturbed[j])}"

    tokens = np.array(tokenizer.convert_ids_to_tokens(text_ids), dtype=object)
    tokens_perturbed = np.array(tokenizer.convert_ids_to_tokens(text_ids_perturbed), dtype=object)
    frames, per_condition = [], {}
    with CaptureEngine(loaded) as engine, progress_bar("perturb", progress) as bar:
        task = bar.add_task("perturb", total=2 * len(original))
        for mode, ids in original.items():
            hidden = _residual(engine, ids, starts[mode])
            bar.advance(task)
            hidden_perturbed = _residual(engine, changed_ids[mode], starts[mode])
            bar.advance(task)
            delta = sensitivity.perturbation_delta(hidden, hidden_perturbed)
            rel = sensitivity.relative_delta(delta, hidden)
            stats = sensitivity.spread_summary(delta, position, hidden)
            # causality audit: nothing before the first changed token may move
            stats["max_delta_before_swap"] = float(delta[:, :changed[0]].max()) if changed[0] else 0.0
            stats["n_tokens"] = len(ids)
            stats["first_token"] = tokenizer.convert_ids_to_tokens(int(ids[0]))
            per_condition[mode] = stats
            n_layers, n_tokens = delta.shape
            positions = np.tile(np.arange(n_tokens), n_layers)
            frames.append(pd.DataFrame({
                "bos": mode,
                "layer": np.repeat(np.arange(n_layers), n_tokens),
                "position": positions,
                "sequence_position": positions + starts[mode],
                "token": tokens[positions],
                "token_perturbed": tokens_perturbed[positions],
                "changed": np.isin(positions, changed),
                "after_swap": positions > position,
                "delta": delta.reshape(-1),
                "delta_rel": rel.reshape(-1),
                "norm": np.linalg.norm(hidden, axis=-1).reshape(-1),
            }))

    summary: dict[str, Any] = {
        "model": loaded.info.name,
        "text": text,
        "perturbed_text": perturbed_text,
        "swap": {"old": old, "new": new},
        "changed_positions": changed,
        "perturbed_position": position,
        "n_text_tokens": len(text_ids),
        "n_layers": loaded.info.n_layers,
        "token_labels": labels,
        "conditions": per_condition,
    }
    if "add" in per_condition and "strip" in per_condition:
        for key in SPREAD_KEYS:
            summary["R" + key[1:]] = sensitivity.spread_ratio(per_condition["strip"][key], per_condition["add"][key])
    meta = provenance(loaded, command, bos=conditions, max_tokens=max_tokens, kernels=sorted(engine.kernels_used),
                      residual="embeddings, then each layer's output; the last before the final norm")
    return PerturbResult({"delta": pd.concat(frames, ignore_index=True)}, summary, meta)
