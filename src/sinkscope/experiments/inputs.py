"""What every experiment reads: prompt lists, `<bos>` conditions, encoding, the text span, batching and
length checks. One place, so that every command treats its input the same way.

The text span: under a `<bos>` condition a sequence is ``prefix + text tokens + suffix`` — the prefix is
the `<bos>` (or a replacement token, or nothing), the suffix whatever a tokenizer appends by default
(an `<eos>` with ``--bos auto``). `text_span` finds the text tokens by aligning the sequence with the
text's own tokens, never by length arithmetic, so conditions are compared on the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attention.kernels import PATHS
from ..conditions import parse_condition, parse_conditions
from ..data import Prompt, probe_set
from ..data.texts import LongText, load_text
from ..errors import InputError, TokenizationError
from ..models.loader import LoadedModel, text_config
from ..models.tokens import encode
from .base import Context, Experiment, ResultT
from .settings import setting

TOKENS_PER_BATCH = 8192  # padded tokens per forward pass: long inputs run one (or a few) at a time
_PROBE_TEXT = "Hello world"


# -- prompts and conditions ------------------------------------------------------------------------
def prompt_list(texts: Sequence[str | Prompt] | str | None = None, limit: int | None = None) -> list[Prompt]:
    """Strings or Prompts as Prompts (default: the built-in probe set), the first ``limit`` of them."""
    if texts is None:
        prompts = probe_set()
    else:
        items = [texts] if isinstance(texts, str) else list(texts)
        prompts = [t if isinstance(t, Prompt) else Prompt(f"p{i}", str(t)) for i, t in enumerate(items)]
    if limit is not None:
        if limit < 1:
            raise InputError("--limit must be at least 1")
        prompts = prompts[:limit]
    if not prompts:
        raise InputError("nothing to measure: no prompts")
    return prompts


def bos_conditions(bos: str | Sequence[str]) -> list[str]:
    """Conditions (`sinkscope.conditions`: what sits at position 0, and an intervention) in their canonical
    spelling, each once; a malformed one raises an error naming it."""
    return [str(c) for c in parse_conditions(bos)]


def require_tokenizer(loaded: LoadedModel, what: str = "this experiment") -> Any:
    if loaded.tokenizer is None:
        raise InputError(f"{what} needs a tokenizer; load the model with tokenizer=...")
    return loaded.tokenizer


# -- encoding and the text span --------------------------------------------------------------------
def text_span(ids: Sequence[int], text_ids: Sequence[int]) -> tuple[int, int]:
    """[start, stop) of the text tokens inside ``ids``: the placement that matches the longest run of the
    text's own tokens ``text_ids`` (the earliest on ties). A prefix before it and a suffix after it
    (an appended `<eos>`, a cut by ``max_tokens``) are not text."""
    best_start, best_length = 0, -1
    for start in range(len(ids)):
        if best_length >= len(ids) - start:  # nothing from here on can match more
            break
        length = 0
        limit = min(len(ids) - start, len(text_ids))
        while length < limit and ids[start + length] == text_ids[length]:
            length += 1
        if length > best_length:
            best_start, best_length = start, length
    if best_length <= 0:
        raise TokenizationError("cannot find the text tokens in this sequence (the tokenizer changes them under "
                                "this <bos> condition); use --bos add, strip or replace:<token>")
    return best_start, best_start + best_length


@dataclass(frozen=True)
class Encoded:
    """One prompt under one condition: its ids and where its text tokens lie, [text_start, text_stop).
    ``bos`` is the whole condition string (position 0 and any intervention), the ``bos`` column of tables."""

    prompt: int
    bos: str
    ids: list[int]
    text_start: int
    text_stop: int

    @property
    def text_ids(self) -> list[int]:
        return self.ids[self.text_start:self.text_stop]

    def __len__(self) -> int:
        return len(self.ids)


def encode_one(tokenizer: Any, text: str, bos: str, max_tokens: int | None, prompt: int = 0) -> Encoded:
    """One text under one condition, with its text span found by alignment."""
    ids = encode(tokenizer, text, bos, max_tokens)
    start, stop = text_span(ids, encode(tokenizer, text, "strip", None))
    return Encoded(prompt, str(parse_condition(bos)), ids, start, stop)


def encode_prompts(loaded: LoadedModel, prompts: Sequence[Prompt | str], conditions: Sequence[str],
                   max_tokens: int | None) -> list[Encoded]:
    """Every prompt under every condition, condition by condition (prompt order within each)."""
    tokenizer = require_tokenizer(loaded)
    texts = [p.text if isinstance(p, Prompt) else str(p) for p in prompts]
    out = []
    for condition in conditions:
        for index, text in enumerate(texts):
            try:
                out.append(encode_one(tokenizer, text, condition, max_tokens, index))
            except TokenizationError as error:
                label = prompts[index].id if isinstance(prompts[index], Prompt) else str(index)
                raise TokenizationError(f"prompt {index} ({label}): {error}") from error
    return out


def prefix_ids(tokenizer: Any, bos: str) -> list[int]:
    """What a `<bos>` mode puts before the text tokens ([] for strip), found by alignment on a probe text."""
    encoded = encode_one(tokenizer, _PROBE_TEXT, bos, None)
    return encoded.ids[:encoded.text_start]


def text_tokens(tokenizer: Any, text: str, needed: int | None = None) -> list[int]:
    """A long text's token ids, no special tokens. With ``needed``, only a long enough head of the text is
    encoded (a few characters per token is plenty; the full text if that falls short)."""
    if not text.strip():
        raise InputError("the text is empty")
    if needed is not None and len(text) > 16 * (needed + 16):
        head = _plain_ids(tokenizer, text[: 16 * (needed + 16)])
        if len(head) >= needed + 16:  # the cut may change the last few tokens only
            return head[:needed]
    return _plain_ids(tokenizer, text)


def long_text(text: str | Path | LongText | None) -> LongText:
    """A long text as given: the text itself (str), a UTF-8 file or ``shakespeare:hamlet,macbeth`` (Path), or
    None for the default (Hamlet)."""
    if isinstance(text, LongText):
        return text
    if isinstance(text, Path):
        return load_text(text)
    if text is None:
        return load_text(None)
    return LongText(text, "string")


def check_windows(window: int, stride: int | None = None, max_windows: int | None = None) -> None:
    """Window settings that cannot work, refused before any model is loaded."""
    if window < 2:
        raise InputError("--window must be at least 2 tokens")
    if stride is not None and stride < 1:
        raise InputError("--stride must be at least 1")
    if max_windows is not None and max_windows < 1:
        raise InputError("--max-windows must be at least 1")


def make_windows(tokens: Sequence[int], window: int, stride: int | None = None,
                 max_windows: int | None = None) -> list[tuple[int, list[int]]]:
    """(start, token ids) of consecutive windows of ``window`` tokens, ``stride`` apart (default: no
    overlap). A text shorter than one window gives one window of all its tokens."""
    check_windows(window, stride, max_windows)
    stride = window if stride is None else stride
    if len(tokens) < 2:
        raise InputError(f"the text has {len(tokens)} token(s); at least 2 are needed")
    starts = list(range(0, len(tokens) - window + 1, stride)) or [0]
    if max_windows is not None:
        starts = starts[:max_windows]
    return [(s, list(tokens[s:s + window])) for s in starts]


def text_windows(tokenizer: Any, text: str, window: int, stride: int | None = None,
                 max_windows: int | None = None) -> list[tuple[int, list[int]]]:
    """The windows of a long text's tokens (only as much of the text is encoded as the windows need)."""
    check_windows(window, stride, max_windows)
    needed = None if max_windows is None else (max_windows - 1) * (stride or window) + window
    return make_windows(text_tokens(tokenizer, text, needed), window, stride, max_windows)


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return ids[1:] if ids and bos_id is not None and ids[0] == bos_id else ids


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Token strings of ids (the ids themselves, as text, without a tokenizer)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def token_label(tokenizer: Any, token_id: int) -> str:
    """A readable label for one token (decoded text, whitespace made visible), e.g. for tick labels."""
    text = tokenizer.decode([int(token_id)])
    return text.replace("\n", "\\n").replace("\t", "\\t").strip() or repr(text)


def first_token_label(tokenizer: Any, prefix: Sequence[int]) -> str:
    """What sits at position 0 before the text, as text ('(first text token)' without a prefix)."""
    return "".join(tokenizer.convert_ids_to_tokens(list(prefix))) if prefix else "(first text token)"


# -- lengths and batches ---------------------------------------------------------------------------
def context_limit(loaded: LoadedModel) -> int | None:
    limit = getattr(text_config(loaded.model), "max_position_embeddings", None)
    return None if limit is None else int(limit)


def check_length(loaded: LoadedModel, length: int, what: str = "a sequence") -> None:
    """Refuse inputs longer than the model's positions (a clear error instead of garbage or a crash)."""
    limit = context_limit(loaded)
    if limit is not None and length > limit:
        raise InputError(f"{what} of {length} tokens exceeds the model's {limit} positions; use shorter inputs")


def check_context(loaded: LoadedModel, lengths: Sequence[int], max_tokens: int | None = None,
                  what: str = "prompt") -> None:
    """Refuse a ``--max-tokens`` beyond the model's positions, and any sequence longer than them
    (``lengths``: the sequences' lengths; the error names the first one too long)."""
    limit = context_limit(loaded)
    if limit is None:
        return
    if max_tokens is not None and max_tokens > limit:
        raise InputError(f"--max-tokens {max_tokens} exceeds the model's {limit} positions; use at most {limit}")
    for index, length in enumerate(lengths):
        check_length(loaded, length, f"{what} {index}")


KERNEL_PATHS = PATHS  # every kernel path the engine offers (flex included)
PRECISIONS = ("float32", "float64")


def check_engine_options(path: str, precision: str) -> None:
    if path not in KERNEL_PATHS:
        raise InputError(f"unknown --path '{path}' ({', '.join(KERNEL_PATHS)})")
    if precision not in PRECISIONS:
        raise InputError(f"unknown --precision '{precision}' ({', '.join(PRECISIONS)})")


def check_token_ids(loaded: LoadedModel, sequences: Sequence[Sequence[int]]) -> None:
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if any(len(s) == 0 for s in sequences):
        raise InputError("an input sequence is empty")
    if max(max(s) for s in sequences) >= vocab or min(min(s) for s in sequences) < 0:
        raise InputError(f"token ids must lie in [0, {vocab})")


def length_batches(lengths: Sequence[int], batch_size: int, tokens_per_batch: int = TOKENS_PER_BATCH
                   ) -> list[list[int]]:
    """Consecutive indices grouped into batches of at most ``batch_size`` sequences and about
    ``tokens_per_batch`` padded tokens (a longer sequence runs alone)."""
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        grown = max(longest, length)
        if current and (len(current) >= batch_size or grown * (len(current) + 1) > tokens_per_batch):
            batches.append(current)
            current, grown = [], length
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return batches


def condition_batches(units: Sequence[Encoded], batch_size: int, tokens_per_batch: int = TOKENS_PER_BATCH
                      ) -> list[list[int]]:
    """`length_batches` within each run of units that share a `<bos>` condition (a batch never mixes them)."""
    batches: list[list[int]] = []
    start = 0
    while start < len(units):
        stop = start
        while stop < len(units) and units[stop].bos == units[start].bos:
            stop += 1
        lengths = [len(u) for u in units[start:stop]]
        batches += [[start + i for i in batch] for batch in length_batches(lengths, batch_size, tokens_per_batch)]
        start = stop
    return batches


def pad_right(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, longest], right-padded with id 0 (masked)."""
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


# -- experiments over prompts x conditions -----------------------------------------------------------
@dataclass
class PromptExperiment(Experiment[ResultT]):
    """An experiment whose units are prompts x `<bos>` conditions: one `Encoded` each, condition by
    condition, checked against the model's context. Subclasses add their settings and what they measure."""

    unit_label = "prompts"

    prompts: list[Prompt] = field(default_factory=list)
    bos: tuple[str, ...] = ("add", "strip")
    max_tokens: int | None = setting(64, "tokens per prompt, <bos> included (paper: 64)")

    def __post_init__(self) -> None:  # settings checked before any model loads
        self.bos = tuple(bos_conditions(self.bos))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError("--max-tokens must be at least 1")

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        del settings["prompts"]  # the inputs are fingerprinted by their token ids
        return settings

    def prepare(self, loaded: LoadedModel) -> Context:
        return Context(loaded, self.encoded(loaded))

    def encoded(self, loaded: LoadedModel) -> list[Encoded]:
        """The units: every prompt under every condition, checked against the model's context."""
        units = encode_prompts(loaded, self.prompts, self.bos, self.max_tokens)
        check_context(loaded, [len(u) for u in units], self.max_tokens)
        return units

    def describe(self, units: Sequence[Encoded]) -> str:
        return f"bos={units[0].bos}"

    def label(self, unit: Encoded) -> str:
        """How an error message names the unit."""
        return f"prompt {unit.prompt} ({self.prompts[unit.prompt].id}), bos={unit.bos}"
