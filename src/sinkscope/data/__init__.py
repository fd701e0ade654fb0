"""Data: the built-in probe set and prompt files."""

from .prompts import Prompt, probe_set, read_prompts

__all__ = ["Prompt", "probe_set", "read_prompts"]
