"""The pure train and eval steps, and compiling them once over a mesh.

`train_step(state, batch, ...) -> (state, metrics)` closes over nothing mutable; the model,
optimizer and schedule are bound with `functools.partial` before `jax.jit`.

A batch is a dict of [batch, length] arrays: inputs, targets, positions, segment_ids (int32)
and loss_mask (float32). `apply_fn` returns the model's last hidden states and output head,
not logits: the loss applies the head itself (llamahome/train/loss.py), so the train step
never keeps the [batch, length, vocab] logits for a backward pass. The loss is the mean f32
cross-entropy over tokens with loss_mask > 0 in the whole global batch: gradients of
per-microbatch *sums* are accumulated and divided once by the global token count, so gradient
accumulation (A microbatches of B/A rows) and any sharding of the batch give the gradient of
one big batch. The optional z-loss (PaLM, Chowdhery et al. 2022, sec. 5) adds
`z_loss * log(Z)^2` per token to keep the softmax normaliser near 1.

Non-finite steps (NaN/Inf loss or gradient norm) leave params and optimizer state unchanged;
metrics["finite"] tells the loop, which then skips on or stops (train.nan_policy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llamahome.train import loss as loss_lib
from llamahome.train.state import TrainState

Batch = dict[str, jax.Array]
# (params, inputs, positions, segment_ids) -> (hidden [B, T, D], head [D, V]), e.g.
# `Llama(config).apply({"params": p}, inputs, positions, segment_ids, return_hidden=True)`.
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _loss_sums(params: Any, batch: Batch, apply_fn: ApplyFn, z_loss: float, chunk_length: int):
    hidden, head = apply_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    objective, ce = loss_lib.head_cross_entropy(hidden, head, batch["targets"], batch["loss_mask"],
                                                z_loss, chunk_length)
    return objective, (ce, jnp.sum(batch["loss_mask"].astype(jnp.float32)))


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
    """[B, T] -> [A, B/A, T]; microbatch a takes rows a, a+A, ... so each keeps every shard busy."""
    def split(x):
        rows = x.shape[0] // accum_steps
        x = x.reshape(rows, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch", "length"))
    return jax.tree.map(split, batch)


def loss_and_grads(params: Any, batch: Batch, *, apply_fn: ApplyFn, z_loss: float = 0.0,
                   accum_steps: int = 1, loss_chunk_length: int = 0
                   ) -> tuple[jax.Array, jax.Array, Any]:
    """(CE sum, token count, gradient of the summed loss) over `accum_steps` microbatches."""
    grad_fn = functools.partial(jax.grad(_loss_sums, has_aux=True), apply_fn=apply_fn,
                                z_loss=z_loss, chunk_length=loss_chunk_length)
    if accum_steps == 1:
        grads, (ce, count) = grad_fn(params, batch)
        return ce, count, grads

    def body(carry, micro):
        ce_acc, count_acc, grads_acc = carry
        grads, (ce, count) = grad_fn(params, micro)
        return (ce_acc + ce, count_acc + count, jax.tree.map(jnp.add, grads_acc, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (ce, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros),
                                         _microbatches(batch, accum_steps))
    return ce, count, grads


def train_step(state: TrainState, batch: Batch, *, apply_fn: ApplyFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               z_loss: float = 0.0, accum_steps: int = 1, loss_chunk_length: int = 0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the global batch; returns the new state and scalar metrics."""
    ce, count, grads = loss_and_grads(state.params, batch, apply_fn=apply_fn, z_loss=z_loss,
                                      accum_steps=accum_steps, loss_chunk_length=loss_chunk_length)
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
    hidden, head = apply_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    ce, _, count = loss_lib.cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    return {"loss_sum": ce, "tokens": count}


def compile_step(fn: Callable[..., Any], args: tuple, in_shardings: tuple, out_shardings: Any,
                 mesh: jax.sharding.Mesh, rules: Any, donate_argnums: tuple[int, ...] = ()
                 ) -> jax.stages.Compiled:
    """jit + lower + compile `fn` once for `args` (arrays or ShapeDtypeStructs) under the mesh rules."""
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate_argnums)
        return jitted.lower(*args).compile()
