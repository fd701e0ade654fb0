"""Runs over several processes: the process group `torchrun` / `accelerate launch` describe in the environment.

The protocol (`base.run`) shards the batches of any experiment: process ``rank`` of ``world`` measures
batches ``rank, rank + world, ...``, writes them to ``--out`` as a single process would (so a killed run
resumes per shard), then every process receives every batch's tables and builds the one result a single
process would have built, row for row; the first process saves it. Batches travel between the processes
of the group as parquet bytes over a gloo group (also on GPU nodes: the tables live on the CPU), so nodes
need no shared file system.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pandas as pd
import torch.distributed as dist

from ..errors import InputError, SinkscopeError

T = TypeVar("T")


@dataclasses.dataclass
class Shard:
    """This process's share of a run: batches ``rank, rank + world, ...``."""

    rank: int = 0
    world: int = 1

    def owns(self, batch: int) -> bool:
        return batch % self.world == self.rank

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment() -> Shard:
    """The shard `torchrun` / `accelerate launch` (or any launcher setting ``RANK``/``WORLD_SIZE``) gave this
    process; one process of one otherwise."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise InputError("RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank} is not a process of WORLD_SIZE={world}")
    return Shard(rank, world)


def is_main_process() -> bool:
    """Whether this process prints and saves (rank 0, or the only process)."""
    return from_environment().main


def local_device(device: str) -> str:
    """``cuda`` means this process's own GPU (``LOCAL_RANK``) when several processes share a node."""
    local = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local is not None and from_environment().world > 1:
        return f"cuda:{int(local)}"
    return device


def join(shard: Shard) -> None:
    """Join the process group of a multi-process run (once per process)."""
    if shard.world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def on_main(shard: Shard, action: Callable[[], T]) -> T | None:
    """Run ``action`` on the first process only; every process raises if it failed there (instead of the
    others waiting for ever), and waits until it is done."""
    if shard.world == 1:
        return action()
    failure: list[Any] = [None]
    value = None
    if shard.main:
        try:
            value = action()
        except SinkscopeError as error:
            failure = [f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        kind, _, message = str(failure[0]).partition(": ")
        raise (InputError(message) if kind == "InputError" else SinkscopeError(message))
    return value


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        dist.barrier()


def _encode(tables: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    encoded = {}
    for name, frame in tables.items():
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        encoded[name] = buffer.getvalue()
    return encoded


def _decode(tables: dict[str, bytes]) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(io.BytesIO(data)) for name, data in tables.items()}


def exchange(shard: Shard, own: dict[int, dict[str, pd.DataFrame]]) -> dict[int, dict[str, pd.DataFrame]]:
    """Every process's batches (``{batch: {table: frame}}``), on every process."""
    if shard.world == 1:
        return own
    gathered: list[Any] = [None] * shard.world
    dist.all_gather_object(gathered, {b: _encode(tables) for b, tables in own.items()})
    merged: dict[int, dict[str, pd.DataFrame]] = {}
    for part in gathered:
        merged.update({int(b): _decode(tables) for b, tables in part.items()})
    return merged


def kernels_used(shard: Shard, mine: list[str]) -> list[str]:
    if shard.world == 1:
        return mine
    gathered: list[Any] = [None] * shard.world
    dist.all_gather_object(gathered, mine)
    return sorted({k for part in gathered for k in part})


__all__ = ["Shard", "barrier", "exchange", "from_environment", "is_main_process", "join", "kernels_used",
           "local_device", "on_main"]
