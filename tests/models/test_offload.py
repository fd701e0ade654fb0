"""--device auto: a model spread over CPU and disk (accelerate's offload) measures exactly what it measures
in one piece."""

from __future__ import annotations

import pytest
import torch

import sinkscope as ss
from helpers import SENTENCES

pytest.importorskip("accelerate")


def _alpha(lm) -> torch.Tensor:
    frame = ss.scan(lm, SENTENCES[:3], bos="add", progress=False).to_frame()
    return torch.tensor(frame["alpha"].to_numpy())


def test_cpu_and_disk_offload_give_the_same_alpha(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    whole = ss.load(model_dir)
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    # a CPU budget of about half the model forces accelerate to put the later layers on disk
    spread = ss.load(model_dir, device="auto", max_memory={"cpu": size // 2})
    placed = set(map(str, spread.model.hf_device_map.values()))
    assert "disk" in placed and "cpu" in placed, spread.model.hf_device_map
    assert spread.info.device == "cpu+disk"
    assert torch.equal(_alpha(whole), _alpha(spread))


def test_auto_on_a_machine_without_gpu_keeps_the_model_on_the_cpu(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    spread = ss.load(model_dir, device="auto")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto puts the model there")
    assert spread.info.device == "cpu"
    assert torch.equal(_alpha(ss.load(model_dir)), _alpha(spread))
