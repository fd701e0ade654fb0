"""Shared fixtures."""

import os

import pytest
from hypothesis import settings

# property tests: the same examples on every run and no per-example deadline (CI machines are busy)
settings.register_profile("sinkscope", derandomize=True, deadline=None, database=None)
settings.load_profile("sinkscope")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SENTENCES, tiny_model, word_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny llama and its tokenizer saved as a local model directory (read-only for tests)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    """The test sentences as a prompt file, one per line."""
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path
