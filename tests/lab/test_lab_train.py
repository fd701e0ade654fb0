"""The lab's training loop: repeatable, resumable exactly, scaled out over processes with the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import run_to_end
from sinkscope import load
from sinkscope.cli import app
from sinkscope.experiments.scan import scan
from sinkscope.lab import load_sweep_config, load_train_config, train
from sinkscope.lab.config import LabConfigError, train_config
from sinkscope.lab.train import LabRunError, learning_rate

ROOT = Path(__file__).resolve().parents[2]


def small(**changes) -> dict:
    config = {
        "name": "small", "seed": 3, "context_length": 32, "tokens_per_step": 256, "steps": 12,
        "data": {"vocab": 16, "triggers": 2, "doc_min": 8, "doc_max": 40},
        "model": {"hidden_size": 16, "layers": 2, "heads": 2},
        "packing": {"mask": "intra_doc", "bos": "fixed"},
        "optimizer": {"lr": 1e-2, "warmup_steps": 3},
        "tracking": {"every": 4, "probe_count": 4, "probe_length": 16, "checkpoint_every": 4,
                     "validation_windows": 4},
    }
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def logs(out: Path, name: str) -> list[dict]:
    """A run's log rows, without the wall-clock throughput (the one thing that may differ between runs)."""
    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def test_training_is_repeatable_and_writes_its_run_directory(tmp_path):
    first = train(small(), tmp_path / "a", progress=False)
    train(small(), tmp_path / "b", progress=False)
    for name, tensor in weights(tmp_path / "a").items():
        assert torch.equal(tensor, weights(tmp_path / "b")[name]), name
    assert logs(tmp_path / "a", "log.jsonl") == logs(tmp_path / "b", "log.jsonl")
    assert first.steps == 12 and first.tokens == 12 * 256
    assert sorted(first.sinks.step.unique()) == [0, 4, 8, 12]
    assert set(first.sinks.inference) == {"bos+text", "text"} and set(first.sinks.eps) == {0.3, 0.8}
    assert (tmp_path / "a" / "sink_rate.png").stat().st_size > 10_000
    losses = [r["loss"] for r in logs(tmp_path / "a", "log.jsonl")]
    assert losses[-1] < losses[0] - 0.2  # it learns
    # the checkpoint is an ordinary model directory: the rest of sinkscope runs on it
    loaded = load(str(tmp_path / "a" / "checkpoint"))
    result = scan(loaded, input_ids=[[0, 5, 6, 7, 8, 9]], max_tokens=None, progress=False)
    assert result.alpha.shape == (1, 2, 2)
    # a different seed is a different run
    third = train(small(seed=4), tmp_path / "c", progress=False)
    assert not torch.equal(weights(tmp_path / "c")["model.embed_tokens.weight"],
                           weights(tmp_path / "a")["model.embed_tokens.weight"])
    assert third.steps == 12


@pytest.mark.parametrize("variant", ["learned_sink", "sigmoid"])
def test_resume_continues_a_stopped_run_exactly(tmp_path, variant):
    config = small(model={"attention": variant}, tracking={"checkpoint_every": 100})
    train(config, tmp_path / "whole", progress=False)
    # stop after 5 steps (between checkpoints: the stop itself writes one), then again after 4 more
    train(config, tmp_path / "split", progress=False, stop_after=5)
    assert json.loads((tmp_path / "split/checkpoint/trainer_state.json").read_text())["step"] == 5
    train(config, tmp_path / "split", progress=False, resume=True, stop_after=4)
    result = train(config, tmp_path / "split", progress=False, resume=True)
    assert result.steps == 12
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "split")[name]), name
    whole_opt = load_file(str(tmp_path / "whole/checkpoint/optimizer.safetensors"))
    split_opt = load_file(str(tmp_path / "split/checkpoint/optimizer.safetensors"))
    assert whole_opt.keys() == split_opt.keys() and all(torch.equal(whole_opt[k], split_opt[k]) for k in whole_opt)
    for name in ("log.jsonl", "eval.jsonl", "sinks.jsonl"):
        assert logs(tmp_path / "whole", name) == logs(tmp_path / "split", name), name
    # resuming a finished run does nothing
    again = train(config, tmp_path / "split", progress=False, resume=True)
    assert again.steps == 12 and len(logs(tmp_path / "split", "log.jsonl")) == 12


def test_micro_batches_accumulate_to_the_same_step(tmp_path):
    train(small(steps=4), tmp_path / "whole", progress=False)
    train(small(steps=4, micro_batch_rows=3), tmp_path / "micro", progress=False)  # 8 rows: 3 + 3 + 2
    whole = [r["loss"] for r in logs(tmp_path / "whole", "log.jsonl")]
    micro = [r["loss"] for r in logs(tmp_path / "micro", "log.jsonl")]
    assert micro == pytest.approx(whole, rel=1e-5)
    for name, tensor in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(tmp_path / "micro")[name], tensor, atol=1e-5, rtol=1e-4)


def test_run_directory_guards(tmp_path):
    train(small(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(LabRunError, match="--resume"):
        train(small(steps=2), tmp_path / "r", progress=False)
    with pytest.raises(LabRunError, match="different config"):
        train(small(steps=3), tmp_path / "r", progress=False, resume=True)


def test_config_errors_are_clear():
    with pytest.raises(LabConfigError, match="multiple of context_length"):
        train_config(small(tokens_per_step=100))
    with pytest.raises(LabConfigError, match="unknown setting"):
        train_config(small(model={"hidden": 3}))
    with pytest.raises(LabConfigError, match="attention must be one of"):
        train_config(small(model={"attention": "linear"}))
    with pytest.raises(LabConfigError, match="packing mask"):
        train_config(small(packing={"mask": "block"}))
    with pytest.raises(LabConfigError, match="'steps' must be int, not 'abc'"):
        train_config(small(steps="abc"))
    with pytest.raises(LabConfigError, match="'eps' must be list"):
        train_config(small(tracking={"eps": 0.3}))
    assert train_config(small(optimizer={"lr": 1})).optimizer.lr == 1  # an int is a fine float


def test_learning_rate_schedule():
    config = train_config(small(steps=100, optimizer={"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}))
    assert learning_rate(config, 5) == pytest.approx(0.5)
    assert learning_rate(config, 10) == pytest.approx(1.0)
    assert learning_rate(config, 55) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(config, 100) == pytest.approx(0.1)


def test_sweep_files_and_presets(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('name = "mine"\n[base]\nsteps = 5\n[base.model]\nlayers = 1\n'
                    '[[grids]]\ngroup = "ctx"\ncontext_length = [16, 32]\n'
                    '[[grids]]\n"packing.mask" = ["causal", "intra_doc"]\n"packing.bos" = ["fixed", "eos"]\n')
    sweep = load_sweep_config(str(path))
    runs = sweep.runs()
    assert [r.name for r in runs][:2] == ["ctx.context_length=16", "ctx.context_length=32"]
    assert len(runs) == 6 and all(r.config.steps == 5 and r.config.model.layers == 1 for r in runs)
    assert runs[-1].config.packing.mask == "intra_doc" and runs[-1].config.packing.bos == "eos"
    demo = load_sweep_config("cpu-demo").runs()
    contexts = [r.config for r in demo if r.group == "context"]
    assert len({c.tokens_per_step for c in contexts}) == 1 and len({c.context_length for c in contexts}) >= 3
    assert {(r.config.packing.mask, r.config.packing.bos) for r in demo if r.group == "packing"} == {
        ("causal", "fixed"), ("causal", "eos"), ("intra_doc", "fixed"), ("intra_doc", "eos")}
    # a cell identical to a run of another group is trained once
    shared = [r for r in demo if r.directory != r.name]
    assert shared and all(r.config.as_dict() | {"name": 0} == next(
        o for o in demo if o.name == r.directory).config.as_dict() | {"name": 0} for r in shared)
    paper = load_sweep_config("paper").runs()
    assert {r.config.context_length for r in paper if r.group == "context"} == {128, 256, 512, 1024, 2048}
    # the example files in the repository parse
    assert load_train_config(str(ROOT / "examples/lab-run.toml")).data.kind == "text"
    assert len(load_sweep_config(str(ROOT / "examples/lab-sweep.toml")).runs()) == 4
    (tmp_path / "bad.toml").write_text("[base]\nsteps = 5\n[[grids]]\ncontext_length = 32\n")
    with pytest.raises(LabConfigError, match="non-empty list"):
        load_sweep_config(str(tmp_path / "bad.toml"))


def test_cli_train_and_sweep(tmp_path):
    runner = CliRunner()
    config = tmp_path / "run.json"
    config.write_text(json.dumps(small(steps=4)))
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "sink rate" in result.output and (tmp_path / "run/checkpoint/model.safetensors").is_file()
    again = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.output and "Traceback" not in again.output
    missing = runner.invoke(app, ["train", "no-such-preset", "--quiet"])
    assert missing.exit_code == 2 and "presets" in missing.output
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('[base]\nsteps = 3\ncontext_length = 16\ntokens_per_step = 128\n'
                          '[base.model]\nhidden_size = 16\nlayers = 1\nheads = 2\n'
                          '[base.tracking]\nevery = 3\nprobe_count = 2\nprobe_length = 8\n'
                          '[[grids]]\ngroup = "attn"\n"model.attention" = ["softmax", "off_by_one"]\n')
    swept = runner.invoke(app, ["sweep", str(sweep_file), "--out", str(tmp_path / "sweep"), "--jobs", "2",
                                "--quiet"])
    assert swept.exit_code == 0, swept.output
    assert (tmp_path / "sweep/sink_rate_over_training.png").is_file()
    assert (tmp_path / "sweep/final_sink_rate.png").is_file()
    summary = (tmp_path / "sweep/summary.csv").read_text()
    assert "attn.attention=off_by_one" in summary and "attn.attention=softmax" in summary


def test_two_processes_match_one(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo DDP): same global batch, same loss curve and weights."""
    # micro-batches of 2 rows: 4 forward passes per step in one process, 2 per process (under no_sync) in DDP
    config = small(steps=6, micro_batch_rows=2, packing={"mask": "causal", "bos": "eos"}, tracking={"every": 3})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    train(config, tmp_path / "single", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517", "-m", "sinkscope.cli", "train", str(path), "--out", str(tmp_path / "ddp"), "--quiet"]
    finished = run_to_end(command, env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    single = [r["loss"] for r in logs(tmp_path / "single", "log.jsonl")]
    ddp = [r["loss"] for r in logs(tmp_path / "ddp", "log.jsonl")]
    assert len(ddp) == len(single) == 6
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6)
    for name, tensor in weights(tmp_path / "single").items():
        torch.testing.assert_close(weights(tmp_path / "ddp")[name], tensor, atol=1e-5, rtol=1e-4)
    single_sinks = [r["mean_alpha"] for r in logs(tmp_path / "single", "sinks.jsonl")]
    ddp_sinks = [r["mean_alpha"] for r in logs(tmp_path / "ddp", "sinks.jsonl")]
    assert ddp_sinks == pytest.approx(single_sinks, rel=1e-4, abs=1e-5)


# Runs `sinkscope train` with an optimizer hook that sends the process a signal from *inside*
# optimizer.step() of one chosen update (after the weights moved, before the loop counts the step): the worst
# moment for a stop, reached without any timing.
SIGNAL_INSIDE_STEP = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from sinkscope.cli import app
signum, at_update = int(sys.argv.pop(1)), int(sys.argv.pop(1))
updates = 0
def hook(optimizer, args, kwargs):
    global updates
    updates += 1
    if updates == at_update:
        os.kill(os.getpid(), signum)
register_optimizer_step_post_hook(hook)
app(prog_name="sinkscope")
"""


def _signal_inside_step(tmp_path: Path, config: dict, signum: int, at_update: int) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-c", SIGNAL_INSIDE_STEP, str(int(signum)), str(at_update), "train", str(path),
               "--out", str(tmp_path / "stopped"), "--quiet"]
    return run_to_end(command, env)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_step_stops_at_the_step_boundary(tmp_path, signum):
    """SIGTERM (a scheduler's stop) or Ctrl-C landing inside optimizer.step(): the run finishes that update,
    checkpoints it under its own number, exits as an interrupt; resuming gives an uninterrupted run's result."""
    import signal

    config = small(steps=16, tracking={"every": 5, "checkpoint_every": 1000})
    stopped = _signal_inside_step(tmp_path, config, getattr(signal, signum), at_update=7)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    state = json.loads((tmp_path / "stopped/checkpoint/trainer_state.json").read_text())
    assert state["step"] == 7 and not state["finished"]
    assert logs(tmp_path / "stopped", "log.jsonl")[-1]["step"] == 7
    train(config, tmp_path / "stopped", progress=False, resume=True)
    train(config, tmp_path / "whole", progress=False)
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "stopped")[name]), name
    for name in ("log.jsonl", "eval.jsonl", "sinks.jsonl"):
        assert logs(tmp_path / "whole", name) == logs(tmp_path / "stopped", name), name


def test_sigterm_checkpoints_and_resume_finishes_identically(tmp_path):
    """A `sinkscope train` stopped by SIGTERM (as a scheduler stops a job) keeps its last finished step;
    resuming gives the weights, optimizer state and logs of an uninterrupted run. The signal is sent from
    inside optimizer.step() (see SIGNAL_INSIDE_STEP), where an exception raised by the handler would
    checkpoint the weights of update N+1 under the number N."""
    import signal

    config = small(steps=20, tracking={"every": 10, "checkpoint_every": 1000})
    stopped = _signal_inside_step(tmp_path, config, signal.SIGTERM, at_update=13)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    state = json.loads((tmp_path / "stopped/checkpoint/trainer_state.json").read_text())
    assert state["step"] == 13 and not state["finished"]
    assert logs(tmp_path / "stopped", "log.jsonl")[-1]["step"] == state["step"]
    train(config, tmp_path / "stopped", progress=False, resume=True)
    train(config, tmp_path / "whole", progress=False)
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "stopped")[name]), name
    whole_opt = load_file(str(tmp_path / "whole/checkpoint/optimizer.safetensors"))
    stopped_opt = load_file(str(tmp_path / "stopped/checkpoint/optimizer.safetensors"))
    assert all(torch.equal(whole_opt[k], stopped_opt[k]) for k in whole_opt)


def test_sweep_reports_the_final_sink_rate_per_layer_of_each_depth(tmp_path):
    """A depth grid: `final_by_layer.csv`, its figure and `--markdown` hold each run's last evaluation per
    layer, as read straight from the run's own sinks.jsonl."""
    sweep_file = tmp_path / "depth.toml"
    sweep_file.write_text('[base]\nsteps = 4\ncontext_length = 16\ntokens_per_step = 128\n'
                          '[base.model]\nhidden_size = 16\nheads = 2\n'
                          '[base.tracking]\nevery = 2\nprobe_count = 3\nprobe_length = 8\n'
                          '[[grids]]\ngroup = "depth"\n"model.layers" = [1, 3]\n')
    markdown = tmp_path / "depth.md"
    result = CliRunner().invoke(app, ["sweep", str(sweep_file), "--out", str(tmp_path / "sweep"), "--jobs", "2",
                                      "--quiet", "--markdown", str(markdown)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "sweep/final_by_layer.csv")
    for layers in (1, 3):
        rows = logs(tmp_path / f"sweep/depth.layers={layers}", "sinks.jsonl")
        last = [r for r in rows if r["step"] == 4]
        assert len(last) == layers * 2 * 2  # layers x inference inputs x eps
        mine = table[table.label == f"layers={layers}"]
        assert sorted(mine.layer.unique()) == list(range(layers)) and set(mine.layers) == {layers}
        for row in last:
            match = mine[(mine.layer == row["layer"]) & (mine.eps == row["eps"]) & (mine.inference == row["inference"])]
            assert match.sink_rate.item() == pytest.approx(row["sink_rate"])
            assert match.mean_alpha.item() == pytest.approx(row["mean_alpha"])
    assert (tmp_path / "sweep/final_sink_rate_by_layer.png").stat().st_size > 10_000
    text = markdown.read_text()
    assert "| all layers | layer 0 | layer 1 | layer 2 |" in text
    three = next(line for line in text.splitlines() if line.startswith("| depth | layers=3 | bos+text |")
                 and line.count("|") == 8)
    wanted = table[(table.label == "layers=3") & (table.eps == 0.3) & (table.inference == "bos+text")]
    rates = wanted.sort_values("layer").sink_rate
    assert three.split("|")[4:8] == [f" {v:.3f} " for v in [rates.mean(), *rates]]
