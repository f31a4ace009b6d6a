"""The Llama decoder in Flax Linen (embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU)
and `LlamaConfig`, the shape and numerics of one model, bound in gin (gin/models/<name>.gin).

A preset binds `LlamaConfig.*`; a job builds the model with `Llama(LlamaConfig())`. With
`LlamaConfig.vocab_size = None` the train job sizes the embedding to its tokenizer
(`fit_vocab`: the tokenizer's size rounded up to `VOCAB_MULTIPLE`, or the checkpoint's when
resuming) and refuses a tokenizer the model cannot embed.

Why Linen: `init` and `apply` take and return plain pytrees of arrays, so the train step stays
a pure function that `jax.jit` compiles with `out_shardings`; `nn.with_logical_partitioning`
puts logical axis names on every parameter where it is created (read by `param_logical_axes`,
mapped to mesh axes by the rules in llamahome/parallel/); and `nn.scan` / `nn.remat` give
layer scanning and activation checkpointing as wrappers, without a second copy of the model.

    params = init_params(config, rng)                               # plain pytree of arrays
    logits = Llama(config).apply({"params": params}, tokens, positions, segment_ids)
    logits, cache = Llama(config).apply({"params": params}, tokens, positions, segment_ids,
                                        cache=cache)                # cache = init_cache(...)
    adapters = init_adapters(config, lora_config, rng)              # LoRA (model/lora.py)
    logits = Llama(config, lora_config).apply({"params": params, "lora": adapters}, tokens)

tokens, positions, segment_ids: [batch, length] int32; positions default to 0..T-1 (or to
cache.index + 0..T-1); segment_ids default to all 1: a token attends earlier tokens of its own
segment only, 0 marks padding. logits: [batch, length, vocab] in the compute dtype.

The layers' parameters are always stacked on a leading `layers` axis (one `nn.scan`), so a
checkpoint loads whatever `scan_layers` says: True keeps the loop rolled (fast compile of deep
models), False unrolls it (XLA sees every layer, as with a Python loop).
Parameter tree: embedding [vocab, embed]; layers/{attention_norm,mlp_norm}/scale [L, embed];
layers/attention/{q_proj [L, embed, heads, head_dim], k_proj, v_proj [L, embed, kv_heads,
head_dim], o_proj [L, heads, head_dim, embed]}; layers/mlp/{gate_proj, up_proj [L, embed, mlp],
down_proj [L, mlp, embed]}; final_norm/scale [embed]; lm_head [embed, vocab] (untied only).
The variations (LlamaConfig's qkv_bias, qk_norm, sliding_window, num_experts; README "Adding
an architecture") add layers/attention/{q_bias [L, heads, head_dim], k_bias, v_bias [L,
kv_heads, head_dim]} (Qwen2), layers/attention/{q_norm,k_norm}/scale [L, head_dim] (Qwen3), and
replace the MLP by layers/mlp/{router [L, embed, E], gate_proj, up_proj [L, E, embed, mlp],
down_proj [L, E, mlp, embed]} (Mixtral); a sliding window adds no parameter.
Any projection may be a `quant.Quantized` leaf (a frozen QLoRA base): it is dequantized where
it is read, inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from absl import logging
from jax.ad_checkpoint import checkpoint_name

from llamahome.config.gin_config import gin_bindings
from llamahome.errors import ConfigError, did_you_mean
from llamahome.model import attention as attention_lib
from llamahome.model import lora as lora_lib
from llamahome.model import quant
from llamahome.model.attention import apply_rope, inverse_frequencies, rope_angles
from llamahome.model.kv_cache import K_AXIS, V_AXIS, KVCache, ring_slots, write_ring, write_slots
from llamahome.model.lora import LoraConfig

# --- The config ---

# The fields that fix a checkpoint's architecture (the rest are run-time choices).
ARCHITECTURE_FIELDS = ("name", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                       "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling",
                       "rms_norm_eps", "tie_embeddings", "max_seq_len")
# The named variations of the decoder (one model, not a copy per family; README "Adding an
# architecture"), architecture fields too; the experts' fields only when there are experts.
VARIANT_FIELDS = ("qkv_bias", "qk_norm", "sliding_window", "num_experts")
EXPERT_FIELDS = ("num_experts_per_token", "router_aux_loss_coef")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder (defaults: the `tiny` test size).

    name               preset name, written into run status and imported checkpoints
    vocab_size         None: the train job sets it from the tokenizer (`fit_vocab`)
    hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads
    head_dim           None -> hidden_size // num_heads
    rope_theta         RoPE base
    rope_scaling       None, or HF's dict {"rope_type": "llama3", "factor", "low_freq_factor",
                       "high_freq_factor", "original_max_position_embeddings"} (see attention.py)
    rms_norm_eps, tie_embeddings, max_seq_len
    dtype              compute dtype, "float32" | "bfloat16"
    param_dtype        storage dtype of the parameters
    attention_impl     a name in attention.ATTENTION_IMPLS ("xla" | "dot_product")
    remat_policy       a name in llama.REMAT_POLICIES ("none" | "full" | "save_dots" | ...)
    scan_layers        True: the layers are one `lax.scan` (fast compile of deep models);
                       False: the same stacked parameters, unrolled (fastest step time)

    Variations of the Llama decoder (all off: Llama itself):
    qkv_bias           Qwen2: a bias on the q, k and v projections (not on o_proj)
    qk_norm            Qwen3: RMSNorm over each head of q and k (own scales), before RoPE
    sliding_window     Mistral: None, or W: a token attends the W latest positions of its
                       segment, itself included (HF: kv > q - W); the KV cache becomes a ring
    num_experts        Mixtral: 0 (a dense SwiGLU MLP), or E > 1 SwiGLU experts per layer, each
                       token routed to its top `num_experts_per_token` (see `MoeMlp`)
    router_aux_loss_coef  weight of the experts' load-balancing loss in the training objective
    expert_capacity    None: dense, dropless dispatch (exact); c > 0: each expert takes at most
                       c * k * T / E tokens per sequence, the rest are dropped (`MoeMlp`)
    """

    name: str = "tiny"
    vocab_size: int | None = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 256
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    num_experts: int = 0
    num_experts_per_token: int = 2
    router_aux_loss_coef: float = 0.001
    expert_capacity: float | None = None

    def __post_init__(self):
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_seq_len") + (("vocab_size",) if self.vocab_size is not None else ())
        for field in sizes:
            self._require(field, getattr(self, field) >= 1, "an integer >= 1")
        for field in ("rope_theta", "rms_norm_eps"):
            self._require(field, getattr(self, field) > 0, "a number > 0")
        if self.head_dim is None:
            self._require("hidden_size", self.hidden_size % self.num_heads == 0,
                          f"a multiple of LlamaConfig.num_heads={self.num_heads}, or set "
                          "LlamaConfig.head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self._require("num_kv_heads", self.num_heads % self.num_kv_heads == 0,
                      f"a divisor of LlamaConfig.num_heads={self.num_heads} "
                      "(grouped-query attention)")
        self._require("head_dim", self.head_dim >= 2 and self.head_dim % 2 == 0,
                      "an even integer >= 2 (RoPE rotates pairs)")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ConfigError(f"LlamaConfig.{field} {getattr(self, field)!r} is not one of "
                                  f"{sorted(DTYPES)}")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        if self.sliding_window is not None:
            self._require("sliding_window", self.sliding_window >= 1, "None or an integer >= 1")
        if self.num_experts:
            self._require("num_experts", self.num_experts >= 2, "0 (dense MLP) or >= 2")
            self._require("num_experts_per_token",
                          1 <= self.num_experts_per_token <= self.num_experts,
                          f"between 1 and LlamaConfig.num_experts={self.num_experts}")
        if self.expert_capacity is not None:
            self._require("expert_capacity", self.expert_capacity > 0,
                          "None (dropless) or a capacity factor > 0")

    def _require(self, field: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(f"LlamaConfig.{field}={getattr(self, field)!r}: expected {expected}")

    def __hash__(self):
        # rope_scaling is a dict; hash its JSON so a config can be a static jit argument.
        values = [json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
                  for v in dataclasses.astuple(self)]
        return hash(tuple(values))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def params_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters, counting a tied embedding once."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        attention += (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        attention += 2 * hd if self.qk_norm else 0
        experts = max(self.num_experts, 1)
        mlp = experts * 3 * d * f + (d * self.num_experts if self.num_experts else 0)
        layer = attention + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def num_matmul_params(self) -> int:
        """Weights used in matmuls per token: every layer's projections plus the output head;
        a mixture of experts counts the experts a token is routed to (its active parameters)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        active = self.num_experts_per_token if self.num_experts else 1
        mlp = active * 3 * d * f + d * self.num_experts
        return self.num_layers * (attention + mlp) + self.vocab_size * d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + 12 * layers * heads * head_dim * seq_len.

        The attention term is the PaLM paper's (Chowdhery et al. 2022, appendix B): QK^T and
        AV cost 2 * 2 * seq_len * heads * head_dim forward per layer, tripled for the backward
        pass; like PaLM and MaxText it does not halve for the causal mask.
        """
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6.0 * self.num_matmul_params() + attention


def architecture_gin(config: LlamaConfig) -> str:
    """gin bindings of `config`'s architecture fields: a preset file for an imported model."""
    fields = ARCHITECTURE_FIELDS + VARIANT_FIELDS + (EXPERT_FIELDS if config.num_experts else ())
    return "".join(f"LlamaConfig.{field} = {getattr(config, field)!r}\n" for field in fields)


VOCAB_MULTIPLE = 128  # embedding rows padded to a multiple of this: full-width matmul tiles


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def fit_vocab(config: LlamaConfig, tokenizer_size: int, checkpoint_vocab: int | None = None,
              multiple: int = VOCAB_MULTIPLE) -> LlamaConfig:
    """`config` with the vocabulary the run trains: the checkpoint's when resuming, else
    `config.vocab_size`, or (when that is None) the tokenizer's size rounded up to `multiple`.

    The chosen size is bound in gin (`LlamaConfig.vocab_size`) so checkpoints record it.
    """
    if checkpoint_vocab is not None:
        vocab, why = checkpoint_vocab, "the checkpoint's"
    elif config.vocab_size is None:
        vocab = round_up(tokenizer_size, multiple)
        why = f"the tokenizer's {tokenizer_size} tokens rounded up to a multiple of {multiple}"
    else:
        vocab, why = config.vocab_size, "bound"
    if tokenizer_size > vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer_size} tokens but the model's vocabulary is {vocab} "
            f"({why}): ids >= {vocab} would have no embedding. Use the tokenizer the model was "
            "trained with, or (for a new model) set LlamaConfig.vocab_size=None to follow the "
            "tokenizer")
    if vocab >= 2 * round_up(tokenizer_size, multiple):
        logging.warning("LlamaConfig.vocab_size %d is much larger than the tokenizer's %d tokens: "
                        "%d embedding rows are never used; set LlamaConfig.vocab_size=None to "
                        "follow the tokenizer", vocab, tokenizer_size, vocab - tokenizer_size)
    if vocab != config.vocab_size:
        logging.info("model vocabulary: %d (%s)", vocab, why)
        with gin.unlock_config():
            gin.bind_parameter("LlamaConfig.vocab_size", vocab)
    return config.replace(vocab_size=vocab)


def checkpoint_vocab(saved_config: str | None) -> int | None:
    """The `LlamaConfig.vocab_size` a checkpoint's saved gin config records (None if none)."""
    if not saved_config:
        return None
    vocab = gin_bindings(saved_config, "LlamaConfig").get("vocab_size")
    return vocab if isinstance(vocab, int) else None


# --- The model ---

_policies = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": _policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "save_dots": _policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "save_dots_no_batch": _policies.dots_with_no_batch_dims_saveable,  # ... but not attention's
    "save_qkv_proj": _policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": _policies.save_only_these_names("attention_out", "mlp_out"),
}

_INIT = nn.initializers.normal(stddev=0.02)


def _constrain(x: jax.Array, *names: str | None) -> jax.Array:
    return nn.with_logical_constraint(x, names)


# A matmul with at most this many token rows (a decode step of up to 32 sequences) reads an
# [out, in] weight as the left operand, W @ x^T: XLA:CPU's small-row kernels stream it at
# 18-25 GB/s where x @ W [in, out] reaches ~16 and x @ W^T ~12 (8 rows, 2-core AMD EPYC,
# benchmarks/README.md "Generation"); a decode step is those weight reads.
DECODE_ROWS = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutMajor:
    """A projection weight stored [*fan_out, *fan_in] (PyTorch's [out, in]) for decoding.

    `decode_layout` puts the decoding engine's copy of the weights in this layout once per
    engine; `_matmul` then computes W @ x^T, the fastest form for a few token rows. The model
    reads a weight in either layout; training and checkpoints keep [*fan_in, *fan_out].
    """

    values: jax.Array  # [*fan_out, *fan_in]; how many axes are fan-in is the caller's in_dims

    def astype(self, dtype) -> OutMajor:
        return OutMajor(self.values.astype(dtype))


def to_out_major(w: jax.Array, in_dims: int) -> OutMajor:
    """[*fan_in, *fan_out] -> OutMajor [*fan_out, *fan_in] (a transposed copy)."""
    order = (*range(in_dims, w.ndim), *range(in_dims))
    return OutMajor(jnp.transpose(w, order))


def _matmul(x: jax.Array, w: jax.Array | OutMajor, in_dims: int = 1) -> jax.Array:
    """x [B, T, *fan_in] @ w [*fan_in, *fan_out] -> [B, T, *fan_out] as one 2-D matmul.

    Flattening batch and length into one token axis gives XLA a plain [tokens, in] @ [in, out]
    whose weight gradient is a plain 2-D matmul too; from the equivalent einsum, with its two
    batch-like axes, XLA:CPU builds that gradient from a transposed copy and a slow dot (the
    output head's backward pass took twice as long). An `OutMajor` weight is read as stored:
    W @ x^T for up to DECODE_ROWS tokens (then a transpose of the small result), else x @ W^T.
    """
    if isinstance(w, OutMajor):
        fan_out = w.values.shape[:w.values.ndim - in_dims]
        fan_in = math.prod(w.values.shape[w.values.ndim - in_dims:])
        out = _dot_out_major(x.reshape(-1, fan_in), w.values.reshape(-1, fan_in))
        return out.reshape(*x.shape[:x.ndim - in_dims], *fan_out)
    fan_in = math.prod(w.shape[:in_dims])
    out = x.reshape(-1, fan_in) @ w.reshape(fan_in, -1)
    return out.reshape(*x.shape[:x.ndim - in_dims], *w.shape[in_dims:])


def _dot_out_major(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [tokens, in] @ w[out, in]^T -> [tokens, out], in the faster form for the row count."""
    if x.shape[0] <= DECODE_ROWS:
        # The barrier keeps XLA from folding the transpose into the dot (back to x @ w^T).
        out_t = jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())))  # [out, tokens]
        return jax.lax.optimization_barrier(out_t).T
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))


# --- Projections: the base weight (plain or quantized) and its LoRA adapter ---

def _base_weight(module: nn.Module, name: str, shape: tuple[int, ...],
                 axes: tuple[str, ...]) -> jax.Array:
    """The frozen or trained base weight `name` [*shape] in the compute dtype.

    A quantized leaf (model/quant.py) is read as stored: Flax's shape check would compare its
    packed values with `shape`. Scanned or unstacked, it is one layer's slice of the stacked
    weight, which quant.py dequantizes as that layer's.
    """
    c = module.config
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if quant.is_quantized(stored):
            return quant.materialize(stored, c.compute_dtype)
        if isinstance(stored, OutMajor):  # decode_layout's copy
            return stored.astype(c.compute_dtype)
    w = module.param(name, nn.with_logical_partitioning(_INIT, axes), shape, c.params_dtype)
    return quant.materialize(w, c.compute_dtype)


def _adapter(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
             in_dims: int) -> tuple[jax.Array, jax.Array] | None:
    """(A [*fan_in, r], B [r, *fan_out]) of `name` in the "lora" collection, None if not a target.

    A is PEFT's Kaiming-uniform (torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))),
    B zeros, so a new adapter changes nothing. Axes: the base's, with "lora_rank" for r.
    """
    lora = module.lora
    if lora is None or name not in lora.targets:
        return None
    c, r = module.config, lora.rank
    init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                              in_axis=tuple(range(in_dims)), out_axis=-1)
    parts = {"a": (init_a, (*shape[:in_dims], r), (*axes[:in_dims], lora_lib.RANK_AXIS)),
             "b": (nn.initializers.zeros, (r, *shape[in_dims:]),
                   (lora_lib.RANK_AXIS, *axes[in_dims:]))}
    out = []
    for part, (init, part_shape, part_axes) in parts.items():
        boxed = nn.with_logical_partitioning(init, part_axes)
        var = module.variable("lora", f"{name}_{part}", lambda b=boxed, s=part_shape: b(
            module.make_rng("params"), s, c.params_dtype))
        out.append(var.value.astype(c.compute_dtype))
    return out[0], out[1]


def _projection(module: nn.Module, name: str, x: jax.Array, shape: tuple[int, ...],
                axes: tuple[str, ...], in_dims: int = 1) -> jax.Array:
    """x [B, T, *shape[:in_dims]] @ W -> [B, T, *shape[in_dims:]], plus the LoRA update if any.

    y = x @ W + scale * (dropout(x) @ A) @ B as two thin matmuls, never W + A @ B: the base
    weight is then a constant of the step, and a LoRA step computes no gradient for it.
    Dropout applies when the caller passes a "dropout" rng (training).
    """
    return _projections(module, x, [(name, shape, axes)], in_dims)[0]


def _projections(module: nn.Module, x: jax.Array, specs: list[tuple[str, tuple, tuple]],
                 in_dims: int = 1) -> list[jax.Array]:
    """`_projection` of each (name, shape, axes) in `specs`, all reading the same input `x`.

    The targeted adapters share one dropout(x) and one matmul x @ [A_1 | A_2 | ...] (their A
    matrices concatenated inside the step; the parameters stay separate `<proj>_a` leaves), then
    split: for q/k/v one [tokens, d] @ [d, 3r] matmul instead of three thin rank-r ones, which
    XLA:CPU runs far below its dense rate. Deviation from PEFT: q, k and v (and gate, up) see
    the same dropout mask rather than one each; every adapter still sees Bernoulli(1 - p)
    dropout of its input, so the expected update is unchanged (training only). Base weights and
    adapters are created in the order of `specs`, as one `_projection` each would.
    """
    weights = [(_base_weight(module, name, shape, axes),
                _adapter(module, name, shape, axes, in_dims)) for name, shape, axes in specs]
    ys = [_matmul(x, w, in_dims) for w, _ in weights]
    adapters = [(i, adapter) for i, (_, adapter) in enumerate(weights) if adapter is not None]
    if not adapters:
        return ys
    lora = module.lora
    if lora.dropout and module.has_rng("dropout"):
        keep, kept = _keep_mask(module.make_rng("dropout"), x.shape, lora.dropout)
        x = jnp.where(keep, x / kept, 0).astype(x.dtype)
    a = jnp.concatenate([adapter[0] for _, adapter in adapters], axis=-1)
    hidden = jnp.split(_matmul(x, a, in_dims), len(adapters), axis=-1)  # [B, T, r] each
    for (i, adapter), h in zip(adapters, hidden):
        # scale folded into B [r, out]: one pass less over the [tokens, out] update.
        ys[i] = ys[i] + _matmul(h, adapter[1] * lora.scale).astype(ys[i].dtype)
    return ys


def _keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
    """(Bernoulli(1 - rate) mask [*shape], its exact keep probability), from 16 random bits per
    element, two per 32-bit word: 1/5 of `jax.random.bernoulli`'s time on CPU (which draws a
    float per element); the probability is `rate` rounded to a multiple of 1/65536."""
    n = math.prod(shape)
    words = jax.random.bits(rng, (-(-n // 2),), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    threshold = min(max(round((1.0 - rate) * 65536), 1), 65535)
    return halves.reshape(shape) < threshold, threshold / 65536


class RMSNorm(nn.Module):
    """x / rms(x) * scale, normalised in float32 (Zhang & Sennrich 2019; as HF LlamaRMSNorm)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), c.params_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        return scale.astype(c.compute_dtype) * y.astype(c.compute_dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optionally reading and writing a layer's KV cache."""

    config: LlamaConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, sin, cos, mask, cache_index, layer_cache):
        c = self.config
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q, key, value = _projections(self, x, [  # [B, T, n, h], [B, T, k, h] twice
            ("q_proj", (d, n, h), ("embed", "heads", "head_dim")),
            ("k_proj", (d, k, h), ("embed", "kv_heads", "head_dim")),
            ("v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))])
        if c.qkv_bias:  # Qwen2
            q, key, value = (y + self.param(f"{name}_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, (heads, "head_dim")), (y.shape[2], h),
                c.params_dtype).astype(y.dtype)
                for y, name, heads in ((q, "q", "heads"), (key, "k", "kv_heads"),
                                       (value, "v", "kv_heads")))
        if c.qk_norm:  # Qwen3: per head, before RoPE
            q = RMSNorm(c, name="q_norm")(q)
            key = RMSNorm(c, name="k_norm")(key)
        q = checkpoint_name(q, "query_proj")
        key = checkpoint_name(key, "key_proj")
        value = checkpoint_name(value, "value_proj")
        q = _constrain(apply_rope(q, sin, cos), "batch", "length", "heads", None)
        key = _constrain(apply_rope(key, sin, cos), "batch", "length", "kv_heads", None)
        value = _constrain(value, "batch", "length", "kv_heads", None)

        if layer_cache is not None:  # keys [B, k, h, max_len], values [B, k, max_len, h]
            write = write_slots if c.sliding_window is None else write_ring
            key = write(layer_cache[0], key.transpose(0, 2, 3, 1), cache_index, K_AXIS)
            value = write(layer_cache[1], value.transpose(0, 2, 1, 3), cache_index, V_AXIS)
            layer_cache = (key, value)
            out = attention_lib.attend_cached(c.attention_impl, q, key, value, mask)
        else:
            out = attention_lib.get_attention(c.attention_impl)(  # [B, T, n, h]
                q, key, value, mask, causal=True)
        out = checkpoint_name(_projection(self, "o_proj", out, (n, h, d),  # [B, T, d]
                                          ("heads", "head_dim", "embed"), in_dims=2),
                              "attention_out")
        return out, layer_cache


class Mlp(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    config: LlamaConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        gate, up = _projections(self, x, [("gate_proj", (d, f), ("embed", "mlp")),  # [B, T, f]
                                          ("up_proj", (d, f), ("embed", "mlp"))])
        hidden = _constrain(jax.nn.silu(gate) * up, "batch", "length", "mlp")
        out = _projection(self, "down_proj", hidden, (f, d), ("mlp", "embed"))  # [B, T, d]
        return checkpoint_name(out, "mlp_out")


class MoeMlp(nn.Module):
    """A sparse mixture of SwiGLU experts (Mixtral, Jiang et al. 2024; HF MixtralSparseMoeBlock).

    The router's softmax over all experts picks each token's top k, whose probabilities are
    renormalised to sum to 1 and weight those experts' outputs. Two dispatches
    (`LlamaConfig.expert_capacity`):
    - None (default), dense and dropless: every expert runs on every token and the unchosen
      ones get weight 0, so the result is HF's exactly, whatever the routing, at E / k times
      the expert FLOPs: right for parity, tests and small models on CPU.
    - a factor c: each expert takes at most C = ceil(c * k * T / E) assignments per sequence
      (GShard, Lepikhin et al. 2020; Switch Transformer's capacity factor), queued first
      choices first, then second choices, each in token order; assignments past C are
      dropped (the token keeps its other experts, and the residual). The experts then compute
      [E, C] tokens per sequence, c times the active FLOPs, plus the one-hot dispatch and
      combine einsums ([T, E, C] per sequence, so meant for short sequences or large E).
    Expert weights carry the logical axis "expert" (sharded by the mesh rules).
    Returns (out [B, T, d], router stats [3, E] f32 over the `valid` [B, T] tokens: top-k
    assignments, probability sums, dropped assignments), the inputs of `load_balancing_loss`.
    """

    config: LlamaConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        d, f, e = c.hidden_size, c.intermediate_size, c.num_experts
        router = _base_weight(self, "router", (d, e), ("embed", None))
        probs = jax.nn.softmax(_matmul(x, router).astype(jnp.float32), axis=-1)  # [B, T, E]
        top, chosen = jax.lax.top_k(probs, c.num_experts_per_token)  # [B, T, k]
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        picked = jax.nn.one_hot(chosen, e, dtype=jnp.float32)  # [B, T, k, E]
        gates = jnp.einsum("btk,btke->bte", top, picked).astype(x.dtype)  # 0 off the top k
        w_gate, w_up, w_down = (_base_weight(self, name, shape, axes) for name, shape, axes in (
            ("gate_proj", (e, d, f), ("expert", "embed", "mlp")),
            ("up_proj", (e, d, f), ("expert", "embed", "mlp")),
            ("down_proj", (e, f, d), ("expert", "mlp", "embed"))))
        weight = valid.astype(jnp.float32)[..., None]  # [B, T, 1]
        assigned = jnp.sum(picked, axis=2) * weight  # [B, T, E]
        if c.expert_capacity is None:
            gate = jnp.einsum("btd,edf->btef", x, w_gate)  # [B, T, E, f]
            up = jnp.einsum("btd,edf->btef", x, w_up)
            hidden = jax.nn.silu(gate) * up * gates[..., None]
            out = jnp.einsum("btef,efd->btd", hidden, w_down)  # gate-weighted sum over experts
            dropped = jnp.zeros((e,), jnp.float32)
        else:
            dispatch, combine = _capacity_slots(picked * weight[..., None], top,
                                                c.expert_capacity)  # [B, T, E, C] each
            expert_in = jnp.einsum("btec,btd->becd", dispatch.astype(x.dtype), x)
            gate = jnp.einsum("becd,edf->becf", expert_in, w_gate)  # [B, E, C, f]
            up = jnp.einsum("becd,edf->becf", expert_in, w_up)
            expert_out = jnp.einsum("becf,efd->becd", jax.nn.silu(gate) * up, w_down)
            out = jnp.einsum("btec,becd->btd", combine.astype(x.dtype), expert_out)
            dropped = jnp.sum(assigned, axis=(0, 1)) - jnp.sum(dispatch, axis=(0, 1, 3))
        stats = jnp.stack([jnp.sum(assigned, axis=(0, 1)), jnp.sum(probs * weight, axis=(0, 1)),
                           dropped])
        return checkpoint_name(out, "mlp_out"), stats


def _capacity_slots(picked: jax.Array, top: jax.Array, factor: float
                    ) -> tuple[jax.Array, jax.Array]:
    """(dispatch, combine) [B, T, E, C] f32 of a capacity-limited dispatch (see MoeMlp).

    picked [B, T, k, E]: one-hot choices (zero rows for padding, which takes no capacity);
    top [B, T, k]: their weights. dispatch[b, t, e, s] = 1 if token t is expert e's s-th
    assignment in sequence b; combine is the same weighted by the token's gate for e.
    """
    batch, length, k, experts = picked.shape
    capacity = max(1, math.ceil(factor * k * length / experts))
    queue = picked.transpose(0, 2, 1, 3).reshape(batch, k * length, experts)  # choice-major
    position = (jnp.cumsum(queue, axis=1) - 1).reshape(batch, k, length, experts)
    position = position.transpose(0, 2, 1, 3)  # [B, T, k, E]: place in the expert's queue
    kept = (picked > 0) & (position < capacity)
    slots = jax.nn.one_hot(jnp.where(kept, position, -1).astype(jnp.int32), capacity)
    return jnp.sum(slots, axis=2), jnp.einsum("btk,btkec->btec", top, slots)


def load_balancing_loss(stats: jax.Array, rows: jax.Array, num_experts: int) -> jax.Array:
    """Switch Transformer's auxiliary loss (Fedus et al. 2022, eqs. 4-6), as HF's
    `load_balancing_loss_func` computes it over all layers at once: E * sum_e f_e * P_e, where
    f_e is expert e's share of the top-k assignments and P_e its mean router probability,
    both summed over layers and divided by the layers x tokens `rows`.
    stats [layers, 3, E] f32 from `MoeMlp`; a balanced router scores k (the top k's count)."""
    counts, probs = jnp.sum(stats, axis=0)[:2]  # [E] each
    rows = jnp.maximum(rows.astype(jnp.float32), 1.0)
    return num_experts * jnp.sum((counts / rows) * (probs / rows))


ROUTER_LOSS = "router_aux_loss"  # sown into the "losses" collection, weighted by its coef
MOE_STATS = "moe_stats"  # collection of the dropped-assignment fraction (apply mutable=[...])


class Block(nn.Module):
    """One pre-norm decoder layer: x + attention(norm(x)), then + mlp(norm(x)).

    Returns (x, (layer_cache, router stats [3, E] or None for a dense MLP))."""

    config: LlamaConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, sin, cos, mask, valid, cache_index, layer_cache):
        attn_out, layer_cache = Attention(self.config, self.lora, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), sin, cos, mask, cache_index,
            layer_cache)
        x = x + attn_out
        normed = RMSNorm(self.config, name="mlp_norm")(x)
        stats = None
        if self.config.num_experts:
            mlp_out, stats = MoeMlp(self.config, self.lora, name="mlp")(normed, valid)
        else:
            mlp_out = Mlp(self.config, self.lora, name="mlp")(normed)
        x = x + mlp_out
        return _constrain(x, "batch", "length", "embed"), (layer_cache, stats)


def _layer_stack(config: LlamaConfig, lora: LoraConfig | None = None) -> nn.Module:
    """All layers as one `nn.scan` over stacked parameters (and adapters), rematerialised as
    configured; each layer gets its own init and dropout rngs."""
    if config.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"LlamaConfig.remat_policy {config.remat_policy!r} is not one of "
                          f"{sorted(REMAT_POLICIES)}."
                          f"{did_you_mean(config.remat_policy, REMAT_POLICIES)}")
    block = Block
    if config.remat_policy != "none":
        # Inside a rolled scan the loop already stops XLA from merging the recomputation
        # with the forward pass; unrolled, prevent_cse must do it.
        block = nn.remat(block, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers)
    scanned = nn.scan(block, variable_axes={"params": 0, "lora": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 5 + (0,),
                      length=config.num_layers,
                      unroll=1 if config.scan_layers else config.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, lora, name="layers")


class Llama(nn.Module):
    """Llama decoder: tokens [B, T] -> logits [B, T, vocab]; see the module docstring.

    With `lora` (model/lora.py) every targeted projection adds its adapter from the "lora"
    collection: `apply({"params": base, "lora": adapters}, ..., rngs={"dropout": key})`.
    """

    config: LlamaConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 return_hidden: bool = False, logits_at: jax.Array | None = None):
        """logits [B, T, vocab], with the updated cache if one is given.

        `logits_at` [B] int32 gives logits [B, 1, vocab] at that one position of each row: a
        prefill needs only each prompt's last, and the head over every position would cost
        more than the layers of a small model.

        `return_hidden=True` returns (the normalised last hidden states [B, T, embed], the output
        head [embed, vocab]) instead, both in the compute dtype, for a loss that applies the
        head itself (llamahome/train/loss.py).
        """
        c = self.config
        if return_hidden and cache is not None:
            raise ValueError("return_hidden is for training and evaluation; it takes no cache")
        batch, length = tokens.shape
        offset = 0 if cache is None else jnp.reshape(cache.index, (-1, 1))  # [1 | B, 1]
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32),
                                         (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)

        embedding = self.param(
            "embedding", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), c.params_dtype)
        x = jnp.take(embedding, tokens, axis=0).astype(c.compute_dtype)
        x = _constrain(x, "batch", "length", "embed")

        sin, cos = rope_angles(positions, inverse_frequencies(c.head_dim, c.rope_theta,
                                                              c.rope_scaling))
        if cache is None:
            x = self._whole_sequence_layers(x, sin, cos, segment_ids)
        else:
            x, cache = self._cached_layers(x, sin, cos, segment_ids, cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.reshape(logits_at, (-1, 1, 1)), axis=1)

        x = RMSNorm(c, name="final_norm")(x)
        if c.tie_embeddings:
            if not return_hidden:
                # x @ embedding^T read straight from the [vocab, embed] table: `.T` would make
                # XLA:CPU copy the whole table at every call (every decoded token).
                logits = _dot_out_major(x.reshape(batch * x.shape[1], -1),
                                        embedding.astype(c.compute_dtype))
                logits = logits.reshape(batch, x.shape[1], -1)
                logits = _constrain(logits, "batch", "length", "vocab")
                return logits if cache is None else (logits, cache)
            return x, embedding.astype(c.compute_dtype).T
        head_shape, head_axes = (c.hidden_size, c.vocab_size), ("embed", "vocab")
        if return_hidden:
            # The fused loss applies the head itself: give it W + scale * A @ B (no dropout).
            head = _base_weight(self, "lm_head", head_shape, head_axes)
            adapter = _adapter(self, "lm_head", head_shape, head_axes, 1)
            if adapter is not None:
                head = head + lora_lib.delta(*adapter, 1, self.lora.scale).astype(head.dtype)
            return x, head
        logits = _projection(self, "lm_head", x, head_shape, head_axes)
        logits = _constrain(logits, "batch", "length", "vocab")
        return logits if cache is None else (logits, cache)

    def _whole_sequence_layers(self, x, sin, cos, segment_ids):
        """The scanned layers without a cache (training, evaluation, scoring). A mixture of
        experts sows its weighted load-balancing loss into "losses" (train/step.py adds it) and
        the fraction of its top-k assignments dropped over capacity into MOE_STATS."""
        c = self.config
        mask = attention_lib.attention_mask(segment_ids, segment_ids, window=c.sliding_window)
        valid = segment_ids != 0
        x, (_, stats) = _layer_stack(c, self.lora)(x, sin, cos, mask, valid, None, None)
        if stats is not None:  # [layers, 3, E]
            aux = load_balancing_loss(stats, c.num_layers * jnp.sum(valid), c.num_experts)
            self.sow("losses", ROUTER_LOSS, c.router_aux_loss_coef * aux)
            self.sow(MOE_STATS, "dropped_fraction",
                     jnp.sum(stats[:, 2]) / jnp.maximum(jnp.sum(stats[:, 0]), 1.0))
        return x

    def _cached_layers(self, x, sin, cos, segment_ids, cache: KVCache):
        """The layers one after another, each reading and updating its own cache arrays.

        Always unrolled, whatever `scan_layers` says: in a loop over layers, or with the
        parameters still stacked, each layer's weights and cache would be sliced out of the
        stacked arrays, and XLA:CPU copies every slice, at every decoded token.
        """
        c = self.config
        if c.sliding_window is None:
            kv_segments = write_slots(cache.segment_ids, segment_ids, cache.index)
            mask = attention_lib.attention_mask(segment_ids, kv_segments, cache.index)
        else:  # a ring: the slot each position lands in, and the position each slot holds
            kv_segments = write_ring(cache.segment_ids, segment_ids, cache.index)
            kv_slots = ring_slots(cache.index + x.shape[1], cache.max_len)
            mask = attention_lib.attention_mask(segment_ids, kv_segments, cache.index,
                                                window=c.sliding_window, kv_slots=kv_slots)
        valid = segment_ids != 0
        if self.is_initializing():
            raise ValueError("initialise the parameters without a cache (init_params)")
        layers = _per_layer(self.variables["params"]["layers"])
        adapters = _per_layer(self.variables.get("lora", {}).get("layers"))
        keys, values = [], []
        for i, (layer, k, v) in enumerate(zip(layers, cache.k, cache.v, strict=True)):
            variables = {"params": layer, **({"lora": adapters[i]} if adapters else {})}
            x, ((k, v), _) = Block(c, self.lora, parent=None).apply(
                variables, x, sin, cos, mask, valid, cache.index, (k, v))
            keys.append(k)
            values.append(v)
        length = x.shape[1]
        return x, KVCache(k=tuple(keys), v=tuple(values), segment_ids=kv_segments,
                          index=cache.index + length)


def _per_layer(layers: Any) -> tuple | list | None:
    """A layers tree (params or adapters) as per-layer trees; stacked ones are sliced once."""
    if layers is None or isinstance(layers, (tuple, list)):
        return layers
    return unstack_layers({"layers": layers})["layers"]


def unstack_layers(params: dict) -> dict:
    """`params` with `layers` as a tuple of per-layer trees: the layout decoding reads fastest.
    (LoRA adapters split the same way: `unstack_layers(adapters)`.)

    Llama reads either layout when given a cache; with this one each layer's weights are
    arrays of their own, which a decode loop reads in place instead of slicing (copying) them
    from the stacked [layers, ...] arrays at every token. Costs one copy of the layers' weights.
    """
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers)
                                      for i in range(num_layers))}


_OUT_MAJOR = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp": ("gate_proj", "up_proj", "down_proj")}


def in_decode_layout(params: dict) -> bool:
    """Whether `params` are already `decode_layout`'s (checked on shapes, no copy)."""
    return (isinstance(params["layers"], (tuple, list)) and jax.tree.structure(
        jax.eval_shape(decode_layout, params)) == jax.tree.structure(params))


def decode_layout(params: dict) -> dict:
    """`params` as the decoding engine reads them fastest: layers unstacked (`unstack_layers`)
    and every dense projection (and an untied `lm_head`) as an `OutMajor` copy. Quantized
    weights and a mixture of experts' weights (an "mlp" with a "router") stay as they are.
    Costs one copy of the weights, made once per engine, in place of unstack_layers' copy.
    Idempotent."""
    if not isinstance(params["layers"], (tuple, list)):
        params = unstack_layers(params)

    def convert(tree: dict, names: tuple[str, ...]) -> dict:
        return {name: (to_out_major(w, lora_lib.TARGET_IN_DIMS[name])
                       if name in names and isinstance(w, jax.Array) else w)
                for name, w in tree.items()}
    layers = tuple({**layer, **{part: convert(layer[part], names)
                                for part, names in _OUT_MAJOR.items()
                                if isinstance(layer.get(part), dict)
                                and "router" not in layer[part]}}
                   for layer in params["layers"])
    return convert({**params, "layers": layers}, ("lm_head",))


def _boxed_init(config: LlamaConfig, rng: jax.Array) -> dict:
    return Llama(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
    """Random parameters as a plain pytree of arrays (wrap in `jax.jit(..., out_shardings=...)`)."""
    return nn.meta.unbox(_boxed_init(config, rng))


def init_cache(config: LlamaConfig, batch_size: int, max_len: int,
               dtype: jnp.dtype | None = None, per_row: bool = False,
               rolling: bool = False) -> KVCache:
    """An empty KV cache (kv_cache.py) for `batch_size` rows of up to `max_len` tokens;
    `per_row`: each row has its own index (the serving engine's slots).

    `rolling` with a sliding window shorter than max_len: a ring of `sliding_window` slots,
    enough for calls of one token once it wraps (kv_cache.py: a call of T tokens into a
    wrapped ring of S slots needs S >= window + T - 1); fill it from a longer prefill's cache
    with `kv_cache.to_ring`.
    """
    if rolling and config.sliding_window is not None:
        max_len = min(max_len, config.sliding_window)
    rows, heads, dim = batch_size, config.num_kv_heads, config.head_dim
    dtype = dtype or config.compute_dtype
    layers = range(config.num_layers)
    return KVCache(k=tuple(jnp.zeros((rows, heads, dim, max_len), dtype) for _ in layers),
                   v=tuple(jnp.zeros((rows, heads, max_len, dim), dtype) for _ in layers),
                   segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
                   index=jnp.zeros((batch_size,) if per_row else (), jnp.int32))


def param_logical_axes(config: LlamaConfig) -> dict:
    """PartitionSpecs of logical axis names, with the structure of `init_params`' result."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: LlamaConfig) -> dict:
    """`jax.ShapeDtypeStruct`s of the parameters, computed without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def _boxed_adapters(config: LlamaConfig, lora: LoraConfig, rng: jax.Array) -> dict:
    return Llama(config, lora).init(rng, jnp.zeros((1, 1), jnp.int32))["lora"]


def init_adapters(config: LlamaConfig, lora: LoraConfig, rng: jax.Array) -> dict:
    """New LoRA adapters (B = 0: a no-op) as a plain pytree; see model/lora.py for the layout.

    Under `jax.jit` the base parameters this init also draws are dead code and never built.
    """
    lora_lib.check_fits(lora, config)
    return nn.meta.unbox(_boxed_adapters(config, lora, rng))


def adapter_logical_axes(config: LlamaConfig, lora: LoraConfig) -> dict:
    """PartitionSpecs of the adapters' logical axis names (the base's, with "lora_rank")."""
    boxed = jax.eval_shape(functools.partial(_boxed_adapters, config, lora), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def adapter_shapes(config: LlamaConfig, lora: LoraConfig) -> dict:
    """`jax.ShapeDtypeStruct`s of the adapters, computed without allocating them."""
    return jax.eval_shape(functools.partial(init_adapters, config, lora), jax.random.key(0))
