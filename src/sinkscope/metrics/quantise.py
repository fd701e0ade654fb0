"""Simulated integer quantisation of cached keys and values (quantise, then dequantise), and its bytes.

Asymmetric min-max quantisation, as KIVI and transformers' quantised caches use: within a group of values,
``scale = (max - min) / (2**bits - 1)``, ``q = round((x - min) / scale)`` in ``0 .. 2**bits - 1``, and the
value read back is ``q * scale + min``. A group whose values are all equal is read back exactly.

Where the groups run, for a tensor ``[..., S, D]`` (S tokens of one head, D channels):

- ``axis="token"``: one scale per token, over ``group_size`` consecutive channels (default: all D);
- ``axis="channel"``: one scale per channel, over ``group_size`` consecutive tokens (default: all S).
  KIVI quantises keys this way (outlier channels get their own scale).

The arithmetic is float32 whatever the input dtype; the result comes back in the input dtype. Each group
stores a scale and a minimum (float16 each, `SCALE_BYTES` in all) next to its ``bits``-bit payload.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

BITS = (2, 4, 8)
AXES = ("token", "channel")
SCALE_BYTES = 4  # a float16 scale and a float16 minimum per group


def check_quantiser(bits: int, axis: str, group_size: int | None) -> None:
    """Raise `InputError` for settings the quantiser does not take."""
    if bits not in BITS:
        raise InputError(f"bits must be one of {', '.join(map(str, BITS))} (got {bits}); "
                         "give no bits for full precision")
    if axis not in AXES:
        raise InputError(f"axis must be 'token' or 'channel' (got {axis!r})")
    if group_size is not None and group_size < 1:
        raise InputError(f"the group size must be at least 1 (got {group_size})")


def fake_quantise(x: torch.Tensor, bits: int, axis: str = "token", group_size: int | None = None) -> torch.Tensor:
    """``x`` [..., S, D] quantised to ``bits`` bits and read back (same shape and dtype).

    Groups: see the module docstring. The group size must divide the grouped dimension (D for ``token``,
    S for ``channel``)."""
    check_quantiser(bits, axis, group_size)
    if x.dim() < 2:
        raise ValueError("fake_quantise needs [..., tokens, channels]")
    values = x.float()
    if axis == "channel":
        values = values.transpose(-1, -2)  # [..., D, S]: groups now run along the last dimension
    n = values.shape[-1]
    size = n if group_size is None else group_size
    if n % size:
        raise InputError(f"the group size {size} does not divide the {n} {'channels' if axis == 'token' else 'tokens'}")
    grouped = values.reshape(*values.shape[:-1], n // size, size)
    low = grouped.amin(-1, keepdim=True)
    high = grouped.amax(-1, keepdim=True)
    scale = (high - low) / (2 ** bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is read back as its minimum
    q = torch.clamp(torch.round((grouped - low) / safe), 0, 2 ** bits - 1)
    restored = (q * scale + low).reshape(values.shape)
    if axis == "channel":
        restored = restored.transpose(-1, -2)
    return restored.to(x.dtype)


def payload_bytes(n_values: int, bits: int) -> int:
    """Bytes of ``n_values`` packed ``bits``-bit integers."""
    return math.ceil(n_values * bits / 8)


def quantised_bytes(n_tokens: int, head_dim: int, bits: int, axis: str, group_size: int | None,
                    n_groups: int | None = None) -> int:
    """Bytes of ``n_tokens`` tokens x ``head_dim`` channels of one head held quantised: the payload plus a
    scale and minimum per group. ``axis="token"``: ``head_dim / group_size`` groups per token.
    ``axis="channel"``: ``head_dim`` groups per block of tokens; ``n_groups`` blocks (default: the tokens
    in blocks of ``group_size``, rounded up)."""
    payload = payload_bytes(n_tokens * head_dim, bits)
    if axis == "token":
        groups = n_tokens * (head_dim // (group_size or head_dim))
    else:
        blocks = n_groups if n_groups is not None else math.ceil(n_tokens / (group_size or max(n_tokens, 1)))
        groups = blocks * head_dim
    return payload + groups * SCALE_BYTES
