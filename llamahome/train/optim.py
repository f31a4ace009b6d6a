"""Optimizers and learning-rate schedules, all Optax, each a gin configurable.

    build_optimizer.optimizer = @adamw        # or @lion, @adafactor, @sgd
    build_optimizer.schedule = @warmup_cosine # or @warmup_linear, @warmup_stable_decay, @constant
    build_optimizer.clip_norm = 1.0
    adamw.weight_decay = 0.1
    warmup_cosine.warmup_steps = 100

The chain is: clip by global norm -> optimizer with decoupled weight decay, which is masked
off norms and biases (`decay_mask`). The peak learning rate and the step count come from the
train job (`train.learning_rate`, `train.steps`). Gradient accumulation happens in the train
step (llamahome/train/step.py), not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gin
import jax
import optax
from jax.sharding import PartitionSpec

Mask = Any  # a pytree of bools like params, or a function params -> that tree


def _warmup(warmup_steps: int, total_steps: int) -> int:
    return max(0, min(warmup_steps, total_steps - 1))


@gin.configurable
def constant(peak_value: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup from 0, then `peak_value` forever."""
    warmup = _warmup(warmup_steps, total_steps)
    return optax.join_schedules([optax.linear_schedule(0.0, peak_value, warmup),
                                 optax.constant_schedule(peak_value)], [warmup])


@gin.configurable
def warmup_cosine(peak_value: float, total_steps: int, warmup_steps: int = 100,
                  end_factor: float = 0.1) -> optax.Schedule:
    """Linear warmup, then cosine decay to `end_factor * peak_value` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak_value, _warmup(warmup_steps, total_steps),
                                              total_steps, end_value=end_factor * peak_value)


@gin.configurable
def warmup_linear(peak_value: float, total_steps: int, warmup_steps: int = 100,
                  end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup, then linear decay to `end_factor * peak_value` at `total_steps`."""
    warmup = _warmup(warmup_steps, total_steps)
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak_value, warmup),
        optax.linear_schedule(peak_value, end_factor * peak_value, total_steps - warmup)], [warmup])


@gin.configurable
def warmup_stable_decay(peak_value: float, total_steps: int, warmup_steps: int = 100,
                        decay_fraction: float = 0.2, end_factor: float = 0.0) -> optax.Schedule:
    """Warmup, a constant plateau, then linear decay over the last `decay_fraction` of steps (WSD,
    Hu et al. 2024, MiniCPM)."""
    warmup = _warmup(warmup_steps, total_steps)
    decay = max(1, int(decay_fraction * total_steps))
    stable_end = max(warmup, total_steps - decay)
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak_value, warmup),
        optax.constant_schedule(peak_value),
        optax.linear_schedule(peak_value, end_factor * peak_value, total_steps - stable_end)],
        [warmup, stable_end])


@gin.configurable
def adamw(learning_rate: optax.Schedule, decay_mask: Mask, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019)."""
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)


@gin.configurable
def lion(learning_rate: optax.Schedule, decay_mask: Mask, b1: float = 0.9, b2: float = 0.99,
         weight_decay: float = 0.1) -> optax.GradientTransformation:
    """Lion (Chen et al. 2023); use a 3-10x smaller learning rate than AdamW."""
    return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)


@gin.configurable
def adafactor(learning_rate: optax.Schedule, decay_mask: Mask, decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0, factored: bool = True,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adafactor (Shazeer & Stern 2018): factored second moments, no first moment."""
    return optax.adafactor(learning_rate, decay_rate=decay_rate, clipping_threshold=clipping_threshold,
                           factored=factored, multiply_by_parameter_scale=False,
                           weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask)


@gin.configurable
def sgd(learning_rate: optax.Schedule, decay_mask: Mask, momentum: float = 0.9,
        nesterov: bool = False, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and decoupled weight decay."""
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def decay_mask(param_specs: Any) -> Any:
    """True for matrices (>= 2 logical axes besides `layers`), False for norms and biases."""
    def decays(spec: PartitionSpec) -> bool:
        names = [n for n in spec if n != "layers"]
        return len(names) >= 2 and "norm" not in names
    return jax.tree.map(decays, param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def decay_mask_by_ndim(params: Any) -> Any:
    """True for parameters with >= 2 dimensions (for models without logical axis names)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@gin.configurable
def build_optimizer(learning_rate: float, total_steps: int, decay_mask: Mask = decay_mask_by_ndim,
                    optimizer: Callable[..., optax.GradientTransformation] = adamw,
                    schedule: Callable[..., optax.Schedule] = warmup_cosine,
                    clip_norm: float | None = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> optimizer with the scheduled learning rate, the schedule) for `total_steps` steps."""
    lr = schedule(peak_value=learning_rate, total_steps=total_steps)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optimizer(learning_rate=lr, decay_mask=decay_mask))
    return optax.chain(*parts), lr
