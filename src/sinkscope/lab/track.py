"""What the lab measures every N steps: validation loss, and the sink metric on a fixed probe set.

The sink metric comes from `sinkscope.scan` (the capture engine), so a lab model is measured exactly as any
pretrained model is, attention variant included. Probes are single documents of the validation data, fed
as ``<bos> + text`` and as ``text`` (Barbero et al.'s Table 2 inference inputs; any ``add`` / ``strip``
condition of `sinkscope.conditions`, e.g. ``add+scale:0.5``, may be tracked too); their loss is scored on the
same text tokens in both cases (text[1:]), so the two numbers are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..capture import CaptureEngine
from ..experiments.scan import scan
from .data import Batch, inference_condition, with_inference_input


def token_losses(model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses, number of scored tokens) of one packed batch."""
    output = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                   use_cache=False)
    logits = output.logits.float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100,
                                             reduction="sum")
    return loss, int((batch.labels != -100).sum())


@torch.no_grad()
def validation_loss(model: Any, batches: Sequence[Batch]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        loss, n = token_losses(model, batch)
        total += float(loss)
        count += n
    return total / max(count, 1)


@torch.no_grad()
def probe_loss(model: Any, documents: list[list[int]], mode: str, bos_id: int) -> float:
    """Mean loss on text[1:] of each probe document, with or without a leading <bos>."""
    ids = torch.tensor(with_inference_input(documents, mode, bos_id), device=next(model.parameters()).device)
    condition = inference_condition(mode)
    if condition.intervention is None:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    else:  # the intervention is applied by the capture engine
        with CaptureEngine(model) as engine, engine.intervening(condition):
            logits = engine.forward(ids, logits=True).logits.float()
    offset = 1 if condition.bos == "add" else 0
    targets = ids[:, offset + 1:]
    predictions = logits[:, offset:-1]
    return float(torch.nn.functional.cross_entropy(predictions.flatten(0, 1), targets.flatten()))


def sink_rows(model: Any, documents: list[list[int]], inference: Sequence[str], eps: Sequence[float],
              bos_id: int) -> list[dict[str, Any]]:
    """Tidy rows: one per (inference input, layer, eps) with the sink rate and the mean first-token alpha;
    plus the mean share a learned/implicit sink logit takes, where the variant has one."""
    rows = []
    for mode in inference:
        ids = with_inference_input(documents, mode, bos_id)
        intervention = inference_condition(mode).intervention
        given = "given" if intervention is None else f"given+{intervention}"
        result = scan(model, input_ids=ids, bos=given, max_tokens=None, progress=False, batch_size=len(ids), eps=eps)
        alpha = result.alpha  # [prompts, layers, heads]
        sink_logit = result.sink_logit_mass
        for layer in range(alpha.shape[1]):
            for threshold in eps:
                rows.append({
                    "inference": mode, "layer": layer, "eps": float(threshold),
                    "sink_rate": float((alpha[:, layer] > threshold).mean()),
                    "mean_alpha": float(np.nanmean(alpha[:, layer])),
                    "sink_logit_mass": float(np.nanmean(sink_logit[:, layer])) if sink_logit is not None else None,
                })
    return rows


def evaluate(model: Any, validation: Sequence[Batch], probes: list[list[int]], inference: Sequence[str],
             eps: Sequence[float], bos_id: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(losses, sink rows) of the model as it is now; leaves it in the mode it found it."""
    was_training = model.training
    model.eval()
    try:
        losses = {"validation": validation_loss(model, validation)}
        for mode in inference:
            losses[f"probe[{mode}]"] = probe_loss(model, probes, mode, bos_id)
        rows = sink_rows(model, probes, inference, eps, bos_id)
    finally:
        model.train(was_training)
    return losses, rows
