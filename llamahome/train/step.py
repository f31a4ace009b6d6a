"""The pure train and eval steps, the state and loss they compute, and compiling them once.

    state = TrainState(step, params, opt_state, rng)        # everything that changes
    train_step(state, batch, ...) -> (state, metrics)       # pure: jit-compiled, state donated
    eval_step(params, batch, ...) -> {loss_sum, tokens}
    train_step(state, batch, frozen, ...)                   # LoRA: params are the adapters,
    eval_step(params, batch, frozen, ...)                   # `frozen` the base (not donated)
    compile_train_step / compile_eval_step                  # jit + lower + compile over a mesh
    evaluate_batches(eval_step, params, batches, ...)       # the one eval loop (train, evaluate job)

A batch is a dict of [batch, length] arrays: inputs, targets, positions, segment_ids (int32)
and loss_mask (float32). `apply_fn` returns the model's last hidden states and output head,
not logits: the loss applies the head itself (`head_cross_entropy` below), so the train step
never keeps the [batch, length, vocab] logits for a backward pass. The loss is the mean f32
cross-entropy over tokens with loss_mask > 0 in the whole global batch: gradients of
per-microbatch *sums* are accumulated and divided once by the global token count, so gradient
accumulation (A microbatches of B/A rows) and any sharding of the batch give the gradient of
one big batch. The optional z-loss (PaLM, Chowdhery et al. 2022, sec. 5) adds
`z_loss * log(Z)^2` per token to keep the softmax normaliser near 1.

A LoRA run (model/lora.py) trains only the adapters: `state.params` is the "lora" collection,
and the frozen base (maybe quantized, model/quant.py) is a third, non-donated argument that
gets no gradient and no optimizer state. `lora_apply_fn` takes it and a dropout key, derived
from the state's seed and step (so a resumed run draws the same masks).

A mixture-of-experts model (LlamaConfig.num_experts) also returns its router's load-balancing
loss, already weighted by `router_aux_loss_coef` (model/llama.py): it is added per token to
the objective (so the mean objective is CE + coef * aux, as HF Mixtral's) and logged as
metrics["router_aux_loss"] (when the apply fn says `has_router_loss`, as hidden_apply_fn and
lora_apply_fn do), its token-weighted mean over the microbatches.

Non-finite steps (NaN/Inf loss or gradient norm) leave params and optimizer state unchanged;
metrics["finite"] tells the loop, which then skips on or stops (train.nan_policy).

`head_cross_entropy` takes the last hidden states and the head weights instead of logits and
computes the gradients of the loss with respect to both in its forward pass, one block of
positions at a time: softmax(logits) - onehot is the gradient of cross-entropy with respect
to the logits, so there is no need to keep logits, probabilities or one-hots for a backward
pass. This is the fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024) and the
blockwise cross-entropy of Levanter, written with `jax.custom_vjp`. Its backward scales the
stored gradients by the incoming cotangent.

- With one block (`chunk_length=0`, the default) it runs the same matmuls as autodiff through
  the logits, at the same speed (benchmark `d512x8` on CPU: 1.58 s against 1.61 s per step, 4
  alternating runs each) and with the same temporaries.
- With blocks of `chunk_length` positions, only one block's [batch, chunk, vocab] logits is
  ever live: `d512x8` with blocks of 128 needs 1.59 GB of temporaries instead of 1.97 GB, at
  the same step time. That is the memory to save with a large vocabulary: Llama 3's 128k
  vocabulary at batch 8 x 2048 positions is 8.4 GB of f32 logits alone.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from llamahome.errors import UserError
from llamahome.model import quant
from llamahome.model.llama import Llama
from llamahome.parallel import distributed
from llamahome.parallel.mesh import (
    Rules, check_divisible, follow_params, global_batch, logical_shardings, replicated,
)
from llamahome.train.checkpoint import abstract_like

Batch = dict[str, jax.Array]
# (params, inputs, positions, segment_ids) -> (hidden [B, T, D], head [D, V][, router loss []]);
# a LoRA run's takes (adapters, inputs, positions, segment_ids, frozen base, dropout key or None).
ApplyFn = Callable[..., tuple[jax.Array, jax.Array]]
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                "segment_ids": jnp.int32, "loss_mask": jnp.float32}


# --- The state ------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: model pytree; opt_state: optax state; rng: uint32 [2] key data."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0; jit it with out_shardings to create it directly sharded."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(params_shape: Any, param_specs: Any, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """(abstract TrainState, its shardings): params by logical name, optimizer state following them."""
    param_shardings = logical_shardings(param_specs, mesh, rules)
    check_divisible(params_shape, param_shardings)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), params_shape)
    shardings = TrainState(
        step=replicated(mesh), params=param_shardings,
        opt_state=follow_params(abstract.opt_state, params_shape, param_shardings, mesh),
        rng=replicated(mesh))
    return abstract, shardings


def _with_router_loss(model: Llama, variables: dict, *args, **kwargs) -> tuple:
    """(hidden, head), plus the weighted router loss when `model` is a mixture of experts."""
    if not model.config.num_experts:
        return model.apply(variables, *args, return_hidden=True, **kwargs)
    (hidden, head), sown = model.apply(variables, *args, return_hidden=True,
                                       mutable=["losses"], **kwargs)
    return hidden, head, sum(jax.tree.leaves(sown["losses"]))


def hidden_apply_fn(model: Llama) -> ApplyFn:
    """`model`'s forward pass returning (last hidden states, output head), as the steps take it."""
    def apply(params, inputs, positions, segment_ids):
        return _with_router_loss(model, {"params": params}, inputs, positions, segment_ids)
    apply.has_router_loss = bool(model.config.num_experts)
    return apply


def lora_apply_fn(model: Llama) -> ApplyFn:
    """The same for a LoRA `model`: adapters trained, `base` frozen, dropout when given a key."""
    def apply(adapters, inputs, positions, segment_ids, base, rng=None):
        return _with_router_loss(model, {"params": base, "lora": adapters}, inputs, positions,
                                 segment_ids, rngs={} if rng is None else {"dropout": rng})
    apply.has_router_loss = bool(model.config.num_experts)
    return apply


def frozen_shardings(frozen: Any, param_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings of a frozen base: each weight by its logical axis names, as when trained; a
    quantized one's values and scales by the names quant.quantized_axes derives from them."""
    return logical_shardings(quant.quantized_param_axes(frozen, param_specs), mesh, rules)


def dropout_key(state: TrainState) -> jax.Array:
    """The step's dropout key: the run's seed folded with the step (the same after a resume)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


# --- The batch ------------------------------------------------------------------------------

def abstract_batch(batch_size: int, seq_len: int, batch_sharding: NamedSharding) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), d, sharding=batch_sharding)
            for k, d in BATCH_DTYPES.items()}


def blank_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """[rows, seq_len] of padding (segment 0, loss_mask 0): adds nothing to a loss."""
    return {k: np.zeros((rows, seq_len), d) for k, d in BATCH_DTYPES.items()}


def check_batch_divisible(batch_size: int, accum_steps: int, batch_sharding: NamedSharding) -> None:
    """Each microbatch must split evenly over the devices that share the batch."""
    spec = batch_sharding.spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
    if accum_steps < 1 or batch_size % accum_steps or (batch_size // accum_steps) % shards:
        raise UserError(f"train.batch_size={batch_size} with gradient_accumulation_steps={accum_steps} "
                        f"gives microbatches of {batch_size / max(accum_steps, 1):g} rows, which must be a "
                        f"whole multiple of the {shards} devices the batch is split over ({axes}); "
                        "change the batch size, the accumulation steps or the mesh")


# --- The loss -------------------------------------------------------------------------------

def cross_entropy_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of masked CE, sum of masked log(Z)^2, sum of mask), all f32 scalars; logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    # A one-hot product, not a gather: its gradient is elementwise, where a gather's is a scatter.
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), -1)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask), jnp.sum(mask)


def head_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                       loss_mask: jax.Array, z_loss: float = 0.0, chunk_length: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
    """(sum of masked CE + z_loss * log(Z)^2, sum of masked CE) of logits = hidden @ head.

    hidden [B, T, D] and head [D, V] in the compute dtype; targets [B, T] int; loss_mask [B, T].
    Differentiate the first output only: the second, for metrics, carries no gradient.
    """
    length = hidden.shape[1]
    if chunk_length and length % chunk_length:
        raise ValueError(f"sequence length {length} is not divisible by loss_chunk_length "
                         f"{chunk_length}; set train.loss_chunk_length to a divisor of it or 0")
    return _fused(hidden, head, targets, loss_mask.astype(jnp.float32), float(z_loss),
                  chunk_length or length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(hidden, head, targets, mask, z_loss, chunk):
    return _forward(hidden, head, targets, mask, z_loss, chunk)[0]


def _block(head: jax.Array, z_loss: float, dhead: jax.Array, block: tuple) -> tuple:
    """One block of positions: its loss sums, d/dhidden, and d/dhead added to `dhead` (f32)."""
    hidden, targets, mask = block  # [B, C, D], [B, C], [B, C]
    logits = jnp.einsum("bcd,dv->bcv", hidden, head).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    probs = jnp.exp(logits - log_z[..., None])
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    ce = jnp.sum((log_z - jnp.sum(logits * onehot, -1)) * mask)
    z = jnp.sum(jnp.square(log_z) * mask)
    # d(ce + z_loss * log_z^2)/dlogits, per position: p - onehot + 2 z_loss log_z p.
    dlogits = ((probs * (1.0 + 2.0 * z_loss * log_z[..., None]) - onehot)
               * mask[..., None]).astype(hidden.dtype)
    dhidden = jnp.einsum("bcv,dv->bcd", dlogits, head)
    dhead = dhead + jnp.einsum("bcd,bcv->dv", hidden, dlogits, preferred_element_type=jnp.float32)
    return dhead, (ce, z, dhidden)


def _forward(hidden, head, targets, mask, z_loss, chunk):
    batch, length, dim = hidden.shape
    zeros = jnp.zeros(head.shape, jnp.float32)
    if chunk == length:
        dhead, (ce, z, dhidden) = _block(head, z_loss, zeros, (hidden, targets, mask))
    else:
        def blocks(x):  # [B, T, ...] -> [T / C, B, C, ...]
            return x.reshape(batch, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)
        dhead, (ce, z, dhidden) = jax.lax.scan(
            functools.partial(_block, head, z_loss), zeros,
            (blocks(hidden), blocks(targets), blocks(mask)))
        ce, z = jnp.sum(ce), jnp.sum(z)
        dhidden = dhidden.swapaxes(0, 1).reshape(batch, length, dim)
    return (ce + z_loss * z, ce), (dhidden, dhead.astype(head.dtype))


def _backward(z_loss, chunk, residuals, cotangents):
    del z_loss, chunk
    dhidden, dhead = residuals
    g = cotangents[0]  # of the objective; the CE output is for metrics only
    return dhidden * g.astype(dhidden.dtype), dhead * g.astype(dhead.dtype), None, None


_fused.defvjp(_forward, _backward)


# --- The steps ------------------------------------------------------------------------------

def _loss_sums(params: Any, batch: Batch, extra: tuple, apply_fn: ApplyFn, z_loss: float,
               chunk_length: int):
    hidden, head, *router = apply_fn(params, batch["inputs"], batch["positions"],
                                     batch["segment_ids"], *extra)
    objective, ce = head_cross_entropy(hidden, head, batch["targets"], batch["loss_mask"],
                                       z_loss, chunk_length)
    count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    router_sum = router[0] * count if router else jnp.float32(0)  # per token, as the CE sums
    return objective + router_sum, (ce, count, router_sum)


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
    """[B, T] -> [A, B/A, T]; microbatch a takes rows a, a+A, ... so each keeps every shard busy."""
    def split(x):
        rows = x.shape[0] // accum_steps
        x = x.reshape(rows, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch", "length"))
    return jax.tree.map(split, batch)


def loss_and_grads(params: Any, batch: Batch, *, apply_fn: ApplyFn, z_loss: float = 0.0,
                   accum_steps: int = 1, loss_chunk_length: int = 0, frozen: Any = None,
                   rng: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """(CE sum, token count, gradient of the summed loss, router-loss sum: 0 without experts)
    over `accum_steps` microbatches.

    With a `frozen` base (LoRA), `apply_fn` also takes it and microbatch i's dropout key,
    `rng` folded with i; the gradient is for `params` only.
    """
    grad_fn = functools.partial(jax.grad(_loss_sums, has_aux=True), apply_fn=apply_fn,
                                z_loss=z_loss, chunk_length=loss_chunk_length)

    def extra(i):
        if frozen is None:
            return ()
        return frozen, None if rng is None else jax.random.fold_in(rng, i)

    if accum_steps == 1:
        grads, (ce, count, router) = grad_fn(params, batch, extra(0))
        return ce, count, grads, router

    def body(carry, micro_i):
        ce_acc, count_acc, grads_acc, router_acc = carry
        micro, i = micro_i
        grads, (ce, count, router) = grad_fn(params, micro, extra(i))
        return (ce_acc + ce, count_acc + count, jax.tree.map(jnp.add, grads_acc, grads),
                router_acc + router), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (ce, count, grads, router), _ = jax.lax.scan(
        body, (jnp.float32(0), jnp.float32(0), zeros, jnp.float32(0)),
        (_microbatches(batch, accum_steps), jnp.arange(accum_steps)))
    return ce, count, grads, router


def train_step(state: TrainState, batch: Batch, frozen: Any = None, *, apply_fn: ApplyFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               z_loss: float = 0.0, accum_steps: int = 1, loss_chunk_length: int = 0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the global batch; returns the new state and scalar metrics.

    `frozen`: a LoRA run's base (state.params are then its adapters); see the module doc.
    """
    ce, count, grads, router = loss_and_grads(
        state.params, batch, apply_fn=apply_fn, z_loss=z_loss, accum_steps=accum_steps,
        loss_chunk_length=loss_chunk_length, frozen=frozen,
        rng=None if frozen is None else dropout_key(state))
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
    if getattr(apply_fn, "has_router_loss", False):
        metrics["router_aux_loss"] = router / denom
    return new_state, metrics


def eval_step(params: Any, batch: Batch, frozen: Any = None, *,
              apply_fn: ApplyFn) -> dict[str, jax.Array]:
    """Summed CE and token count of one batch (the caller divides after the last batch)."""
    extra = () if frozen is None else (frozen,)
    hidden, head, *_ = apply_fn(params, batch["inputs"], batch["positions"],
                                batch["segment_ids"], *extra)
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    ce, _, count = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    return {"loss_sum": ce, "tokens": count}


# --- Compiling ------------------------------------------------------------------------------

def compile_step(fn: Callable[..., Any], args: tuple, in_shardings: tuple, out_shardings: Any,
                 mesh: Mesh, rules: Rules, donate_argnums: tuple[int, ...] = ()
                 ) -> jax.stages.Compiled:
    """jit + lower + compile `fn` once for `args` (arrays or ShapeDtypeStructs) under the mesh rules."""
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate_argnums)
        return jitted.lower(*args).compile()


def _with_frozen(args: tuple, in_shardings: tuple, frozen: Any) -> tuple[tuple, tuple]:
    """(args, in_shardings) with the abstract frozen base (carrying its shardings) appended."""
    if frozen is None:
        return args, in_shardings
    return args + (frozen,), in_shardings + (jax.tree.map(lambda x: x.sharding, frozen),)


def compile_train_step(abstract_state: Any, shardings: Any, batch: dict, mesh: Mesh, rules: Rules,
                       frozen: Any = None, **step_kwargs: Any) -> jax.stages.Compiled:
    """train_step bound to model/optimizer and compiled once; the state argument is donated.

    `frozen`: a LoRA run's abstract base (ShapeDtypeStructs with shardings): a third argument,
    not donated.
    """
    fn = functools.partial(train_step, **step_kwargs)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    args, in_shardings = _with_frozen((abstract_like(abstract_state, shardings), batch),
                                      (shardings, batch_shardings), frozen)
    return compile_step(fn, args, in_shardings, (shardings, replicated(mesh)),
                        mesh, rules, donate_argnums=(0,))


def compile_eval_step(abstract_params: Any, param_shardings: Any, batch: dict, mesh: Mesh,
                      rules: Rules, apply_fn: ApplyFn, frozen: Any = None) -> jax.stages.Compiled:
    fn = functools.partial(eval_step, apply_fn=apply_fn)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    args, in_shardings = _with_frozen((abstract_like(abstract_params, param_shardings), batch),
                                      (param_shardings, batch_shardings), frozen)
    return compile_step(fn, args, in_shardings, replicated(mesh), mesh, rules)


def compile_steps(abstract_state: Any, shardings: Any, batch: dict, mesh: Mesh, rules: Rules, *,
                  apply_fn: ApplyFn, frozen: Any = None, **train_kwargs: Any
                  ) -> tuple[Callable, Callable]:
    """(train step, eval step) of one run, compiled for the same batch layout.

    With a LoRA run's `frozen` base (arrays), both are bound to it, so the loop calls
    `train_step(state, batch)` and `eval_step(params, batch)` either way.
    """
    abstract_frozen = None if frozen is None else abstract_like(
        frozen, jax.tree.map(lambda x: x.sharding, frozen))
    train = compile_train_step(abstract_state, shardings, batch, mesh, rules, abstract_frozen,
                               apply_fn=apply_fn, **train_kwargs)
    evaluate = compile_eval_step(abstract_state.params, shardings.params, batch, mesh, rules,
                                 apply_fn, abstract_frozen)
    if frozen is None:
        return train, evaluate
    return (lambda state, batch: train(state, batch, frozen),
            lambda params, batch: evaluate(params, batch, frozen))


# --- The eval loop --------------------------------------------------------------------------

def evaluate_batches(eval_step: Callable, params: Any, batches: Iterator[dict],
                     batch_sharding: NamedSharding, blank: dict[str, np.ndarray],
                     max_batches: int | None = None,
                     on_batch: Callable[[int, dict | None], None] = lambda i, local: None
                     ) -> tuple[float, int, int]:
    """(summed CE, target tokens, batches) over up to `max_batches` batches of `batches`.

    Processes can hold different numbers of batches: every eval step is a collective, so all
    go on while any has a batch left, the others feeding `blank` rows (loss_mask 0).
    `on_batch(i, local)` sees each step's local batch (None for a blank one).
    """
    loss_sum, tokens, count = jnp.float32(0), jnp.float32(0), 0
    for i in itertools.count():
        if max_batches is not None and i >= max_batches:
            break
        local = next(batches, None)
        if not distributed.any_process(local is not None):
            break
        out = eval_step(params, global_batch(blank if local is None else local, batch_sharding))
        loss_sum, tokens, count = loss_sum + out["loss_sum"], tokens + out["tokens"], count + 1
        on_batch(i, local)
    return float(loss_sum), int(tokens), count


def mean_eval_loss(eval_step: Callable, params: Any, batches: Iterator[dict],
                   batch_sharding: NamedSharding, blank: dict[str, np.ndarray],
                   max_batches: int | None, on_batch: Callable = lambda i, local: None) -> float:
    """Mean loss over every token with loss_mask > 0 in up to `max_batches` validation batches."""
    loss_sum, tokens, _ = evaluate_batches(eval_step, params, batches, batch_sharding, blank,
                                           max_batches, on_batch)
    if tokens == 0:
        raise UserError("the validation split gave no tokens to evaluate; add validation data or "
                        "set train.eval_every=0")
    return loss_sum / tokens
