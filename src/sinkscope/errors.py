"""User-facing errors. The CLI prints their message on one line and exits with code 2."""


class SinkscopeError(Exception):
    """Base class for errors caused by input, environment or an unsupported model (not bugs)."""


class ModelLoadError(SinkscopeError):
    """A model could not be found, read or built."""


class UnsupportedModelError(SinkscopeError):
    """The model's attention cannot be captured faithfully by sinkscope."""


class TokenizationError(SinkscopeError):
    """A `<bos>` mode or prompt cannot be tokenised as asked."""


class InputError(SinkscopeError):
    """A prompt file, option value or run directory is invalid."""


class NonFiniteError(SinkscopeError):
    """A model produced inf or NaN (e.g. a float16 overflow); the message names where they first appear."""
