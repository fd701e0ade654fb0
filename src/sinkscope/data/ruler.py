"""RULER-style long-context tasks, generated offline: needles in a haystack, variable tracking, common words.

The task definitions follow RULER (Hsieh et al. 2024, "RULER: What's the real context size of your
long-context language models?", NVIDIA/RULER): ``scripts/data/synthetic/niah.py``,
``variable_tracking.py``, ``common_words_extraction.py``, the task templates and answer prefixes of
``scripts/data/synthetic/constants.py``, the task configurations of ``scripts/synthetic.yaml`` and the
metric of ``scripts/eval/synthetic/constants.py``. What we follow, task by task:

- **niah** (needle in a haystack). A needle is "One of the special magic {numbers} for {key} is: {value}.";
  keys are adjective-noun words ("fearless-ring"), values seven-digit numbers, adjective-noun words or
  UUIDs (``values``). The haystack is natural text (``essay``: RULER uses Paul Graham's essays, we use the
  offline Shakespeare text, whitespace collapsed, needles inserted between sentences), RULER's repeated
  filler line (``repeat``: the passkey's "The grass is green. ..." sentences, one line per repeat) or a
  haystack made of other needles (``needle``: every line is a needle with another key). The prompt is the
  RULER template, a question, and the answer prefix the model continues::

      A special magic number is hidden within the following text. Make sure to memorize it. I will quiz
      you about the number afterwards.
      <haystack with the needle(s)>
      What is the special magic number for fearless-ring mentioned in the provided text? The special
      magic number for fearless-ring mentioned in the provided text is

  The tasks are RULER's configurations: ``niah_single_repeat`` (RULER niah_single_1), ``niah_single``
  (niah_single_2), ``niah_multikey`` (niah_multikey_1: three distractor needles with other keys),
  ``niah_multikey_needles`` (niah_multikey_2: the whole haystack is distractor needles),
  ``niah_multivalue`` (niah_multivalue: one key, four values, all to be returned) and
  ``niah_multiquery`` (niah_multiquery: four keys asked at once).
- **vt** (variable tracking, RULER's ``vt``). Chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ...
  (``hops`` assignments after the value) are hidden, in order, in RULER's repeated noise lines; the
  question asks for every variable that holds the first chain's value. The other chains are distractors
  (RULER's synthetic.yaml runs one chain; we run two by default, so there is something to confuse it
  with). As in RULER, one short solved example (three-letter names) comes first.
- **cwe** (common words extraction, RULER's ``cwe``). A numbered list "1. word 2. word ..." in which
  ``num_cw`` = 10 words appear often and many others rarely; the answer is the ten common words. RULER's
  frequencies: 6 vs 1 below 4096 tokens, 30 vs 3 from 4096 on, after one solved example (20 words at
  3 vs 1, or 40 words at 10 vs 3). Words come from the haystack text's own vocabulary (plain lowercase
  words of 4 to 12 letters) instead of the `wonderwords` lists.

Differences from RULER, all for running offline on small models: lengths count the prompt's text tokens
(RULER's max_seq_length also counts the generated tokens; we check prompt + `<bos>` + generated tokens
against the model's context instead); the target needle of a single-answer NIAH task sits at a requested
``depth`` (fraction of the haystack's sentences or lines before it; RULER draws it from 40 depths), while
distractor needles and the needles of multi-value / multi-query tasks are placed at random depths from
RULER's grid, as in RULER; the variable-tracking example is five noise lines long (RULER fills 500
tokens, more than a 512-token prompt has); "assigned" is spelled correctly.

Every random choice comes from ``random.Random`` seeded by (seed, task, trial), so a prompt is the same
for a given seed, and one trial's keys and values are the same at every length and depth. The haystack
size is searched so that the prompt has at most ``length`` text tokens and at least ``length`` minus one
haystack unit (a word of natural text, one filler or noise line, one distractor needle, one list entry).

Scoring is RULER's ``string_match_all``: the fraction of expected strings found (case-insensitive, as
substrings) in the answer, after RULER's clean-up of control characters — partial credit on tasks with
several expected values.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .passkey import FILLER
from .texts import LongText, load_text

# RULER's needle depths: np.round(np.linspace(0, 100, 40)) percent.
DEPTH_GRID = tuple(round(100 * i / 39) / 100 for i in range(40))
VALUE_TYPES = ("numbers", "words", "uuids")
REPEAT_LINE = " ".join(FILLER)  # RULER's "repeat" haystack line = the passkey's filler sentences
NOISE_LINE = REPEAT_LINE + "\n"  # RULER's variable-tracking noise

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_PLURAL = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} "
               "for {query} mentioned in the provided text? The special magic {kind} for {query} mentioned in the "
               "provided text are")
NIAH_SINGULAR = ("A special magic {kind} is hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\nWhat is the special magic {kind} for "
                 "{query} mentioned in the provided text? The special magic {kind} for {query} mentioned in the "
                 "provided text is")
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above. Answer: "
               "According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
               "the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the {k} most common words in the "
                "above list? Answer: The top {k} words that appear most often in the list are:")

# Key (and word-value) parts: adjective-noun pairs, as RULER's wonderwords keys ("fearless-ring").
ADJECTIVES = (
    "able", "acid", "agile", "amber", "ancient", "angry", "arctic", "ashen", "awake", "bold", "brave", "brief",
    "bright", "brisk", "bronze", "calm", "candid", "cheap", "civil", "clever", "cold", "cosmic", "crisp", "cruel",
    "curly", "damp", "dark", "deep", "dense", "dizzy", "dusty", "eager", "early", "elder", "empty", "exotic",
    "faint", "fancy", "fearless", "fierce", "flat", "fluffy", "frozen", "gentle", "giant", "glossy", "golden",
    "grand", "greasy", "green", "grumpy", "hollow", "honest", "humble", "hungry", "icy", "idle", "jolly", "keen",
    "lazy", "lively", "lonely", "loud", "lucky", "lunar", "mellow", "merry", "misty", "modern", "muddy", "narrow",
    "neat", "nimble", "noisy", "odd", "orange", "pale", "plain", "polite", "proud", "purple", "quick", "quiet",
    "rapid", "rare", "rusty", "salty", "scarlet", "shiny", "silent", "silver", "sleepy", "slim", "smooth",
    "solar", "sour", "spicy", "steady", "sticky", "stormy", "sunny", "swift", "tame", "tidy", "tiny", "tough",
    "vast", "velvet", "vivid", "warm", "wary", "wicked", "wild", "windy", "wise", "witty", "wooden", "young",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "bakery", "banjo", "barrel", "basket", "beacon", "bicycle", "blanket",
    "bottle", "bridge", "bucket", "button", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cello",
    "cherry", "chimney", "circus", "cloud", "comet", "compass", "cookie", "crater", "crayon", "desert", "dolphin",
    "dragon", "drum", "engine", "falcon", "feather", "fiddle", "forest", "fossil", "garden", "glacier", "goblet",
    "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle", "ladder", "lantern", "lemon", "magnet",
    "marble", "meadow", "mirror", "monkey", "mountain", "needle", "oyster", "paddle", "parrot", "pencil",
    "pepper", "piano", "pillow", "planet", "pocket", "puzzle", "quilt", "rabbit", "radio", "ribbon", "river",
    "rocket", "saddle", "sandal", "scooter", "shovel", "spider", "spoon", "statue", "stone", "sweater", "teapot",
    "tiger", "timber", "tractor", "trumpet", "tunnel", "turtle", "umbrella", "valley", "violin", "wagon",
    "walnut", "window", "wizard", "yacht", "zebra",
)


@dataclass(frozen=True)
class Task:
    """One RULER task configuration."""

    name: str
    kind: str  # niah | vt | cwe
    ruler: str  # the RULER configuration it follows
    haystack: str = "essay"  # niah: essay | repeat | needle; vt: noise; cwe: list
    keys: int = 1  # niah: needles with distinct keys
    values: int = 1  # niah: values per key
    queries: int = 1  # niah: keys asked for

    @property
    def uses_depth(self) -> bool:
        """The task has one target needle whose depth is set (the others are placed at random, as in RULER)."""
        return self.kind == "niah" and self.queries * self.values == 1


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("niah_single_repeat", "niah", "niah_single_1", haystack="repeat"),
    Task("niah_single", "niah", "niah_single_2"),
    Task("niah_multikey", "niah", "niah_multikey_1", keys=4),
    Task("niah_multikey_needles", "niah", "niah_multikey_2", haystack="needle"),
    Task("niah_multivalue", "niah", "niah_multivalue", values=4),
    Task("niah_multiquery", "niah", "niah_multiquery", keys=4, queries=4),
    Task("vt", "vt", "vt", haystack="noise"),
    Task("cwe", "cwe", "cwe", haystack="list"),
)}
ANSWER_SLACK = 8  # tokens an answer gets beyond the expected answer written out once
VT_CHAINS, VT_HOPS = 2, 4
CWE_COMMON = 10
VT_EXAMPLE_NOISE = 5


class TooShort(InputError):
    """The requested length cannot hold the task's fixed parts with this tokenizer."""


def task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name]


# -- the haystack text -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Haystack:
    """Natural text for the `essay` haystack (whitespace-collapsed words, as RULER splits its essays) and its
    vocabulary for common-words lists."""

    words: tuple[str, ...]
    vocabulary: tuple[str, ...]  # distinct plain lowercase words of 4-12 letters, sorted
    source: str

    @functools.cached_property
    def text(self) -> str:
        return " ".join(self.words)


def haystack_from_text(text: LongText) -> Haystack:
    words = tuple(re.sub(r"\s+", " ", text.text).strip().split(" "))
    vocabulary = sorted({w for w in (word.rstrip(".,;:!?") for word in words) if re.fullmatch(r"[a-z]{4,12}", w)})
    if len(words) < 50 or len(vocabulary) < 50:
        raise InputError(f"{text.source}: too little text for a haystack (at least 50 words and 50 distinct ones)")
    return Haystack(words, tuple(vocabulary), text.source)


@functools.lru_cache(maxsize=4)
def load_haystack(path: str | None = None) -> Haystack:
    """The haystack: a user's text file, or the offline default (Hamlet, from the `shakespeare` package)."""
    return haystack_from_text(load_text(Path(path) if path is not None else None))


# -- prompts -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RulerPrompt:
    """One prompt: its text, what the answer must contain, and where the needles sit (in text tokens)."""

    task: str
    length: int  # requested text tokens
    depth: float | None  # requested depth of the target needle (None: RULER's random placement)
    trial: int
    text: str
    answers: tuple[str, ...]  # every one must appear in the answer
    distractors: tuple[str, ...]  # values in the prompt that are not answers
    n_tokens: int  # text tokens (no special tokens)
    needle_tokens: tuple[int, ...]  # first text token of each target needle (niah, vt); () for cwe
    context_tokens: tuple[int, int]  # [start, stop) of the haystack in text tokens
    size: int  # haystack units: words, lines, needles, noise lines or list words
    answer_tokens: int  # tokens of the expected answer written out once (as the prompt's format has it)
    answer: str = ""  # the expected answer written out once, as a continuation of the prompt

    @property
    def max_new_tokens(self) -> int:
        """The greedy budget: the expected answer written out once, plus `ANSWER_SLACK` tokens."""
        return self.answer_tokens + ANSWER_SLACK

    @property
    def needle_depths(self) -> tuple[float, ...]:
        """Where each target needle starts, as a fraction of the haystack's tokens."""
        start, stop = self.context_tokens
        return tuple((t - start) / max(1, stop - start) for t in self.needle_tokens)


@dataclass(frozen=True)
class _Composed:
    text: str
    context: tuple[int, int]  # character span of the haystack
    targets: tuple[str, ...]  # target needle strings (located in the text)
    answers: tuple[str, ...]
    distractors: tuple[str, ...]
    answer: str  # the expected answer written out, as a continuation of the prompt


def _rng(seed: int, *parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in (seed, *parts)))  # str seeds hash deterministically


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER: seven digits
    if kind == "words":
        return _word_key(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(draw: Callable[[], str], count: int, taken: set[str], forbidden_text: str = "") -> list[str]:
    out: list[str] = []
    for _ in range(100 * count + 1000):
        if len(out) == count:
            return out
        item = draw()
        if item not in taken and (not forbidden_text or item not in forbidden_text):
            taken.add(item)
            out.append(item)
    raise InputError("cannot draw enough distinct keys/values for this task")


def _insert(units: Sequence[str], placed: Sequence[tuple[float, str]], by_characters: bool = False) -> list[str]:
    """``units`` with each (depth, item) inserted at the unit boundary nearest ``depth``: boundary
    round(depth * len(units)), or with ``by_characters`` the boundary nearest that fraction of the units'
    characters (sentences of natural text differ in length; characters follow tokens closely). Items at the
    same boundary keep their order."""
    if by_characters:
        ends = list(itertools.accumulate(len(u) + 1 for u in units))
        total = ends[-1] if ends else 0
        boundaries = [0, *ends]

        def boundary(depth: float) -> int:
            i = bisect.bisect_left(boundaries, depth * total)
            return min((j for j in (i - 1, i) if 0 <= j < len(boundaries)),
                       key=lambda j: abs(boundaries[j] - depth * total))
    else:
        def boundary(depth: float) -> int:
            return round(depth * len(units))

    out = list(units)
    for position, i in sorted(((boundary(depth), i) for i, (depth, _) in enumerate(placed)), reverse=True):
        out.insert(position, placed[i][1])
    return out


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


class _Niah:
    """The random material of one NIAH trial (independent of the haystack size) and the prompt for a size."""

    def __init__(self, spec: Task, depth: float | None, rng: random.Random, values: str, haystack: Haystack) -> None:
        self.spec, self.values, self.haystack = spec, values, haystack
        forbidden = haystack.text if spec.haystack == "essay" else ""
        taken: set[str] = set()
        self.keys = _distinct(lambda: _word_key(rng), spec.keys, taken, forbidden)
        self.key_values = [_distinct(lambda: _value(rng, values), spec.values, taken, forbidden) for _ in self.keys]
        queried = rng.sample(range(spec.keys), spec.queries)
        self.query_keys = [self.keys[i] for i in queried]
        self.answers = [v for i in queried for v in self.key_values[i]]
        needles = [(k, NEEDLE.format(kind=values, key=key, value=v))
                   for k, key in enumerate(self.keys) for v in self.key_values[k]]
        rng.shuffle(needles)  # as RULER: the needles' order is random
        if spec.uses_depth:
            assert depth is not None
            target = next(n for n in needles if n[0] == queried[0])
            others = [n for n in needles if n is not target]
            self.placed = [(depth, target[1])] + list(zip(rng.sample(DEPTH_GRID, len(others)),
                                                          (n[1] for n in others), strict=True))
        else:
            self.placed = list(zip(rng.sample(DEPTH_GRID, len(needles)), (n[1] for n in needles), strict=True))
        self.targets = [n[1] for n in needles if n[0] in queried]
        self.distractors = [v for k, vs in enumerate(self.key_values) if k not in queried for v in vs]
        self.filler: list[tuple[str, str]] = []  # the `needle` haystack's own needles, drawn as needed
        self._filler_rng, self._taken = rng, taken

    def _filler_needles(self, count: int) -> list[tuple[str, str]]:
        while len(self.filler) < count:
            key = _distinct(lambda: _word_key(self._filler_rng), 1, self._taken)[0]
            value = _distinct(lambda: _value(self._filler_rng, self.values), 1, self._taken)[0]
            self.filler.append((key, value))
        return self.filler[:count]

    def compose(self, size: int) -> _Composed:
        kind = self.values
        if self.spec.haystack == "essay":
            units = _sentences(" ".join(self.haystack.words[:size]))
            context = " ".join(_insert(units, self.placed, by_characters=True))
        elif self.spec.haystack == "repeat":
            context = "\n".join(_insert([REPEAT_LINE] * size, self.placed))
        else:
            lines = [NEEDLE.format(kind=kind, key=k, value=v) for k, v in self._filler_needles(size)]
            context = "\n".join(_insert(lines, self.placed))
        plural = self.spec.queries * self.spec.values > 1
        template = NIAH_PLURAL if plural else NIAH_SINGULAR
        query = self.query_keys[0] if len(self.query_keys) == 1 else \
            ", ".join(self.query_keys[:-1]) + ", and " + self.query_keys[-1]
        head = template.split("{context}")[0].format(kind=kind if plural else kind[:-1])
        text = template.format(kind=kind if plural else kind[:-1], context=context, query=query)
        distractors = list(self.distractors)
        if self.spec.haystack == "needle":
            distractors += [v for _, v in self.filler[:size]]
        return _Composed(text, (len(head), len(head) + len(context)), tuple(self.targets), tuple(self.answers),
                         tuple(distractors), " " + ", ".join(self.answers) + ".")


def _var_names(rng: random.Random, count: int, letters: int, taken: set[str]) -> list[str]:
    return _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), count, taken)


def _chains(rng: random.Random, chains: int, hops: int, letters: int, taken: set[str]
            ) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(variables per chain, statements per chain, value per chain): RULER's generate_chains."""
    names = _var_names(rng, chains * (hops + 1), letters, taken)
    values = _distinct(lambda: str(rng.randint(10_000, 99_999)), chains, set())
    variables = [names[c * (hops + 1):(c + 1) * (hops + 1)] for c in range(chains)]
    statements = [[f"VAR {v[0]} = {values[c]}"] + [f"VAR {v[j + 1]} = VAR {v[j]}" for j in range(hops)]
                  for c, v in enumerate(variables)]
    return variables, statements, values


def _place_chains(size: int, statements: Sequence[Sequence[str]], fractions: Sequence[Sequence[float]]) -> str:
    """Noise lines with each chain's statements inserted in order at the given fractions (RULER's insertion)."""
    sentences = [NOISE_LINE] * size
    for chain, where in zip(statements, fractions, strict=True):
        positions = sorted(int(f * len(sentences)) for f in where)
        for j, (position, statement) in enumerate(zip(positions, chain, strict=True)):
            sentences.insert(position + j, statement)
    return " ".join(sentences).replace(". \n", ".\n")


class _VariableTracking:
    def __init__(self, rng: random.Random, chains: int = VT_CHAINS, hops: int = VT_HOPS) -> None:
        taken: set[str] = set()
        self.variables, self.statements, self.values = _chains(rng, chains, hops, 5, taken)
        self.fractions = [[rng.random() for _ in chain] for chain in self.statements]
        # One solved example first, as in RULER (three-letter names, its own chains).
        ex_vars, ex_statements, ex_values = _chains(rng, chains, hops, 3, taken)
        ex_fractions = [[rng.random() for _ in chain] for chain in ex_statements]
        example = VT_TEMPLATE.format(context=_place_chains(VT_EXAMPLE_NOISE, ex_statements, ex_fractions),
                                     query=ex_values[0], n=hops + 1)
        self.example = example + " ".join(ex_vars[0]) + "\n\n"
        self.hops = hops

    def compose(self, size: int) -> _Composed:
        context = _place_chains(size, self.statements, self.fractions)
        head = self.example + VT_TEMPLATE.split("{context}")[0]
        text = self.example + VT_TEMPLATE.format(context=context, query=self.values[0], n=self.hops + 1)
        return _Composed(text, (len(head), len(head) + len(context)), tuple(self.statements[0]),
                         tuple(self.variables[0]), tuple(v for chain in self.variables[1:] for v in chain),
                         " ".join(self.variables[0]))


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))  # RULER's list format "1. word 2. word"


class _CommonWords:
    def __init__(self, rng: random.Random, length: int, haystack: Haystack, seed: int, trial: int) -> None:
        self.order = rng.sample(haystack.vocabulary, len(haystack.vocabulary))
        # RULER's frequencies: below 4096 tokens a 20-word example (3 vs 1) and 6 vs 1; else 40 (10 vs 3), 30 vs 3.
        example_words, example_common, example_rare, self.common, self.rare = \
            (20, 3, 1, 6, 1) if length < 4096 else (40, 10, 3, 30, 3)
        self.example_order = self.order[-example_words:]  # disjoint from the task's words
        self.limit = len(self.order) - example_words
        self.seed, self.trial = seed, trial
        example = self._list(self.example_order, example_common, example_rare, "example")
        answer = _numbered(self.example_order[:CWE_COMMON])
        self.example = CWE_TEMPLATE.format(context=example, k=CWE_COMMON) + " " + answer + "\n"

    def _list(self, words: Sequence[str], common: int, rare: int, salt: Any) -> str:
        entries = list(words[:CWE_COMMON]) * common + list(words[CWE_COMMON:]) * rare
        _rng(self.seed, "cwe-order", self.trial, salt).shuffle(entries)
        return _numbered(entries)

    def compose(self, size: int) -> _Composed:
        if size > self.limit:
            raise InputError(f"the text's vocabulary has only {self.limit} words for a common-words list; "
                             "give a longer --text or a shorter length")
        words = self.order[:size]
        context = self._list(words, self.common, self.rare, size)
        head = self.example + CWE_TEMPLATE.split("{context}")[0]
        text = self.example + CWE_TEMPLATE.format(context=context, k=CWE_COMMON)
        return _Composed(text, (len(head), len(head) + len(context)), (), tuple(words[:CWE_COMMON]),
                         tuple(words[CWE_COMMON:]), " " + _numbered(words[:CWE_COMMON]))


# -- fitting the length ------------------------------------------------------------------------------------
def count_tokens(tokenizer: Any, text: str) -> int:
    """Text tokens (no special tokens) of ``text`` under ``tokenizer`` (a leading `<bos>` it adds anyway is not
    text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return len(ids) - (1 if ids and bos is not None and ids[0] == bos else 0)


def _fit(compose: Callable[[int], _Composed], tokenizer: Any, length: int, smallest: int, largest: int | None,
         name: str) -> tuple[int, _Composed, int]:
    """The largest haystack size whose prompt has at most ``length`` text tokens: (size, prompt, tokens)."""
    cache: dict[int, tuple[_Composed, int]] = {}

    def measure(size: int) -> tuple[_Composed, int]:
        if size not in cache:
            composed = compose(size)
            cache[size] = (composed, count_tokens(tokenizer, composed.text))
        return cache[size]

    if measure(smallest)[1] > length:
        raise TooShort(f"task {name} needs at least {measure(smallest)[1]} tokens with this tokenizer "
                       f"(asked for {length})")
    low, high = smallest, smallest + 1  # low fits; grow high until it does not
    while measure(high)[1] <= length:
        if largest is not None and high >= largest:
            raise InputError(f"task {name}: the haystack text runs out before {length} tokens "
                             "(give a longer --text or a shorter length)")
        low, high = high, high * 2 if largest is None else min(high * 2, largest)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if measure(middle)[1] <= length else (low, middle)
    composed, tokens = measure(low)
    return low, composed, tokens


def _token_starts(tokenizer: Any, text: str, chars: Sequence[int]) -> list[int]:
    """The index of the text token holding each character offset (the token a span starts in)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = list(encoded["offset_mapping"])
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and encoded["input_ids"] and encoded["input_ids"][0] == bos:
            offsets = offsets[1:]
        ends = [end for _, end in offsets]
        return [bisect.bisect_right(ends, c) for c in chars]
    except (NotImplementedError, KeyError, TypeError):  # a slow tokenizer: count the tokens before each offset
        return [count_tokens(tokenizer, text[:c]) if c > 0 else 0 for c in chars]


# -- the public generator ----------------------------------------------------------------------------------
def check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise InputError(f"depth must lie in [0, 1], not {depth}")
    return float(depth)


def ruler_prompt(tokenizer: Any, task_name: str, length: int, depth: float | None = 0.5, trial: int = 0,
                 seed: int = 0, values: str = "numbers", haystack: Haystack | None = None) -> RulerPrompt:
    """One prompt of task ``task_name`` with at most ``length`` text tokens. ``depth`` places the target needle
    of single-answer NIAH tasks (ignored by the others, whose placement is random as in RULER)."""
    spec = task(task_name)
    if values not in VALUE_TYPES:
        raise InputError(f"unknown value type '{values}' ({', '.join(VALUE_TYPES)})")
    if length < 1:
        raise InputError("a length must be at least 1 token")
    if spec.uses_depth:
        depth = check_depth(0.5 if depth is None else depth)
    else:
        depth = None
    rng = _rng(seed, spec.name, trial)
    if spec.kind == "niah":
        needs_text = spec.haystack == "essay"
        source = haystack or (load_haystack() if needs_text else None)
        material: Any = _Niah(spec, depth, rng, values, source)  # type: ignore[arg-type]
        largest = len(source.words) if needs_text and source is not None else None
    elif spec.kind == "vt":
        material, largest = _VariableTracking(rng), None
    else:
        source = haystack or load_haystack()
        material = _CommonWords(rng, length, source, seed, trial)
        largest = material.limit
    smallest = CWE_COMMON + 1 if spec.kind == "cwe" else 1
    size, composed, tokens = _fit(material.compose, tokenizer, length, smallest, largest, spec.name)
    chars = [composed.text.index(target, composed.context[0]) for target in composed.targets]
    starts = _token_starts(tokenizer, composed.text, [*chars, *composed.context])
    context = (starts[-2], min(starts[-1], tokens))
    answer_tokens = count_tokens(tokenizer, composed.text + composed.answer) - tokens
    return RulerPrompt(spec.name, int(length), depth, int(trial), composed.text, composed.answers,
                       composed.distractors, tokens, tuple(starts[:-2]), context, size, answer_tokens,
                       composed.answer)


def ruler_prompts(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                  trials: int = 1, seed: int = 0, values: str = "numbers", haystack: Haystack | None = None
                  ) -> list[RulerPrompt]:
    """Every task x length x depth x trial prompt (one depth, None, for tasks that do not use it)."""
    prompts = []
    for name in tasks:
        spec = task(name)
        for length in lengths:
            for depth in (depths if spec.uses_depth else [None]):
                for trial in range(trials):
                    prompts.append(ruler_prompt(tokenizer, name, int(length), depth, trial, seed, values, haystack))
    return prompts


def clean_answer(answer: str) -> str:
    """RULER's post-processing of a prediction: control characters become newlines, ends stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", answer.strip()).strip()


def score(answer: str, expected: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of expected strings found in the answer (case-insensitive)."""
    if not expected:
        raise InputError("nothing expected to score against")
    cleaned = clean_answer(answer).lower()
    return sum(1.0 for e in expected if e.lower() in cleaned) / len(expected)
