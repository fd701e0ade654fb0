"""Explicit <bos> handling."""

import pytest

from helpers import word_tokenizer
from sinkscope.errors import TokenizationError
from sinkscope.models.tokens import encode, parse_bos

TEXT = "the cat sat on the mat . then it ran far away"


def test_modes_share_text_tokens_and_differ_only_at_position_zero(tokenizer):
    text_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert encode(tokenizer, TEXT, "auto", None) == [1] + text_ids  # this tokenizer adds <s>
    assert encode(tokenizer, TEXT, "add", None) == [1] + text_ids
    assert encode(tokenizer, TEXT, "strip", None) == text_ids
    assert encode(tokenizer, TEXT, "replace:</s>", None) == [2] + text_ids
    assert encode(tokenizer, TEXT, "replace:eos", None) == [2] + text_ids
    assert encode(tokenizer, TEXT, "replace:\\n", None) == [4] + text_ids
    assert encode(tokenizer, TEXT, "replace:dog", None) == [tokenizer.convert_tokens_to_ids("dog")] + text_ids


def test_max_tokens_counts_the_prefix_and_strip_keeps_the_same_text(tokenizer):
    added = encode(tokenizer, TEXT, "add", 5)
    stripped = encode(tokenizer, TEXT, "strip", 5)
    assert len(added) == 5 and added[1:] == stripped
    assert len(encode(tokenizer, TEXT, "auto", 5)) == 5


def test_literal_bos_at_start_of_text_is_not_kept_by_strip(tokenizer):
    assert encode(tokenizer, "<s> the cat", "strip", None) == encode(tokenizer, "the cat", "strip", None)


def test_errors_are_clear():
    no_bos = word_tokenizer(with_bos=False)
    with pytest.raises(TokenizationError, match="no bos token"):
        encode(no_bos, TEXT, "add")
    with pytest.raises(TokenizationError, match="no bos"):
        encode(no_bos, TEXT, "replace:bos")
    with pytest.raises(TokenizationError, match="unknown --bos"):
        parse_bos("sometimes")
    with pytest.raises(TokenizationError, match="exactly one"):
        encode(word_tokenizer(), TEXT, "replace:the cat")
    with pytest.raises(TokenizationError, match="empty"):
        encode(word_tokenizer(), "   ", "add")
