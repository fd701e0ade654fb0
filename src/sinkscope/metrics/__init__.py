"""Metrics: pure functions on arrays (no models, no I/O)."""

from .sink import (
    DEFAULT_EPS,
    alpha_from_query_weights,
    alpha_map,
    first_k_mass,
    first_token_alpha,
    head_sink_frequency,
    key_alpha,
    mean_sink_mass,
    sink_rate,
    sink_rate_by_key,
    sink_rate_by_layer,
)

__all__ = [
    "DEFAULT_EPS", "alpha_from_query_weights", "alpha_map", "first_k_mass", "first_token_alpha",
    "head_sink_frequency", "key_alpha", "mean_sink_mass", "sink_rate", "sink_rate_by_key", "sink_rate_by_layer",
]
