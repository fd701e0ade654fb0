"""`scan`: how much attention every head puts on the first token, over a set of prompts.

One row per prompt x layer x head. alpha is Gu et al.'s mean attention on position 0 over the queries
that can see it (query 0 included by default); the sink rate at eps is the fraction of rows with
alpha > eps.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..capture import CaptureEngine, FirstTokenAttention
from ..data import Prompt, probe_set
from ..errors import InputError, SinkscopeError, TokenizationError
from ..metrics import sink as sink_metrics
from ..models.loader import LoadedModel, load
from ..models.tokens import encode, parse_bos
from ..report.rundir import RunDir, write_json, write_table
from .common import provenance

TOKENS_PER_BATCH = 8192  # long inputs run one (or a few) at a time


@dataclass
class ScanResult:
    """Tidy per-(prompt, layer, head) results of a scan and the run's provenance."""

    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return int(self.frame["prompt"].nunique())

    @property
    def n_layers(self) -> int:
        return int(self.frame["layer"].max()) + 1

    @property
    def n_heads(self) -> int:
        return int(self.frame["head"].max()) + 1

    def _cube(self, column: str) -> np.ndarray:
        ordered = self.frame.sort_values(["prompt", "layer", "head"])
        return ordered[column].to_numpy(dtype=np.float64).reshape(self.n_prompts, self.n_layers, self.n_heads)

    @property
    def alpha(self) -> np.ndarray:
        """[prompts, layers, heads]: mean attention on position 0 (Gu et al.'s alpha_1)."""
        return self._cube("alpha")

    @property
    def first_k_mass(self) -> np.ndarray:
        return self._cube("first_k_mass")

    @property
    def sink_logit_mass(self) -> np.ndarray | None:
        """[prompts, layers, heads] share of attention a learned sink logit takes (gpt-oss); None otherwise."""
        cube = self._cube("sink_logit_mass")
        return None if np.isnan(cube).all() else cube

    @property
    def layer_types(self) -> list[str]:
        per_layer = self.frame.drop_duplicates("layer").sort_values("layer")
        return per_layer["layer_type"].tolist()

    @property
    def first_tokens(self) -> list[dict[str, Any]]:
        rows = self.frame.drop_duplicates("prompt").sort_values("prompt")
        return [
            {"prompt": str(r.prompt_id), "id": int(r.first_token_id), "token": str(r.first_token)}
            for r in rows.itertuples()
        ]

    # -- metrics ----------------------------------------------------------------------------------
    def sink_rate(self, eps: float = sink_metrics.DEFAULT_EPS) -> float:
        return sink_metrics.sink_rate(self.alpha, eps)

    def sink_rate_by_layer(self, eps: float = sink_metrics.DEFAULT_EPS) -> np.ndarray:
        return sink_metrics.sink_rate_by_layer(self.alpha, eps)

    def alpha_map(self) -> np.ndarray:
        return sink_metrics.alpha_map(self.alpha)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def summary(self, eps: Sequence[float] = (0.3, 0.8)) -> dict[str, Any]:
        alpha = self.alpha
        types = np.array(self.layer_types)
        summary: dict[str, Any] = {
            "model": self.meta.get("model", {}).get("name"),
            "bos": self.meta.get("bos"),
            "n_prompts": self.n_prompts,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "max_tokens": self.meta.get("max_tokens"),
            "eps": list(eps),
            "sink_rate": {str(e): sink_metrics.sink_rate(alpha, e) for e in eps},
            "sink_rate_by_layer": {str(e): sink_metrics.sink_rate_by_layer(alpha, e).tolist() for e in eps},
            "sink_rate_by_layer_type": {
                str(kind): {str(e): sink_metrics.sink_rate(alpha[:, types == kind], e) for e in eps}
                for kind in sorted(set(types))
            },
            "mean_sink_mass": sink_metrics.mean_sink_mass(alpha),
            "alpha_mean": self.alpha_map().tolist(),
            "first_k": self.meta.get("first_k"),
            "first_k_mass": float(self.first_k_mass.mean()),
            "first_tokens": self.first_tokens,
        }
        learned = self.sink_logit_mass
        if learned is not None:
            summary["learned_sink_mass"] = float(learned.mean())
            summary["learned_sink_mass_map"] = learned.mean(0).tolist()
        summary["provenance"] = {k: v for k, v in self.meta.items() if k not in ("bos", "max_tokens", "first_k")}
        return summary

    # -- files ------------------------------------------------------------------------------------
    def save(self, out: str | Path, eps: Sequence[float] = (0.3, 0.8)) -> Path:
        from ..report.figures import plot_alpha_heatmaps

        out = Path(out)
        write_table(out / "alpha.parquet", self.frame)
        per_layer = pd.DataFrame({"layer": range(self.n_layers), "layer_type": self.layer_types})
        for e in eps:
            per_layer[f"sink_rate@{e}"] = self.sink_rate_by_layer(e)
        per_layer["alpha_mean"] = self.alpha_map().mean(1)
        write_table(out / "per_layer.csv", per_layer)
        write_json(out / "summary.json", self.summary(eps))
        plot_alpha_heatmaps([(self.label, self.alpha_map())], out / "alpha_heatmap.png")
        return out

    @property
    def label(self) -> str:
        return f"{self.meta.get('model', {}).get('name', 'model')}  bos={self.meta.get('bos')}"

    @classmethod
    def load(cls, directory: str | Path) -> ScanResult:
        directory = Path(directory)
        table = directory / "alpha.parquet"
        summary_path = directory / "summary.json"
        if not table.is_file() or not summary_path.is_file():
            raise InputError(f"{directory} holds no finished scan (alpha.parquet + summary.json)")
        summary = json.loads(summary_path.read_text())
        meta = dict(summary.get("provenance", {}))
        meta.update(bos=summary.get("bos"), max_tokens=summary.get("max_tokens"), first_k=summary.get("first_k"))
        return cls(pd.read_parquet(table), meta)


def _as_prompts(texts: Sequence[str | Prompt] | None) -> list[Prompt]:
    if texts is None:
        return probe_set()
    if isinstance(texts, str):
        texts = [texts]
    return [t if isinstance(t, Prompt) else Prompt(f"p{i}", str(t)) for i, t in enumerate(texts)]


def _batches(todo: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    batches, current = [], []
    for index in todo:
        longest = max([lengths[i] for i in current] + [lengths[index]])
        if current and (len(current) >= batch_size or longest * (len(current) + 1) > TOKENS_PER_BATCH):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _rows_for_batch(
    probe: FirstTokenAttention, batch: list[int], sequences: list[list[int]], prompts: list[Prompt],
    layer_types: list[str], tokenizer: Any, include_self: bool,
) -> pd.DataFrame:
    frames = []
    for row, index in enumerate(batch):
        record = probe.per_prompt(row)
        attention, visible = record["attention"].numpy(), record["visible"].numpy()
        n_layers, n_heads, _ = attention.shape
        alpha = sink_metrics.alpha_from_query_weights(attention, visible, include_self)
        first_k = record["first_k"].numpy().mean(-1)
        sink = record["sink_logit"].numpy().mean(-1) if "sink_logit" in record else np.full_like(alpha, np.nan)
        first_id = sequences[index][0]
        first_token = tokenizer.convert_ids_to_tokens(first_id) if tokenizer is not None else str(first_id)
        frames.append(pd.DataFrame({
            "prompt": index,
            "prompt_id": prompts[index].id,
            "domain": prompts[index].domain,
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
            "layer_type": np.repeat(np.array(layer_types[:n_layers], dtype=object), n_heads),
            "alpha": alpha.reshape(-1),
            "first_k_mass": first_k.reshape(-1),
            "sink_logit_mass": sink.reshape(-1),
            "n_visible": np.repeat(np.broadcast_to(visible, attention.shape).sum(-1)[:, 0], n_heads),
            "n_tokens": len(sequences[index]),
            "first_token_id": int(first_id),
            "first_token": str(first_token),
        }))
    return pd.concat(frames, ignore_index=True)


def scan(
    model: LoadedModel | Any,
    texts: Sequence[str | Prompt] | None = None,
    *,
    input_ids: Sequence[Sequence[int]] | None = None,
    bos: str = "auto",
    max_tokens: int | None = 64,
    eps: Sequence[float] = (0.3, 0.8),
    batch_size: int = 8,
    path: str = "auto",
    first_k: int = 4,
    include_self: bool = True,
    chunk_size: int = 1024,
    precision: str = "float32",
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> ScanResult:
    """Measure first-token attention of every head on each prompt.

    ``texts``: strings or `Prompt`s (default: the built-in probe set). ``input_ids``: token ids scanned
    exactly as given (``bos`` is then ignored). ``out``: a run directory written batch by batch;
    ``resume`` continues one that was interrupted.
    """
    loaded = load(model)
    tokenizer = loaded.tokenizer
    if input_ids is not None:
        sequences = [[int(t) for t in seq] for seq in input_ids]
        if any(len(s) == 0 for s in sequences):
            raise InputError("input_ids contains an empty sequence")
        prompts = [Prompt(f"p{i}", "") for i in range(len(sequences))]
        bos_label = "given"
    else:
        if tokenizer is None:
            raise InputError("this model has no tokenizer: pass input_ids=..., or load it with tokenizer=...")
        prompts = _as_prompts(texts)
        mode = parse_bos(bos)
        bos_label = str(mode)
        sequences = []
        for i, prompt in enumerate(prompts):
            try:
                sequences.append(encode(tokenizer, prompt.text, mode, max_tokens))
            except TokenizationError as error:
                raise TokenizationError(f"prompt {i} ({prompt.id}): {error}") from error
    if not sequences:
        raise InputError("nothing to scan: no prompts")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if max(max(s) for s in sequences) >= vocab or min(min(s) for s in sequences) < 0:
        raise InputError(f"token ids must lie in [0, {vocab})")

    info = loaded.info
    meta = provenance(loaded, command, bos=bos_label, max_tokens=max_tokens, first_k=first_k,
                      include_self=include_self, path=path, precision=precision, seed=None)
    run = RunDir(out) if out is not None else None
    done: pd.DataFrame | None = None
    if run is not None:
        digest = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()
        run.start({
            "model": info.name, "revision": info.revision, "bos": bos_label, "max_tokens": max_tokens,
            "first_k": first_k, "include_self": include_self, "n_prompts": len(sequences), "tokens_sha256": digest,
        }, resume)
        done = run.read_parts() if resume else None
    finished = set() if done is None else set(done["prompt"].unique().tolist())
    todo = [i for i in range(len(sequences)) if i not in finished]

    probe = FirstTokenAttention(first_k)
    engine = CaptureEngine(loaded, [probe], path=path, chunk_size=chunk_size, precision=precision)
    frames = [] if done is None else [done]
    started = time.time()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]scan[/] bos={task.fields[bos]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("prompts"), TimeRemainingColumn()]
    with engine, Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("scan", total=len(sequences), completed=len(finished), bos=bos_label)
        for batch in _batches(todo, [len(s) for s in sequences], batch_size):
            longest = max(len(sequences[i]) for i in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(sequences[index])] = torch.tensor(sequences[index])
                mask[row, : len(sequences[index])] = 1
            try:
                engine.forward(ids, mask)
            except torch.OutOfMemoryError as error:
                raise SinkscopeError(f"out of memory on a batch of {len(batch)} x {longest} tokens; "
                                     "lower --batch-size or --max-tokens (finished batches are saved)") from error
            part = _rows_for_batch(probe, batch, sequences, prompts, info.layer_types, tokenizer, include_self)
            if run is not None:
                run.write_part(batch[0], part)
            frames.append(part)
            bar.advance(task, len(batch))
    frame = pd.concat(frames, ignore_index=True).sort_values(["prompt", "layer", "head"], ignore_index=True)
    meta["kernels"] = sorted(engine.kernels_used)
    meta["seconds"] = round(time.time() - started, 3)
    result = ScanResult(frame, meta)
    if out is not None:
        result.save(out, eps)
    return result
