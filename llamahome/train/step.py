"""The pure train and eval steps, and compiling them once over a mesh.

`train_step(state, batch, ...) -> (state, metrics)` closes over nothing mutable; the model,
optimizer and schedule are bound with `functools.partial` before `jax.jit`.

A batch is a dict of [batch, length] arrays: inputs, targets, positions, segment_ids (int32)
and loss_mask (float32). The loss is the mean f32 cross-entropy over tokens with
loss_mask > 0 in the whole global batch: gradients of per-microbatch *sums* are accumulated
and divided once by the global token count, so gradient accumulation (A microbatches of B/A
rows) and any sharding of the batch give the gradient of one big batch. The optional z-loss
(PaLM, Chowdhery et al. 2022, sec. 5) adds `z_loss * log(Z)^2` per token to keep the softmax
normaliser near 1.

Non-finite steps (NaN/Inf loss or gradient norm) leave params and optimizer state unchanged;
metrics["finite"] tells the loop, which then skips on or stops (train.nan_policy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llamahome.train.state import TrainState

Batch = dict[str, jax.Array]
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # -> logits [B, T, V]


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of masked CE, sum of masked log(Z)^2, sum of mask), all f32 scalars; logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    # A one-hot product, not a gather: its gradient is elementwise, where a gather's is a scatter.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), -1)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask), jnp.sum(mask)


def _loss_sums(params: Any, batch: Batch, apply_fn: ApplyFn, z_loss: float):
    logits = apply_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    ce, z, count = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    return ce + z_loss * z, (ce, count)


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
    """[B, T] -> [A, B/A, T]; microbatch a takes rows a, a+A, ... so each keeps every shard busy."""
    def split(x):
        rows = x.shape[0] // accum_steps
        x = x.reshape(rows, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch", "length"))
    return jax.tree.map(split, batch)


def loss_and_grads(params: Any, batch: Batch, *, apply_fn: ApplyFn, z_loss: float = 0.0,
                   accum_steps: int = 1) -> tuple[jax.Array, jax.Array, Any]:
    """(CE sum, token count, gradient of the summed loss) over `accum_steps` microbatches."""
    grad_fn = jax.grad(_loss_sums, has_aux=True)
    if accum_steps == 1:
        grads, (ce, count) = grad_fn(params, batch, apply_fn, z_loss)
        return ce, count, grads

    def body(carry, micro):
        ce_acc, count_acc, grads_acc = carry
        grads, (ce, count) = grad_fn(params, micro, apply_fn, z_loss)
        return (ce_acc + ce, count_acc + count, jax.tree.map(jnp.add, grads_acc, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (ce, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros),
                                         _microbatches(batch, accum_steps))
    return ce, count, grads


def train_step(state: TrainState, batch: Batch, *, apply_fn: ApplyFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               z_loss: float = 0.0, accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the global batch; returns the new state and scalar metrics."""
    ce, count, grads = loss_and_grads(state.params, batch, apply_fn=apply_fn, z_loss=z_loss,
                                      accum_steps=accum_steps)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    loss, grad_norm = ce / denom, optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": count, "finite": finite}
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, apply_fn: ApplyFn) -> dict[str, jax.Array]:
    """Summed CE and token count of one batch (the caller divides after the last batch)."""
    logits = apply_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    ce, _, count = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    return {"loss_sum": ce, "tokens": count}


def compile_step(fn: Callable[..., Any], args: tuple, in_shardings: tuple, out_shardings: Any,
                 mesh: jax.sharding.Mesh, rules: Any, donate_argnums: tuple[int, ...] = ()
                 ) -> jax.stages.Compiled:
    """jit + lower + compile `fn` once for `args` (arrays or ShapeDtypeStructs) under the mesh rules."""
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate_argnums)
        return jitted.lower(*args).compile()
