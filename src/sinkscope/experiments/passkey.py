"""`passkey`: retrieve a number hidden in filler text, with vs without `<bos>` (RULER-style needle task).

For every `<bos>` condition × length × depth × trial, the prompt from `sinkscope.data.passkey` is encoded
(``add``: `<bos>` + text tokens; ``strip``: the same text tokens alone), the model decodes greedily, and the
answer is correct when its first number is exactly the five-digit key. One row per prompt; accuracy per
condition and per condition × length; a length × depth heatmap per condition.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..data.passkey import passkey_prompts, score_answer
from ..errors import InputError
from ..models.loader import LoadedModel, load, text_config
from ..models.tokens import encode, parse_bos
from ..report.rundir import RunDir
from .common import ExperimentResult, progress_bar, provenance

COLUMNS = ["bos", "length", "depth", "trial", "key", "n_tokens", "key_position", "answer", "correct", "seconds"]


class PasskeyResult(ExperimentResult):
    def plot(self, out: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frame = self.tables["passkey"]
        conditions = list(dict.fromkeys(frame["bos"]))
        fig, axes = plt.subplots(1, len(conditions), figsize=(4.2 * len(conditions) + 1, 3.6), squeeze=False)
        image = None
        for ax, bos in zip(axes[0], conditions, strict=True):
            grid = frame[frame["bos"] == bos].pivot_table("correct", "length", "depth", aggfunc="mean")
            image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                              origin="lower")
            ax.set_xticks(range(grid.shape[1]), [f"{d:g}" for d in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(n) for n in grid.index])
            for (i, j), value in pd.DataFrame(grid.to_numpy()).stack().items():
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                        fontsize=8)
            ax.set_xlabel("depth of the key (fraction of filler)")
            ax.set_title(f"bos={bos}  accuracy {self.summary['accuracy'][bos]:.2f}")
        axes[0][0].set_ylabel("prompt length (text tokens)")
        fig.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy")
        fig.suptitle(f"passkey retrieval: {self.summary.get('model')}", y=1.04)
        path = out / "passkey_heatmap.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return [path]


def _generation_config(model: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    # Greedy, and nothing else from the model's own generation defaults (sampling, top-k, ...).
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)


def _answer(model: Any, tokenizer: Any, ids: list[int], generation: Any) -> str:
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.inference_mode():  # generate keeps the LM head to the last position (logits_to_keep)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=generation)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


def passkey(
    model: LoadedModel | Any, *, lengths: Sequence[int] = (512, 1024, 2048, 4096),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), trials: int = 3, bos: Sequence[str] = ("add", "strip"),
    seed: int = 0, max_new_tokens: int = 8, out: str | Path | None = None, resume: bool = False,
    progress: bool = True, command: str | None = None,
) -> PasskeyResult:
    """Greedy passkey retrieval per (bos, length, depth, trial). ``lengths`` count text tokens (the `<bos>`,
    when added, comes on top). ``out``: rows are written to ``out/parts/`` as they finish; ``resume``
    continues an interrupted run."""
    loaded = load(model)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise InputError("passkey needs a tokenizer; load the model with tokenizer=...")
    if trials < 1 or not lengths or not depths or not bos:
        raise InputError("passkey needs at least one length, depth, <bos> condition and trial")
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    limit = getattr(text_config(loaded.model), "max_position_embeddings", None)
    longest = max(lengths) + 1 + max_new_tokens
    if limit is not None and longest > limit:
        raise InputError(f"length {max(lengths)} (+ <bos> + {max_new_tokens} new tokens) exceeds the model's "
                         f"max_position_embeddings {limit}; choose lengths up to {limit - 1 - max_new_tokens}")
    modes = [str(parse_bos(mode)) for mode in bos]
    prompts = passkey_prompts(tokenizer, lengths, depths, trials, seed)
    jobs = [(mode, *prompt) for mode in modes for prompt in prompts]

    run = RunDir(out) if out is not None else None
    done = None
    if run is not None:
        digest = hashlib.sha256(json.dumps([(m, n, d, t, p.text) for m, n, d, t, p in jobs]).encode()).hexdigest()
        run.start({"experiment": "passkey", "model": loaded.info.name, "revision": loaded.info.revision,
                   "max_new_tokens": max_new_tokens, "n_jobs": len(jobs), "prompts_sha256": digest}, resume)
        done = run.read_parts() if resume else None
    frames = [] if done is None else [done]
    finished = set() if done is None else set(done[["bos", "length", "depth", "trial"]].itertuples(index=False))

    generation = _generation_config(loaded.model, max_new_tokens)
    loaded.model.eval()
    started = time.time()
    with progress_bar("passkey", progress) as bar:
        task = bar.add_task("", total=len(jobs), completed=len(finished))
        for index, (mode, length, depth, trial, prompt) in enumerate(jobs):
            if (mode, length, depth, trial) in finished:
                continue
            ids = encode(tokenizer, prompt.text, mode, max_tokens=None)
            offset = len(ids) - prompt.n_tokens  # 1 when <bos> (or another prefix) sits at position 0
            tick = time.time()
            answer = _answer(loaded.model, tokenizer, ids, generation)
            row = pd.DataFrame([{
                "bos": mode, "length": length, "depth": depth, "trial": trial, "key": prompt.key,
                "n_tokens": len(ids), "key_position": prompt.key_token_start + offset, "answer": answer,
                "correct": score_answer(answer, prompt.key), "seconds": round(time.time() - tick, 3),
            }], columns=COLUMNS)
            if run is not None:
                run.write_part(index, row)
            frames.append(row)
            bar.advance(task)
    frame = pd.concat(frames, ignore_index=True)
    order = {mode: i for i, mode in enumerate(modes)}
    frame = frame.sort_values(["bos", "length", "depth", "trial"], key=lambda c: c.map(order) if c.name == "bos"
                              else c, ignore_index=True)
    summary = {
        "model": loaded.info.name, "bos": modes, "lengths": [int(n) for n in lengths],
        "depths": [float(d) for d in depths], "trials": trials, "seed": seed, "max_new_tokens": max_new_tokens,
        "accuracy": {m: float(g["correct"].mean()) for m, g in frame.groupby("bos", sort=False)},
        "accuracy_by_length": {m: {str(n): float(a) for n, a in g.groupby("length")["correct"].mean().items()}
                               for m, g in frame.groupby("bos", sort=False)},
        "accuracy_by_depth": {m: {f"{d:g}": float(a) for d, a in g.groupby("depth")["correct"].mean().items()}
                              for m, g in frame.groupby("bos", sort=False)},
        "n_prompts": len(frame),
    }
    meta = provenance(loaded, command, experiment="passkey", seconds=round(time.time() - started, 3))
    result = PasskeyResult({"passkey": frame}, summary, meta)
    if out is not None:
        result.save(out)
    return result
