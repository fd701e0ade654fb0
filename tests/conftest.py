"""Shared fixtures."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import word_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return word_tokenizer()
