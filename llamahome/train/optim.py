"""Optimizers and learning-rate schedules, all Optax, each a gin configurable.

    build_optimizer.optimizer = @adamw        # or @lion, @adafactor, @sgd
    build_optimizer.schedule = @warmup_cosine # or @warmup_linear, @warmup_stable_decay,
                                              # @optim.constant (`@constant` is also gin's)
    build_optimizer.clip_norm = 1.0
    adamw.weight_decay = 0.1
    warmup_cosine.warmup_steps = 100

The chain is: clip by global norm -> optimizer with weight decay (decoupled for AdamW, Lion and
Adafactor; L2 through momentum for SGD, as torch.optim.SGD), masked off norms and biases
(`decay_mask`). The peak learning rate and the step count come from the
train job (`train.learning_rate`, `train.steps`). Gradient accumulation happens in the train
step (llamahome/train/step.py), not here.

Extending a run (resuming it with a different `train.steps`) never raises the learning rate.
Each schedule says in its docstring how it continues from `resume=(step, lr)`: past the warmup,
cosine and linear decay from the current value to the same end value at the new last step,
WSD holds the current value (its stable phase) until its decay window at the end, constant
stays. The plan of a run is its `horizons`, ((0, first total), (step, new total), ...), which
`schedule_horizons` derives on resume and records in the gin config each checkpoint saves,
so resuming an extended run rebuilds the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import PartitionSpec

from llamahome.config.gin_config import gin_bindings

Mask = Any  # a pytree of bools like params, or a function params -> that tree
Resume = tuple[int, float]  # (step, the learning rate the old plan gives it)
Horizon = tuple[int, int]  # (the step a plan starts at, the step it ends at)


def _warmup(warmup_steps: int, total_steps: int) -> int:
    return max(0, min(warmup_steps, total_steps - 1))


def _decay_from(resume: Resume, end_value: float, total_steps: int,
                shape: Callable[[jax.Array], jax.Array]) -> optax.Schedule:
    """From `resume`'s lr at its step down to `end_value` at `total_steps`; `shape` maps 0..1 to 1..0."""
    step, value = resume
    if value <= end_value or total_steps <= step:
        return optax.constant_schedule(value)
    span = total_steps - step

    def schedule(count):
        progress = jnp.clip((count - step) / span, 0.0, 1.0)
        return end_value + (value - end_value) * shape(progress)
    return schedule


def _cosine_shape(progress):
    return 0.5 * (1.0 + jnp.cos(math.pi * progress))


def _linear_shape(progress):
    return 1.0 - progress


@gin.configurable
def constant(peak_value: float, total_steps: int, warmup_steps: int = 0,
             resume: Resume | None = None) -> optax.Schedule:
    """Linear warmup from 0, then `peak_value` forever. Resumed: stays at the current value."""
    if resume is not None:
        return optax.constant_schedule(resume[1])
    warmup = _warmup(warmup_steps, total_steps)
    return optax.join_schedules([optax.linear_schedule(0.0, peak_value, warmup),
                                 optax.constant_schedule(peak_value)], [warmup])


@gin.configurable
def warmup_cosine(peak_value: float, total_steps: int, warmup_steps: int = 100,
                  end_factor: float = 0.1, resume: Resume | None = None) -> optax.Schedule:
    """Linear warmup, then cosine decay to `end_factor * peak_value` at `total_steps`.

    Resumed (`resume=(step, lr)`, an extension past the warmup): a cosine from the current
    value to the same end value at the new `total_steps` (constant if it is already there)."""
    if resume is not None:
        return _decay_from(resume, end_factor * peak_value, total_steps, _cosine_shape)
    return optax.warmup_cosine_decay_schedule(0.0, peak_value, _warmup(warmup_steps, total_steps),
                                              total_steps,
                                              end_value=end_factor * peak_value)


@gin.configurable
def warmup_linear(peak_value: float, total_steps: int, warmup_steps: int = 100,
                  end_factor: float = 0.0, resume: Resume | None = None) -> optax.Schedule:
    """Linear warmup, then linear decay to `end_factor * peak_value` at `total_steps`.

    Resumed (an extension past the warmup): linear from the current value to the same end value
    at the new `total_steps`."""
    if resume is not None:
        return _decay_from(resume, end_factor * peak_value, total_steps, _linear_shape)
    warmup = _warmup(warmup_steps, total_steps)
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak_value, warmup),
        optax.linear_schedule(peak_value, end_factor * peak_value, total_steps - warmup)], [warmup])


@gin.configurable
def warmup_stable_decay(peak_value: float, total_steps: int, warmup_steps: int = 100,
                        decay_fraction: float = 0.2, end_factor: float = 0.0,
                        resume: Resume | None = None) -> optax.Schedule:
    """Warmup, a constant plateau, then linear decay over the last `decay_fraction` of steps (WSD,
    Hu et al. 2024, MiniCPM).

    Resumed (an extension past the warmup): the stable phase continues at the current value
    (the peak, or where the old decay had got to) until the new decay window, which decays from it."""
    warmup = _warmup(warmup_steps, total_steps)
    decay = max(1, int(decay_fraction * total_steps))
    stable_end = max(warmup, total_steps - decay)
    if resume is not None:
        step, value = resume
        stable_end = max(stable_end, step)
        return optax.join_schedules([
            optax.constant_schedule(value),
            optax.linear_schedule(value, min(value, end_factor * peak_value),
                                  max(1, total_steps - stable_end))], [stable_end])
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
    """SGD with (Nesterov) momentum; weight decay adds L2 to the gradient first, as torch.optim.SGD."""
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


def _extend(schedule: Callable[..., optax.Schedule], before: optax.Schedule, peak_value: float,
            start: int, total_steps: int) -> optax.Schedule:
    """`before` up to `start`, then `schedule` re-planned to end at `total_steps` from there.

    The plain schedule for the new length is kept when it agrees with `before` at `start` (a
    warmup or a WSD plateau still under way); otherwise it continues from the current value.
    """
    value = float(before(start))
    after = schedule(peak_value=peak_value, total_steps=total_steps)
    if not math.isclose(float(after(start)), value, rel_tol=1e-6, abs_tol=1e-12):
        after = schedule(peak_value=peak_value, total_steps=total_steps, resume=(start, value))
    name = getattr(schedule, "__name__", "the schedule")
    logging.info("learning-rate schedule extended at step %d to %d steps: %s continues from "
                 "%.3g (its value at step %d), %.3g at step %d; an extension never raises it",
                 start, total_steps, name, value, start, float(after(total_steps)), total_steps)
    return lambda count: jnp.where(count < start, before(count), after(count))


@gin.configurable
def build_optimizer(learning_rate: float, total_steps: int, decay_mask: Mask = decay_mask_by_ndim,
                    optimizer: Callable[..., optax.GradientTransformation] = adamw,
                    schedule: Callable[..., optax.Schedule] = warmup_cosine,
                    clip_norm: float | None = 1.0, horizons: Sequence[Sequence[int]] = ()
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> optimizer with the scheduled learning rate, the schedule) for `total_steps` steps.

    `horizons` (from `schedule_horizons`, recorded in the run's config): the run's earlier plans
    and where each extension began; empty for a run never extended.
    """
    plan = [tuple(h) for h in horizons] or [(0, total_steps)]
    if plan[-1][1] != total_steps:
        raise ValueError(f"build_optimizer.horizons {plan} must end at total_steps {total_steps}")
    lr = schedule(peak_value=learning_rate, total_steps=plan[0][1])
    for start, total in plan[1:]:
        lr = _extend(schedule, lr, learning_rate, start, total)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optimizer(learning_rate=lr, decay_mask=decay_mask))
    return optax.chain(*parts), lr


def schedule_horizons(total_steps: int, resume_step: int | None,
                      saved_config: str | None) -> tuple[Horizon, ...]:
    """The schedule plan of a run resumed at `resume_step` to `total_steps`; see the module doc.

    `saved_config` is the gin config stored with that checkpoint: its `build_optimizer.horizons`
    (or its `train.steps` for a run never extended) is the plan so far. A changed step count adds
    an extension at `resume_step`; the result is bound in gin so the next checkpoints record it.
    """
    if resume_step is None or saved_config is None:
        return ((0, total_steps),)
    saved = gin_bindings(saved_config, "build_optimizer").get("horizons")
    previous = gin_bindings(saved_config, "train").get("steps", total_steps)
    plan = [tuple(h) for h in saved] if saved else [(0, int(previous))]
    plan = [h for h in plan if h[0] < resume_step or h[0] == 0] or [(0, int(previous))]
    if plan[-1][1] != total_steps and resume_step < total_steps:
        plan.append((resume_step, total_steps))
    elif plan[-1][1] != total_steps:
        plan[-1] = (plan[-1][0], total_steps)  # nothing left to run: keep the plan's shape
    plan = tuple(plan)
    if len(plan) > 1:
        with gin.unlock_config():
            gin.bind_parameter("build_optimizer.horizons", [list(h) for h in plan])
    return plan
