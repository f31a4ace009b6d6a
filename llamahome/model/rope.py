"""Rotary position embeddings (Su et al. 2021) with Llama 3's frequency scaling.

Layout: a head vector's first half holds the real parts and its second half the imaginary
parts ("rotate half"), the layout of Hugging Face's Llama. HF checkpoints are already permuted
into it from Meta's interleaved layout, so import and export copy q/k weights unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from llamahome.errors import ConfigError

ROPE_TYPES = ("default", "llama3")


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: dict[str, Any] | None = None) -> np.ndarray:
    """The [head_dim // 2] angular frequencies theta^(-2i/head_dim), scaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq.astype(np.float32)
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling).astype(np.float32)
    raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported; use one of "
                      f"{ROPE_TYPES} (LlamaConfig.rope_scaling)")


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's scaling (Meta's llama-models `apply_scaling`, HF `_compute_llama3_parameters`).

    Wavelengths longer than original_max / low_freq_factor are divided by `factor`, shorter
    than original_max / high_freq_factor are kept, and the band between is interpolated.
    """
    try:
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"rope_scaling of type llama3 needs key {e.args[0]!r} "
                          f"(LlamaConfig.rope_scaling = {scaling})") from None
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sin, cos) of positions [B, T] times frequencies: each [B, T, head_dim // 2], float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, heads, head_dim] by the angles (sin, cos) [B, T, head_dim // 2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
