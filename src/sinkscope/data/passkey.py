"""Passkey retrieval prompts, generated offline (Mohtashami & Jaggi 2023; the RULER "needle" style).

A five-digit number sits at a chosen depth of repetitive filler text, and the prompt ends with a
question the model completes::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
    you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 48213. Remember it. 48213 is the pass key.
    The grass is green. ...
    What is the pass key? The pass key is

Lengths are counted in tokens of the model's tokenizer (text tokens only, no `<bos>`): the prompt is the
longest one, in whole filler sentences, that does not exceed the target. Depth is the fraction of filler
sentences before the key; the prompt records where the key actually landed, in tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str  # five digits
    n_tokens: int  # text tokens (no special tokens)
    depth: float  # requested depth fraction
    key_token_start: int  # index of the first token of the key sentence
    n_filler: int  # filler sentences in the prompt

    @property
    def actual_depth(self) -> float:
        return self.key_token_start / self.n_tokens


def _compose(n_filler: int, depth: float, key: str) -> tuple[str, str]:
    """(text before the key sentence, full text) with ``n_filler`` filler sentences."""
    before = round(depth * n_filler)
    sentences = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    head = " ".join([PREAMBLE, *sentences[:before]])
    tail = " ".join([KEY_SENTENCE.format(key=key), *sentences[before:], QUESTION])
    return head, f"{head} {tail}"


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_passkey_prompt(tokenizer: Any, n_tokens: int, depth: float, seed: int = 0,
                        key: str | None = None) -> PasskeyPrompt:
    """One prompt of at most ``n_tokens`` text tokens with the key after ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must lie in [0, 1], not {depth}")
    key = key if key is not None else f"{random.Random(seed).randint(10_000, 99_999)}"
    if not re.fullmatch(r"\d{5}", key):
        raise InputError(f"the pass key must be five digits, not {key!r}")
    minimum = _count(tokenizer, _compose(0, depth, key)[1])
    if n_tokens < minimum + 2 * len(FILLER):
        raise InputError(f"a passkey prompt needs at least {minimum + 2 * len(FILLER)} tokens with this tokenizer "
                         f"(asked for {n_tokens})")
    per_sentence = max(1.0, (_count(tokenizer, " ".join(FILLER * 8)) / (8 * len(FILLER))))
    n_filler = max(1, int((n_tokens - minimum) / per_sentence))
    # Sentence-level search from the estimate: the longest prompt that stays within the target.
    while n_filler > 1 and _count(tokenizer, _compose(n_filler, depth, key)[1]) > n_tokens:
        n_filler -= 1
    while _count(tokenizer, _compose(n_filler + 1, depth, key)[1]) <= n_tokens:
        n_filler += 1
    head, text = _compose(n_filler, depth, key)
    # Tokens of the head alone: BPE may merge across the boundary by a token at most.
    return PasskeyPrompt(text=text, key=key, n_tokens=_count(tokenizer, text), depth=float(depth),
                         key_token_start=_count(tokenizer, head), n_filler=n_filler)


def passkey_prompts(tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], trials: int = 1,
                    seed: int = 0) -> list[tuple[int, float, int, PasskeyPrompt]]:
    """Every (length, depth, trial) prompt; each trial has its own key, the same for every length and depth
    of that trial so that cells differ only in where the key sits and how much filler surrounds it."""
    keys = [f"{k}" for k in random.Random(seed).sample(range(10_000, 100_000), trials)]
    return [(int(length), float(depth), trial, make_passkey_prompt(tokenizer, int(length), float(depth), key=key))
            for length in lengths for depth in depths for trial, key in enumerate(keys)]


def score_answer(answer: str, key: str) -> bool:
    """Exact match: the first number in the answer is the key (``"48213."`` yes; ``"482130"``, ``"4821"`` no)."""
    match = re.search(r"\d+", answer)
    return match is not None and match.group(0) == key
