"""Bad input to the explain commands, through the command line on a tiny local model: one line on stderr,
exit code 2, no traceback. And inf/NaN in the residual stream (a float16 overflow) named by its depth."""

from __future__ import annotations

import os

import pytest
import torch

import sinkscope.cli
from helpers import SENTENCES, invoke, refused_line, tiny_model, word_tokenizer

TEXT = SENTENCES[0]  # 12 word tokens
COMMANDS = {  # each command with arguments that make it cheap on the tiny model
    "smoothing": ["--limit", "2"],
    "noop": ["--limit", "2"],
    "conditional-heads": ["--trigger", "the"],
    "rank-collapse": ["--limit", "2"],
    "repr-collapse": ["--length", "4"],
    "massive": ["--limit", "2"],
    "perturb": ["--text", TEXT, "--swap", "cat=dog"],
    "oversquash": ["--text", TEXT, "--probes", "2"],
}
RESIDUAL_COMMANDS = ["rank-collapse", "repr-collapse", "massive", "perturb", "oversquash"]


@pytest.mark.parametrize("command,args", [
    ("smoothing", ["--max-tokens", "300"]),
    ("noop", ["--max-tokens", "300"]),
    ("rank-collapse", ["--max-tokens", "300"]),
    ("massive", ["--max-tokens", "300"]),
    ("perturb", ["--text", TEXT, "--swap", "cat=dog", "--max-tokens", "300"]),
    ("perturb", ["--text", " ".join([TEXT] * 25), "--swap", "cat=dog"]),  # 300 tokens, no truncation
    ("oversquash", ["--text", TEXT, "--max-tokens", "300"]),
    ("repr-collapse", ["--length", "300"]),
])
def test_input_longer_than_the_context(model_dir, command, args):
    refused_line(invoke(command, "--model", str(model_dir), *args, "--quiet"), "256 positions")


@pytest.mark.parametrize("eps", ["0", "1", "1.5", "-0.2", "nan"])
def test_noop_eps_outside_0_1(model_dir, eps):
    refused_line(invoke("noop", "--model", str(model_dir), f"--eps={eps}", "--quiet"), "--eps")


@pytest.mark.parametrize("swap,message", [
    ("catdog", "--swap must look like old=new"),
    ("a=b=c", "--swap must look like old=new"),
    ("=dog", "--swap needs a word on both sides"),
    ("cat=", "--swap needs a word on both sides"),
    ("cat=cat", "changes nothing"),
    ("lion=dog", "does not occur"),
    ("cat=the dog", "changes the token count"),
])
def test_perturb_bad_swap(model_dir, swap, message):
    refused_line(invoke("perturb", "--model", str(model_dir), "--text", TEXT, "--swap", swap, "--quiet"), message)


@pytest.mark.parametrize("target,message", [
    ("12", "--target 12 is outside the 12 text tokens"),
    ("40", "--target 40 is outside the 12 text tokens"),
    ("-13", "--target -13 is outside the 12 text tokens"),
])
def test_oversquash_bad_target(model_dir, target, message):
    refused_line(invoke("oversquash", "--model", str(model_dir), "--text", TEXT, f"--target={target}", "--quiet"),
                 message)


@pytest.mark.parametrize("probes", ["0", "-1"])
def test_oversquash_bad_probes(model_dir, probes):
    refused_line(invoke("oversquash", "--model", str(model_dir), f"--probes={probes}", "--quiet"), "--probes")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_is_a_file(model_dir, tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused_line(invoke(command, "--model", str(model_dir), *COMMANDS[command], "--out", str(blocker), "--quiet"),
                 "is a file")
    refused_line(invoke(command, "--model", str(model_dir), *COMMANDS[command], "--out", str(blocker / "run"),
                        "--quiet"), "cannot create it")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_is_not_writable(model_dir, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused_line(invoke(command, "--model", str(model_dir), *COMMANDS[command], "--out", str(locked), "--quiet"),
                "not writable")
    finally:
        locked.chmod(0o700)


# -- inf/NaN in the residual stream ------------------------------------------------------------------------------
def overflowing_model(layer: int = 1):
    """A tiny llama whose block ``layer`` writes inf into the residual stream (as a float16 overflow would)."""
    import sinkscope as ss

    lm = ss.load(tiny_model("llama"), tokenizer=word_tokenizer())

    def overflow(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[..., -1, 3] = float("inf")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    lm.model.model.layers[layer].register_forward_hook(overflow)
    return lm


@pytest.mark.parametrize("command", RESIDUAL_COMMANDS)
def test_inf_in_the_residual_stream_names_its_depth(monkeypatch, tmp_path, command):
    lm = overflowing_model(layer=1)
    monkeypatch.setattr(sinkscope.cli, "load_model", lambda *args, **kwargs: lm)
    result = invoke(command, "--model", "tiny", *COMMANDS[command], "--out", str(tmp_path / "run"), "--quiet")
    refused_line(result, "inf/NaN from depth 2 (the output of layer 1)")
    assert "--dtype float32" in result.stderr


def test_inf_is_caught_in_the_python_api_too():
    import sinkscope as ss
    from sinkscope.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="depth 1 \\(the output of layer 0\\)"):
        ss.rank_collapse(overflowing_model(layer=0), SENTENCES[:2], progress=False)
    with pytest.raises(NonFiniteError, match="depth 3 \\(the output of layer 2\\)"):
        ss.perturb(overflowing_model(layer=2), TEXT, swap=("cat", "dog"), progress=False)


def test_finite_check_flags_nan_at_the_embeddings():
    from sinkscope.errors import NonFiniteError
    from sinkscope.experiments.residual import check_residual_finite

    stream = torch.zeros(4, 3, 2, dtype=torch.float16)
    check_residual_finite(stream, "ok")
    stream[0, 1, 1] = float("nan")
    stream[2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="depth 0 \\(the embeddings\\) on, in float16"):
        check_residual_finite(stream, "prompt 0")


def test_inf_in_attention_inputs_names_the_layer_for_scan(monkeypatch, tmp_path):
    """Commands that do not capture the residual stream (scan) stop at the first layer whose attention
    inputs hold inf/NaN, naming it, with one line and exit 2."""
    import sinkscope.cli.scan

    lm = overflowing_model(layer=1)
    monkeypatch.setattr(sinkscope.cli.scan, "load_model", lambda *args, **kwargs: lm)
    result = invoke("scan", "--model", "tiny", "--out", str(tmp_path / "run"), "--quiet")
    refused_line(result, "layer 2: the attention queries hold inf/NaN")
    assert "--dtype float32" in result.stderr
