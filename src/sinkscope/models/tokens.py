"""Explicit, audited `<bos>` handling: how the position-0 part of a condition (`sinkscope.conditions`)
becomes token ids.

Modes:
  ``auto``           the tokenizer's own default (``tokenizer(text)``)
  ``add``            ``<bos>`` + text tokens (error if the tokenizer has no bos token)
  ``strip``          text tokens only, no special tokens
  ``replace:<tok>``  <tok> + text tokens; <tok> is a token string (``\\n``, ``<eos>``), a single-token
                     text, or one of the names ``eos``, ``bos``, ``pad``, ``unk``
``add``, ``strip`` and ``replace`` share the same text tokens, so the conditions differ only by what
sits at position 0. ``max_tokens`` counts the whole sequence, prefix included (Gu et al.'s protocol);
``strip`` keeps the same text tokens as ``add`` (max_tokens - 1).
"""

from __future__ import annotations

import codecs
from typing import Any

from ..conditions import Condition, Position, parse_condition
from ..errors import TokenizationError

SPECIAL_NAMES = ("eos", "bos", "pad", "unk")


def parse_bos(spec: str | Position | Condition) -> Position:
    """The position-0 part of a condition (any intervention it names does not change the tokens)."""
    if isinstance(spec, Position):
        return spec
    return parse_condition(spec).position


def resolve_token(tokenizer: Any, token: str) -> int:
    """Turn the <tok> of ``replace:<tok>`` into one token id, or fail clearly."""
    name = token.strip("<>|").lower()
    if name in SPECIAL_NAMES and token.lower() in (name, f"<{name}>"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is None:
            raise TokenizationError(f"the tokenizer has no {name} token (replace:{token})")
        return int(token_id)
    try:
        text = codecs.decode(token, "unicode_escape") if "\\" in token else token
    except UnicodeDecodeError:
        text = token
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return int(vocab[text])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TokenizationError(f"replace:{token} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return int(ids[0])


def _check_request(text: str, mode: Position, max_tokens: int | None) -> None:
    if mode.kind == "given":
        raise TokenizationError("the condition 'given' takes token ids as they are, not text")
    if not text or not text.strip():
        raise TokenizationError("empty prompt")
    if max_tokens is not None and max_tokens < 2:
        raise TokenizationError("max_tokens must be at least 2")


def encode(tokenizer: Any, text: str, bos: str | Position | Condition = "auto",
           max_tokens: int | None = 64) -> list[int]:
    """Token ids for one prompt under a `<bos>` mode (see module docstring)."""
    mode = parse_bos(bos)
    _check_request(text, mode, max_tokens)
    if mode.kind == "auto":
        if not tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise TokenizationError("prompt has no text tokens (the tokenizer's normaliser removed all of it)")
        ids = list(tokenizer(text)["input_ids"])
        return ids[:max_tokens] if max_tokens else ids
    text_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and text_ids and text_ids[0] == bos_id:
        text_ids = text_ids[1:]  # a literal "<bos>" at the start of the text is not text
    if not text_ids:
        raise TokenizationError("prompt has no text tokens (the tokenizer's normaliser removed all of it)")
    keep = None if max_tokens is None else max_tokens - 1
    text_ids = text_ids[:keep]
    if mode.kind == "strip":
        return text_ids
    if mode.kind == "add":
        if bos_id is None:
            raise TokenizationError("--bos add: this tokenizer has no bos token (use strip or replace:<token>)")
        return [int(bos_id)] + text_ids
    return [resolve_token(tokenizer, mode.token or "")] + text_ids
