"""RULER-style suite: the offline generators (length, depth, answers, distractors, determinism) checked by
independent counting with the word tokenizer, RULER's scorer on hand-made answers, the bootstrap interval
by hand, the experiment end to end with a scripted answerer (accuracy, difference, resume), a real greedy
run on a tiny model (positions by alignment), and bad input through the API and the CLI.

Length tolerance: a prompt has at most ``length`` text tokens and adding one more haystack unit (a word of
natural text, a filler or noise line, a distractor needle, a list word) would exceed it.
"""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd
import pytest
import torch

import sinkscope as ss
from helpers import COMMON, invoke, tiny_model, word_tokenizer
from sinkscope.data import ruler as gen
from sinkscope.errors import InputError, TokenizationError
from sinkscope.experiments import base
from sinkscope.experiments.ruler import Ruler, RulerResult
from sinkscope.metrics.stats import bootstrap_interval

DEPTH_TASKS = [name for name, spec in gen.TASKS.items() if spec.uses_depth]


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


@pytest.fixture(scope="module")
def hay():
    return gen.load_haystack()


def unit_tokens(tokenizer, prompt: gen.RulerPrompt, hay: gen.Haystack) -> int:
    """Tokens one more haystack unit would add (whitespace/punctuation pre-tokenizer: no merges)."""
    spec = gen.task(prompt.task)
    if spec.haystack == "essay":
        return count(tokenizer, hay.words[prompt.size])
    if spec.haystack == "repeat":
        return count(tokenizer, gen.REPEAT_LINE)
    if spec.haystack == "needle":
        return count(tokenizer, gen.NEEDLE.format(kind="numbers", key="odd-cat", value="1234567"))
    if spec.haystack == "noise":
        return count(tokenizer, gen.NOISE_LINE)
    return count(tokenizer, "123. word")  # one more list word, once (rare words appear once below 4096)


# -- generators --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(gen.TASKS))
@pytest.mark.parametrize("length", [700, 1500])
def test_generator_reaches_the_requested_length(words, hay, name, length):
    prompt = gen.ruler_prompt(words, name, length, 0.4, trial=1, seed=3)
    assert prompt.n_tokens == count(words, prompt.text)
    assert prompt.n_tokens <= length < prompt.n_tokens + unit_tokens(words, prompt, hay)
    assert prompt.text.endswith(("is", "are", "they are: ", "in the list are:"))


def _context(prompt: gen.RulerPrompt) -> str:
    text = prompt.text
    start = text.index("afterwards.\n") + len("afterwards.\n")
    return text[start:text.rindex("\nWhat ")]


@pytest.mark.parametrize("name", DEPTH_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_target_needle_sits_at_the_requested_depth(words, name, depth):
    prompt = gen.ruler_prompt(words, name, 800, depth, trial=0, seed=1)
    (answer,) = prompt.answers
    target = next(line for line in re.findall(r"One of the special magic numbers for \S+ is: \d+\.", prompt.text)
                  if line.endswith(f"is: {answer}."))
    # its first token, counted independently (tokens of everything before it)
    assert prompt.needle_tokens == (count(words, prompt.text[:prompt.text.index(target)]),)
    context = _context(prompt)
    others = [line for line in re.findall(r"One of the special magic numbers for \S+ is: \d+\.", context)
              if line != target and gen.task(name).haystack != "needle"]
    for line in others:
        context = context.replace(line, "")
    before, after = context.split(target)
    if gen.task(name).haystack == "essay":  # by characters of the natural text, to the nearest sentence end
        longest = max(len(s) for s in re.split(r"(?<=[.!?])\s+", context))
        assert abs(len(before) / (len(before) + len(after)) - depth) <= longest / (len(before) + len(after))
    else:  # by lines
        lines_before, lines_after = before.count("\n"), after.count("\n")
        assert abs(lines_before / (lines_before + lines_after) - depth) <= 0.5 / (lines_before + lines_after) + 1e-9
    assert abs(prompt.needle_depths[0] - depth) < 0.1  # and in tokens of the haystack


def test_niah_answers_are_in_the_prompt_and_distractors_are_not_answers(words):
    single = gen.ruler_prompt(words, "niah_single", 900, 0.3)
    assert len(single.answers) == 1 and re.fullmatch(r"\d{7}", single.answers[0]) and not single.distractors
    multikey = gen.ruler_prompt(words, "niah_multikey", 900, 0.3)
    (key,) = re.findall(r"for (\S+) mentioned", multikey.text)[:1]
    needles = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", multikey.text))
    assert len(needles) == 4 and needles[key] == multikey.answers[0]
    assert sorted(multikey.distractors) == sorted(v for k, v in needles.items() if k != key)
    needle_hay = gen.ruler_prompt(words, "niah_multikey_needles", 900, 0.3)
    lines = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", needle_hay.text)
    assert len(lines) == needle_hay.size + 1 and len({k for k, _ in lines}) == len(lines)  # distinct keys
    assert len(needle_hay.distractors) == needle_hay.size
    multivalue = gen.ruler_prompt(words, "niah_multivalue", 900)
    values = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", multivalue.text)
    assert len({k for k, _ in values}) == 1 and sorted(v for _, v in values) == sorted(multivalue.answers)
    assert "What are all the special magic numbers" in multivalue.text
    multiquery = gen.ruler_prompt(words, "niah_multiquery", 900)
    question = multiquery.text[multiquery.text.rindex("What are all"):]
    found = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", multiquery.text))
    assert len(found) == 4 and all(k in question for k in found)
    assert sorted(found.values()) == sorted(multiquery.answers)
    for prompt in (single, multikey, needle_hay, multivalue, multiquery):
        assert all(a in prompt.text for a in prompt.answers)
        assert all(d in prompt.text for d in prompt.distractors)
        assert not set(prompt.answers) & set(prompt.distractors)
    as_words = gen.ruler_prompt(words, "niah_single", 900, 0.3, values="words")
    assert re.fullmatch(r"[a-z]+-[a-z]+", as_words.answers[0]) and "magic word for" in as_words.text
    as_uuids = gen.ruler_prompt(words, "niah_multivalue", 900, values="uuids")
    assert all(re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", a) for a in as_uuids.answers)


def test_variable_tracking_answers_and_distractor_chain(words):
    prompt = gen.ruler_prompt(words, "vt", 900, trial=2)
    context = prompt.text[prompt.text.rindex("Memorize and track"):]  # after the solved example
    value = re.search(r"assigned the value (\d+) in the text above", context).group(1)
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)", context))
    assert len(assignments) == 10  # two chains of five

    def resolve(name: str) -> str:
        target = assignments[name]
        return resolve(target[4:]) if target.startswith("VAR ") else target

    holding = sorted(name for name in assignments if resolve(name) == value)
    assert holding == sorted(prompt.answers) and len(holding) == gen.VT_HOPS + 1
    assert sorted(prompt.distractors) == sorted(set(assignments) - set(holding))
    assert {resolve(d) for d in prompt.distractors} != {value}
    # the solved example comes first, with three-letter names and its answer
    example = prompt.text[:prompt.text.rindex("Memorize and track")]
    assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n\n$", example)
    assert len(prompt.needle_tokens) == gen.VT_HOPS + 1 and list(prompt.needle_tokens) == sorted(prompt.needle_tokens)


def test_common_words_are_the_most_frequent(words):
    prompt = gen.ruler_prompt(words, "cwe", 1500, trial=1)
    task_part = prompt.text[prompt.text.rindex("Below is a numbered list"):]
    listed = re.findall(r"\d+\. ([a-z]+)", task_part.split("\n")[1])
    counts = Counter(listed)
    assert sorted(prompt.answers) == sorted(w for w, _ in counts.most_common(gen.CWE_COMMON))
    assert all(counts[a] == 6 for a in prompt.answers) and all(counts[d] == 1 for d in prompt.distractors)
    assert set(counts) == set(prompt.answers) | set(prompt.distractors)
    example = prompt.text[:prompt.text.rindex("Below is a numbered list")]
    assert re.search(r"are: 1\. [a-z]+( \d+\. [a-z]+){9}\n$", example)
    assert not set(re.findall(r"\d+\. ([a-z]+)", example)) & set(counts)  # the example's words are others


def test_generators_are_deterministic_per_seed(words):
    first = gen.ruler_prompts(words, list(gen.TASKS), [900], [0.2, 0.8], trials=2, seed=5)
    again = gen.ruler_prompts(words, list(gen.TASKS), [900], [0.2, 0.8], trials=2, seed=5)
    other = gen.ruler_prompts(words, list(gen.TASKS), [900], [0.2, 0.8], trials=2, seed=6)
    assert [p.text for p in first] == [p.text for p in again]
    assert all(a.text != b.text for a, b in zip(first, other, strict=True))
    assert len(first) == 2 * (len(DEPTH_TASKS) * 2 + len(gen.TASKS) - len(DEPTH_TASKS))
    # one trial's keys and values are the same at every length and depth
    short, deep, longer = (gen.ruler_prompt(words, "niah_multikey", n, d, trial=1) for n, d in
                           [(700, 0.2), (700, 0.8), (1200, 0.2)])
    assert short.answers == deep.answers == longer.answers and short.text != deep.text


def test_generator_refuses_bad_input(words):
    with pytest.raises(InputError, match="unknown task 'niah_double'"):
        gen.ruler_prompt(words, "niah_double", 700)
    with pytest.raises(InputError, match=r"depth must lie in \[0, 1\]"):
        gen.ruler_prompt(words, "niah_single", 700, 1.5)
    with pytest.raises(InputError, match="value type"):
        gen.ruler_prompt(words, "niah_single", 700, values="colours")
    with pytest.raises(gen.TooShort, match="needs at least"):
        gen.ruler_prompt(words, "cwe", 100)


# -- scoring -----------------------------------------------------------------------------------------------
def test_score_is_rulers_string_match_all():
    assert gen.score(" 1234567.", ["1234567"]) == 1.0
    assert gen.score(" 7654321.", ["1234567"]) == 0.0
    assert gen.score("", ["1234567"]) == 0.0
    assert gen.score(" 1234567, 7654321 and 5555555", ["1234567", "7654321", "1111111", "5555555"]) == 0.75
    assert gen.score(" Fearless-Ring", ["fearless-ring"]) == 1.0  # case-insensitive
    assert gen.score("ABCDE\x00FGHIJ\t", ["abcde", "fghij"]) == 1.0  # control characters cleaned
    assert gen.score("12345678", ["1234567"]) == 1.0  # a substring counts, as in RULER
    assert gen.score(" 1. love 2. hate", [f"w{i}" for i in range(8)] + ["love", "hate"]) == 0.2
    with pytest.raises(InputError):
        gen.score("x", [])


def test_bootstrap_interval_by_hand():
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert bootstrap_interval([0.25]) == (0.25, 0.25, 0.25)
    # two values: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    assert bootstrap_interval([0.0, 1.0]) == (0.5, 0.0, 1.0)
    # eight values, half ones: a resampled mean is Binomial(8, 1/2) / 8, whose 2.5% and 97.5% quantiles are 1/8
    # and 7/8 (P(X <= 0) = 0.004 < 0.025 < P(X <= 1) = 0.035); allow one step of resampling noise inward
    mean, low, high = bootstrap_interval([0.0] * 4 + [1.0] * 4)
    assert mean == 0.5 and 0.125 <= low <= 0.25 and 0.75 <= high <= 0.875
    assert bootstrap_interval([0.1, 0.9, 0.4], seed=3) == bootstrap_interval([0.1, 0.9, 0.4], seed=3)


# -- the experiment, scripted ------------------------------------------------------------------------------
def char_tokenizer():
    """One token per printable ASCII character (decodes back to the exact text), `<s>` prepended by default."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", "<s>", "</s>", "<unk>", "\n", *[chr(c) for c in range(32, 127)]]
    backend = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def long_model():
    """A tiny llama with room for a few thousand character tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**COMMON, "vocab_size": 112, "max_position_embeddings": 4096})
    return AutoModelForCausalLM.from_config(config).eval()


SCRIPTED = dict(tasks=["niah_single", "niah_multivalue", "vt", "cwe"], lengths=[700, 2300], depths=[0.5], trials=2)


def scripted(calls: list[int] | None = None):
    """A model whose `generate` answers every expected value with `<bos>` at position 0 and only the first one
    without it (RULER gives partial credit for that)."""
    tokenizer = char_tokenizer()
    loaded = ss.load(long_model(), tokenizer=tokenizer)
    haystack = gen.load_haystack()
    expected = {}
    for name in SCRIPTED["tasks"]:
        for length in SCRIPTED["lengths"]:
            for depth in SCRIPTED["depths"]:
                for trial in range(SCRIPTED["trials"]):
                    try:
                        prompt = gen.ruler_prompt(tokenizer, name, length, depth, trial, 0, "numbers", haystack)
                    except gen.TooShort:
                        continue
                    expected[prompt.text] = prompt.answers

    def generate(input_ids, attention_mask=None, generation_config=None, **_):
        if calls is not None:
            calls.append(1)
        answers = expected[tokenizer.decode(input_ids[0], skip_special_tokens=True)]
        text = " " + ", ".join(answers) if int(input_ids[0, 0]) == tokenizer.bos_token_id else " " + answers[0]
        new = tokenizer(text, add_special_tokens=False)["input_ids"][: generation_config.max_new_tokens - 1]
        return torch.cat([input_ids, torch.tensor([new + [tokenizer.eos_token_id]])], dim=1)

    loaded.model.generate = generate
    return loaded


def test_experiment_scores_accuracy_difference_and_skips():
    result = ss.ruler(scripted(), progress=False, **SCRIPTED)
    assert isinstance(result, RulerResult)
    frame = result.frame
    # vt and cwe cannot fit 700 character tokens with their solved examples: skipped and said so
    assert {(s["task"], s["length"]) for s in result.summary["skipped"]} == {("vt", 700), ("cwe", 700)}
    assert len(frame) == (2 + 2 + 1 + 1) * 2 * 2
    assert list(frame["length"]) == sorted(frame["length"])  # shortest lengths first
    assert (frame.loc[frame["bos"] == "add", "score"] == 1.0).all()
    strip = frame[frame["bos"] == "strip"].groupby("task")["score"].mean().to_dict()
    assert strip == {"niah_single": 1.0, "niah_multivalue": 0.25, "vt": 0.2, "cwe": 0.1}
    assert result.accuracy("niah_multivalue", 2300, "strip") == 0.25
    difference = result.tables["difference"].set_index(["task", "length"])["difference"]
    assert difference[("niah_multivalue", 700)] == 0.75 and difference[("niah_single", 2300)] == 0.0
    # the summary: every task x length cell weighs the same
    cells = frame.groupby(["bos", "task", "length"])["score"].mean().groupby("bos").mean()
    assert result.summary["accuracy"]["strip"]["mean"] == pytest.approx(cells["strip"])
    assert result.summary["difference"]["add - strip"]["mean"] == pytest.approx(1.0 - cells["strip"])
    # needle positions point into the sequence: one later with <bos> than without
    add, stripped = (frame[(frame["bos"] == b) & (frame["task"] == "niah_single")] for b in ("add", "strip"))
    assert (add["needle_position"].to_numpy() == stripped["needle_position"].to_numpy() + 1).all()
    assert (add["text_tokens"].to_numpy() == stripped["text_tokens"].to_numpy()).all()
    assert set(result.figures()) == {"ruler_heatmap"}


def test_experiment_resumes_to_the_same_table(tmp_path, monkeypatch):
    out = tmp_path / "run"
    full = ss.ruler(scripted(), progress=False, **SCRIPTED).frame
    real = base.RunDir.write_batch

    def interrupted(self, index, tables, seconds=None):
        real(self, index, tables, seconds)
        if index == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(base.RunDir, "write_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ss.ruler(scripted(), out=out, progress=False, **SCRIPTED)
    monkeypatch.setattr(base.RunDir, "write_batch", real)
    assert len(list((out / "parts").glob("*.done"))) == 10
    with pytest.raises(InputError, match="trials"):  # a resumed run must have the same settings
        ss.ruler(scripted(), out=out, resume=True, progress=False, **{**SCRIPTED, "trials": 3})
    calls: list[int] = []
    resumed = ss.ruler(scripted(calls), out=out, resume=True, progress=False, **SCRIPTED)
    assert len(calls) == len(full) - 10  # only the units not yet finished
    columns = [c for c in full.columns if c != "seconds"]
    pd.testing.assert_frame_equal(resumed.frame[columns], full[columns])
    loaded = base.Result.load(out)
    assert isinstance(loaded, RulerResult)
    pd.testing.assert_frame_equal(loaded.tables["accuracy"], resumed.tables["accuracy"])
    assert (out / "ruler_heatmap.png").is_file() and (out / "accuracy.csv").is_file()


# -- real greedy decoding on a tiny model ------------------------------------------------------------------
def test_real_greedy_run_on_a_tiny_model_with_positions_by_alignment(words):
    loaded = ss.load(tiny_model("llama"), tokenizer=words)
    result = ss.ruler(loaded, tasks=["niah_single_repeat", "niah_multikey_needles"], lengths=[150], depths=[0.0, 1.0],
                      trials=1, max_new_tokens=3, progress=False)
    frame = result.frame
    assert len(frame) == 2 * 2 * 2 and frame["answer"].map(lambda a: isinstance(a, str)).all()
    assert (frame["new_tokens"] <= 3).all() and (frame["text_tokens"] <= 150).all()
    for row in frame.itertuples():
        prompt = gen.ruler_prompt(words, row.task, 150, row.depth, row.trial)
        prefix = 1 if row.bos == "add" else 0
        assert row.n_tokens == prompt.n_tokens + prefix and row.needle_position == prompt.needle_tokens[0] + prefix
    assert set(result.tables["accuracy"]["bos"]) == {"add", "strip"}
    assert set(result.figures()) == {"ruler_heatmap", "ruler_depth"}  # two depths: a length x depth map too


def test_experiment_refuses_bad_input(words):
    loaded = ss.load(tiny_model("llama"), tokenizer=words)
    with pytest.raises(InputError, match="unknown task 'haystack'"):
        ss.ruler(loaded, tasks=["haystack"], lengths=[150], progress=False)
    with pytest.raises(InputError, match="exceeds the model's 256 positions"):
        ss.ruler(loaded, tasks=["niah_single_repeat"], lengths=[300], progress=False)
    with pytest.raises(InputError, match=r"depth must lie in \[0, 1\]"):
        ss.ruler(loaded, tasks=["niah_single_repeat"], lengths=[150], depths=[-0.1], progress=False)
    with pytest.raises(InputError, match="no task fits"):
        ss.ruler(loaded, tasks=["cwe"], lengths=[150], progress=False)
    with pytest.raises(InputError, match="trials"):
        ss.ruler(loaded, tasks=["vt"], lengths=[150], trials=0, progress=False)
    with pytest.raises(TokenizationError, match="unknown --bos"):
        Ruler(tasks=("vt",), lengths=(150,), bos=("sideways",)).prepare(loaded)


# -- the command -------------------------------------------------------------------------------------------
def test_ruler_command_runs_resumes_and_refuses_bad_input(tmp_path, model_dir):
    out = tmp_path / "out"
    common = ["ruler", "--model", str(model_dir), "--task", "niah_single_repeat", "--length", "120", "--depth", "0.5",
              "--trials", "1", "--max-new-tokens", "2", "--quiet"]
    first = invoke(*common, "--out", str(out))
    assert first.exit_code == 0, first.output
    assert "RULER-style tasks" in first.output and "add - strip" in first.output
    assert (out / "summary.json").is_file() and (out / "ruler_heatmap.png").is_file()
    again = invoke(*common, "--out", str(out), "--resume")
    assert again.exit_code == 0, again.output
    for bad, message in [(["--task", "needle"], "unknown task 'needle'"), (["--length", "5000"], "positions"),
                         (["--depth", "1.5"], "depth must lie in [0, 1]"), (["--resume"], "--resume needs --out")]:
        result = invoke(*common, *bad)
        assert result.exit_code == 2 and message in result.stderr, (bad, result.output)
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
