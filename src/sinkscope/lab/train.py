"""The lab's training loop: small LLaMA-style models, packed data, sink metric tracked as training goes.

Runs as one process or under ``accelerate launch`` (DDP; the same code, `accelerate` does the wrapping).
Every batch is a function of (seed, step) and rows are split over processes, so the global batch — and the
loss curve — does not depend on the number of processes. The loss is summed over tokens and divided by the
global token count, so gradients match a single-process run exactly (up to float summation order).

Run directory::

    config.json         the full TrainConfig
    log.jsonl           per logged step: loss, learning rate, tokens/s         (appended as it goes)
    eval.jsonl          per evaluation: validation loss, probe loss per inference input
    sinks.jsonl         per evaluation x inference input x layer x eps: sink rate, mean alpha
    sinks.csv, sink_rate.png   tidy table and figure, rewritten at every checkpoint and at the end
    checkpoint/         model (safetensors + config + tokenizer: loadable by every sinkscope command),
                        optimizer.safetensors, trainer_state.json (swapped in whole: see `save_checkpoint`)
    .lock               held while a process trains here (`lock_run_dir`)

``resume=True`` continues from ``checkpoint/``: rows logged after it are dropped and recomputed, and the
result is identical to an uninterrupted run, wherever the previous process was killed. SIGTERM and Ctrl-C
stop at the next step boundary with a checkpoint (`StopSignals`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import SinkscopeError
from ..faults import stall_at
from ..rundir import atomic_write_bytes, write_json
from . import data as lab_data
from .config import TrainConfig, train_config
from .models import build_model, count_parameters
from .track import evaluate, token_losses

CHECKPOINT = "checkpoint"
LOGS = ("log.jsonl", "eval.jsonl", "sinks.jsonl")
VALIDATION_SEED_OFFSET = 1_000_003
PROBE_SEED = 20250


class LabRunError(SinkscopeError):
    """A run directory that cannot be started or resumed."""


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    sinks: pd.DataFrame
    evals: pd.DataFrame

    def final_sink_rate(self, inference: str = "bos+text", eps: float = 0.3) -> float:
        rows = self.sinks[(self.sinks.inference == inference) & (self.sinks.eps == eps)]
        last = rows[rows.step == rows.step.max()]
        return float(last.sink_rate.mean())


# -- data ---------------------------------------------------------------------------------------------
def make_source(config: TrainConfig) -> tuple[Any, Any]:
    """(training source, validation source)."""
    spec = config.data
    if spec.kind == "bigram_backcopy":
        source = lab_data.BigramBackcopy(spec.vocab, spec.triggers, (spec.doc_min, spec.doc_max), spec.concentration,
                                         spec.world_seed)
        return source, source  # validation draws fresh documents from other seeds
    corpus = lab_data.text_source(spec.paths, spec.tokenizer, spec.dataset)
    return corpus.split("train"), corpus.split("validation")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr (step counts from 1)."""
    opt = config.optimizer
    if step <= opt.warmup_steps:
        return opt.lr * step / max(opt.warmup_steps, 1)
    progress = (step - opt.warmup_steps) / max(config.steps - opt.warmup_steps, 1)
    floor = opt.lr * opt.min_lr_ratio
    return floor + 0.5 * (opt.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


# -- checkpoints --------------------------------------------------------------------------------------
def save_optimizer(optimizer: torch.optim.Optimizer, model: Any, path: Path) -> None:
    """AdamW state as safetensors (no pickle): ``<param name>.<state key>`` per parameter."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{names[id(param)]}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(path))


def load_optimizer(optimizer: torch.optim.Optimizer, model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, state_key = key.rsplit(".", 1)
        if name not in params:
            raise LabRunError(f"{path}: optimizer state for unknown parameter {name}")
        param = params[name]
        optimizer.state[param][state_key] = value.to(param.device) if state_key != "step" else value


def save_checkpoint(out: Path, model: Any, tokenizer: Any, optimizer: Any, state: dict[str, Any],
                    model_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write to a staging directory, then swap it in: a kill at any point leaves a complete checkpoint,
    the new one or the previous one (`recover_checkpoint` puts the previous one back if the kill came
    between the two renames)."""
    staging = out / f".{CHECKPOINT}.staging"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model.save_pretrained(staging, state_dict=model_state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_optimizer(optimizer, model, staging / "optimizer.safetensors")
        write_json(staging / "trainer_state.json", state)  # last: a staging directory without it is incomplete
        target, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        stall_at(f"checkpoint {state['step']}")
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise LabRunError(f"cannot write the checkpoint in {out}: {error.strerror or error}; free some space or "
                          "fix the permissions, then rerun with --resume (the previous checkpoint is kept)") from None


def recover_checkpoint(out: Path) -> None:
    """Undo a checkpoint swap cut short by a kill: the previous checkpoint goes back in place, a half-written
    staging directory goes away."""
    target, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    if not target.exists() and (old / "trainer_state.json").is_file():
        os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(out / f".{CHECKPOINT}.staging", ignore_errors=True)


def load_checkpoint(out: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    directory = out / CHECKPOINT
    weights = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied output embeddings are stored once; anything else missing means a different model
    missing = [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise LabRunError(f"{directory}: checkpoint does not match the model (missing {missing[:2]}, "
                          f"unexpected {unexpected[:2]})")
    load_optimizer(optimizer, model, directory / "optimizer.safetensors")
    return json.loads((directory / "trainer_state.json").read_text())


# -- logs ---------------------------------------------------------------------------------------------
def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def truncate_logs(out: Path, step: int) -> None:
    """Keep only rows up to `step` (the checkpoint): later ones are recomputed on resume."""
    for name in LOGS:
        rows = [r for r in read_rows(out / name) if r["step"] <= step]
        atomic_write_bytes(out / name, "".join(json.dumps(r) + "\n" for r in rows).encode())


def sink_table(out: Path) -> pd.DataFrame:
    frame = pd.DataFrame(read_rows(out / "sinks.jsonl"))
    if "sink_logit_mass" in frame:  # None (no sink logit in this variant) -> NaN, so the column stays numeric
        frame["sink_logit_mass"] = pd.to_numeric(frame["sink_logit_mass"], errors="coerce")
    return frame


def eval_table(out: Path) -> pd.DataFrame:
    return pd.DataFrame(read_rows(out / "eval.jsonl"))


def write_outputs(out: Path, label: str) -> None:
    from ..report.figures import plot_sink_rate_over_training

    sinks = sink_table(out)
    if sinks.empty:
        return
    atomic_write_bytes(out / "sinks.csv", sinks.to_csv(index=False).encode())
    plot_sink_rate_over_training({label: {label: (sinks, eval_table(out))}}, out / "sink_rate.png")


# -- the run directory -------------------------------------------------------------------------------
def lock_run_dir(out: Path) -> Any:
    """Hold an exclusive lock on the run directory while training: a second process on the same run (a
    ``--resume`` while the first still trains, an orphaned sweep worker) would interleave their writes.
    The operating system drops the lock when the holder exits, however it exits (``kill -9`` too)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return None
    handle = (out / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LabRunError(f"{out} is being trained by another process; wait for it to finish or stop it, "
                          "then --resume") from None
    return handle


def _start_run_dir(out: Path, config: TrainConfig, resume: bool) -> tuple[dict[str, Any] | None, Any]:
    """Check and lock the run directory; returns (the checkpoint state to resume from or None, the lock)."""
    if out.exists() and not out.is_dir():
        raise LabRunError(f"--out {out} is a file, not a run directory")
    saved = out / "config.json"
    # Nothing to resume (a kill before the run's first write, or a first attempt under a retry loop): start it,
    # as the measurement commands do.
    if not saved.is_file():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LabRunError(f"cannot create the run directory {out}: {error.strerror or error}; "
                              "pick another --out") from None
        lock = lock_run_dir(out)
        write_json(saved, config.as_dict())
        return None, lock
    if not resume:
        raise LabRunError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    lock = lock_run_dir(out)
    try:
        previous = json.loads(saved.read_text())
    except (OSError, ValueError) as error:
        raise LabRunError(f"{saved} cannot be read ({error}); it is not a lab run: use another --out") from None
    current = json.loads(json.dumps(config.as_dict()))
    if previous != current:
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        raise LabRunError(f"{out} was started with a different config (differs in {changed}); use another --out")
    recover_checkpoint(out)
    state_file = out / CHECKPOINT / "trainer_state.json"
    return (json.loads(state_file.read_text()) if state_file.is_file() else None), lock


def open_run_dir(accelerator: Any, out: Path, config: TrainConfig, resume: bool) -> tuple[dict[str, Any] | None, Any]:
    """The main process checks, creates and locks the run directory; every process gets the checkpoint
    state. Returns (state, the lock: hold it while training)."""
    state, lock = _start_run_dir(out, config, resume) if accelerator.is_main_process else (None, None)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        state_file = out / CHECKPOINT / "trainer_state.json"
        state = json.loads(state_file.read_text()) if resume and state_file.is_file() else None
    return state, lock


# -- one run in memory --------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training run holds while it trains, besides the step count."""

    config: TrainConfig
    out: Path
    accelerator: Any
    model: Any  # as `accelerator.prepare` returned it (DDP-wrapped under `accelerate launch`)
    optimizer: Any
    tokenizer: Any
    source: Any
    validation: list[lab_data.Batch]  # fixed validation windows
    probes: list[list[int]]  # fixed probe documents for the sink metric
    micro_batches: list[list[int]]  # this process's rows of the global batch, one list per forward pass

    @property
    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)


def process_rows(config: TrainConfig, accelerator: Any) -> list[list[int]]:
    """This process's share of the global batch (by row), cut into micro-batches."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_rows % world:
        raise LabRunError(f"{config.batch_rows} rows per step do not split over {world} processes")
    rows = list(range(rank * config.batch_rows // world, (rank + 1) * config.batch_rows // world))
    micro = config.micro_batch_rows or len(rows)
    return [rows[i:i + micro] for i in range(0, len(rows), micro)]


def start_run(config: TrainConfig, out: Path, accelerator: Any, state: dict[str, Any] | None,
              resume: bool) -> tuple[Run, int]:
    """Data, model and optimizer (restored from the checkpoint when resuming); returns (run, step)."""
    micro_batches = process_rows(config, accelerator)
    source, validation_source = make_source(config)
    model = build_model(config.model, source.vocab_size, config.context_length, source.bos_id, source.eos_id,
                        config.seed)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                  weight_decay=opt.weight_decay)
    step = 0 if state is None else int(load_checkpoint(out, model, optimizer)["step"])
    if accelerator.is_main_process and resume:
        truncate_logs(out, step if state is not None else -1)  # no checkpoint yet: start the logs over
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    tracking = config.tracking
    probe_length = min(tracking.probe_length, config.context_length - 1)
    probes = lab_data.probe_documents(validation_source, tracking.probe_count, probe_length, PROBE_SEED)
    rows = min(config.batch_rows, 8)
    validation = [_to_device(lab_data.make_batch(validation_source, config.seed + VALIDATION_SEED_OFFSET, i,
                                                 range(rows), config.context_length, config.packing),
                             accelerator.device)
                  for i in range(max(1, tracking.validation_windows // rows))]
    run = Run(config, out, accelerator, model, optimizer, source.tokenizer(), source, validation, probes,
              micro_batches)
    return run, step


# -- what the loop calls ------------------------------------------------------------------------------
def train_step(run: Run, step: int) -> tuple[float, float]:
    """Update `step` (counted from 1): every micro-batch forward and backward, then one optimizer step.
    Returns (loss: the global token mean, learning rate)."""
    config, accelerator, model, optimizer = run.config, run.accelerator, run.model, run.optimizer
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = [_to_device(lab_data.make_batch(run.source, config.seed, step, chunk, config.context_length,
                                              config.packing), accelerator.device) for chunk in run.micro_batches]
    local_count = torch.tensor(float(sum(int((b.labels != -100).sum()) for b in batches)), device=accelerator.device)
    global_count = accelerator.reduce(local_count.clone(), reduction="sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(batches):
        # gradients are synchronised once per step, after the last micro-batch
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            micro_loss, _ = token_losses(model, batch)
            # DDP averages gradients over processes: scale so the result is the global token mean
            accelerator.backward(micro_loss * accelerator.num_processes / global_count)
        loss_sum += micro_loss.detach()
    if config.optimizer.grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(loss_sum, reduction="sum") / global_count), lr


def log_step(run: Run, step: int, loss: float, lr: float, seconds: float) -> float:
    """Append the step's row to ``log.jsonl``; returns the throughput (tokens/s)."""
    throughput = run.config.tokens_per_step / max(seconds, 1e-9)
    if run.accelerator.is_main_process:
        append_rows(run.out / "log.jsonl", [{"step": step, "tokens": step * run.config.tokens_per_step,
                                             "loss": loss, "lr": lr, "tokens_per_s": throughput}])
    return throughput


def track(run: Run, step: int) -> None:
    """Validation loss, probe losses and the sink metric of the model as it is after `step` updates."""
    tracking = run.config.tracking
    if run.accelerator.is_main_process:
        losses, sinks = evaluate(run.unwrapped, run.validation, run.probes, tracking.inference, tracking.eps,
                                 run.source.bos_id)
        tokens = step * run.config.tokens_per_step
        append_rows(run.out / "eval.jsonl", [{"step": step, "tokens": tokens, **losses}])
        append_rows(run.out / "sinks.jsonl", [{"step": step, "tokens": tokens, **r} for r in sinks])
    run.accelerator.wait_for_everyone()


def checkpoint(run: Run, step: int, finished: bool) -> None:
    """Model, optimizer state and step (atomically: see `save_checkpoint`), then the run's table and figure."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    full_state = accelerator.get_state_dict(run.model)  # collective under FSDP: every process takes part
    if accelerator.is_main_process:
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate wraps it
        state = {"step": step, "tokens": step * run.config.tokens_per_step, "finished": finished,
                 "parameters": count_parameters(run.unwrapped)}
        save_checkpoint(run.out, run.unwrapped, run.tokenizer, optimizer, state, full_state)
        write_outputs(run.out, run.config.name)
    accelerator.wait_for_everyone()


# -- the loop -----------------------------------------------------------------------------------------
def train(config: TrainConfig | dict[str, Any], out: str | Path, *, resume: bool = False, progress: bool = True,
          cpu: bool | None = None, stop_after: int | None = None) -> TrainResult:
    """Train one model, tracking the sink metric; see the module docstring for what is written.

    ``stop_after``: stop (with a checkpoint) after this many steps of *this* invocation — for tests of
    resuming, and for splitting a long run over sessions. SIGTERM and Ctrl-C stop at the next step
    boundary, with a checkpoint, and raise `KeyboardInterrupt` (see `StopSignals`).
    """
    from accelerate import Accelerator

    config = config if isinstance(config, TrainConfig) else train_config(config)
    out = Path(out)
    accelerator = Accelerator(cpu=(not torch.cuda.is_available()) if cpu is None else cpu)
    state, lock = open_run_dir(accelerator, out, config, resume)
    try:
        if state is not None and state.get("finished") and state["step"] >= config.steps:
            accelerator.wait_for_everyone()
            return _result(out, state, 0.0)
        run, step = start_run(config, out, accelerator, state, resume)
        return train_loop(run, step, progress, stop_after)
    finally:
        if lock is not None:
            lock.close()


def train_loop(run: Run, step: int, progress: bool, stop_after: int | None) -> TrainResult:
    """From `step` to the last step: update, log, evaluate and checkpoint when due, stop when signalled."""
    from ..experiments.base import progress_bar

    config, accelerator = run.config, run.accelerator
    if step == 0:
        track(run, 0)
        stall_at("step 0")
    started, first_step = time.time(), step
    every, checkpoint_every = config.tracking.every, config.tracking.checkpoint_every
    with progress_bar("train", progress and accelerator.is_main_process) as bar, StopSignals() as stop:
        task = bar.add_task(config.name, total=config.steps, completed=step)
        while step < config.steps and not stop.agreed(accelerator):
            if stop_after is not None and step - first_step >= stop_after:
                break
            step += 1
            tick = time.time()
            loss, lr = train_step(run, step)
            throughput = log_step(run, step, loss, lr, time.time() - tick)
            bar.update(task, completed=step,
                       description=f"{config.name} loss {loss:.3f} {throughput / 1000:.1f}k tok/s")
            if step % every == 0 or step == config.steps:
                track(run, step)
            if step % checkpoint_every == 0 and step < config.steps:
                checkpoint(run, step, finished=False)
            stall_at(f"step {step}")
        # A finished step is never lost: the last completed step is checkpointed on every way out.
        checkpoint(run, step, finished=step >= config.steps)
    if stop.requested is not None and step < config.steps:
        raise KeyboardInterrupt
    return _result(run.out, {"step": step, "tokens": step * config.tokens_per_step}, time.time() - started)


class StopSignals:
    """SIGTERM (a batch scheduler's stop, `kill`) and Ctrl-C end the run at the next step boundary, with a
    checkpoint of the last finished step.

    The handlers only record the signal: an exception raised from a handler can land anywhere, e.g. inside
    ``optimizer.step()`` after some parameters moved, and the checkpoint would then hold update N+1 labelled
    N. A second Ctrl-C stops at once (the previous checkpoint stays as it was)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def agreed(self, accelerator: Any) -> bool:
        """Whether to stop now; under several processes all stop at the same step if any was signalled."""
        wanted = self.requested is not None
        if accelerator.num_processes == 1:
            return wanted
        flag = torch.tensor(float(wanted), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _to_device(batch: lab_data.Batch, device: torch.device) -> lab_data.Batch:
    return lab_data.Batch(*(None if t is None else t.to(device) for t in
                            (batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask, batch.segments)))


def _result(out: Path, state: dict[str, Any], seconds: float) -> TrainResult:
    return TrainResult(out, int(state["step"]), int(state["tokens"]), seconds, sink_table(out), eval_table(out))
