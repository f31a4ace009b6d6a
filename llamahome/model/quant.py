"""Quantized frozen base weights (QLoRA-style): int8 per output channel, and NF4 with block scales.

A quantized weight is a `Quantized` pytree node in the params tree, in place of the array;
`materialize(w, dtype)` gives the array back, dequantized inside the jitted step: XLA fuses the
unpack, table lookup and scaling into one loop that writes the matmul's operand (on XLA:CPU the
same fusion that a bf16 weight's convert to f32 is), and the full-precision weight never lives
between steps.

    base = quantize_params(params, ("q_proj", ...), "nf4", TARGET_IN_DIMS)  # some leaves Quantized
    w = materialize(base["layers"]["attention"]["q_proj"], jnp.bfloat16)    # [L, embed, heads, hd]
    specs = quantized_param_axes(base, param_logical_axes(config))           # shard like the base

A weight is `[*lead, *fan_in, *fan_out]` (`lead` = `(layers,)` for the stacked layers, `in_dims`
fan-in axes, as `lora.TARGET_IN_DIMS`). The two formats:

int8  symmetric, one float32 scale per output channel of each leading slice (per layer):
      values int8 `[*lead, *fan_in, *fan_out]`, scales `[*lead, 1.., *fan_out]` = absmax over the
      fan-in / 127. Error bound: |w - dq| <= scale / 2 per element. 8 bits + 32 / fan_in.
nf4   NormalFloat4 (Dettmers et al. 2023, "QLoRA"; the 16 levels and the algorithm of
      bitsandbytes' `quantize_4bit(quant_type="nf4")`): the fan-in (flattened) is cut into blocks
      of `block_size` (64) elements per output channel; each block is divided by its absmax and
      each element mapped to the nearest NF4 level; two 4-bit codes per uint8, the first of a pair
      in the high nibble (as bitsandbytes packs them):
        values uint8   `[*lead, padded_fan_in // 2, *fan_out]`
        scales float32 `[*lead, padded_fan_in // block_size, *fan_out]` (the blocks' absmax)
      Error bound: |w - dq| <= absmax * NF4_MAX_GAP / 2 (0.152 x absmax: the widest gap is
      between -1 and -0.696). 4 + 32 / block_size bits per weight = 4.5 at 64.
      A fan-in that is not a multiple of `block_size` is zero-padded up to one (the padding
      never raises a block's absmax and is sliced off when dequantized; `shape` records the
      real size), so every model size quantizes; the tiny test models' fan-in of 32 holds one
      half-empty block per channel. bitsandbytes blocks the flattened torch `[out, in]` tensor;
      for fan_in % 64 == 0 its blocks are exactly these, its codes the same bytes and its absmax
      the transposed scales (tests/unit/model/test_quant.py checks against a NumPy re-derivation).
      No double quantization of the scales (bitsandbytes' `compress_statistics`): it would save
      0.37 bits/weight (8%) for a second format of scales whose sharding needs its own rules.

Layer slices. Dequantizing reads the leading axes from `values`, not from the static `shape`,
so slicing every array of a stacked Quantized along its layer axis (`nn.scan` over the params,
`unstack_layers`' `jax.tree.map(lambda a: a[i], ...)`) gives a valid per-layer Quantized; only
`shape[lead:]` (the per-layer weight shape), `in_dims` and `block_size` are relied on.

Sharding (`quantized_axes`). Packed values keep the base weight's leading and fan-out axes, so
their logical names carry over; nf4's one packed fan-in axis takes the name of the weight's
first fan-in axis (adjacent codes share a byte, so a contiguous shard of bytes is a contiguous
shard of the flattened fan-in: `("heads", "head_dim")` of o_proj shards like "heads"), unless
the fan-in was padded (then it is replicated; real Llama sizes are multiples of 64, d512x8's
mlp of 1376 is not). Scales are replicated along the fan-in / block axis and sharded like the
base along the lead and fan-out axes: JAX refuses uneven shards, and the block count
(fan_in / 64) need not divide the mesh axis the fan-in is sharded on; each device still
dequantizes its own shard locally. The cost: under FSDP each device holds its fan-out slice of
every block's scale, i.e. 0.5 bit x the layer's weights / tensor-parallel size (on one device,
the QLoRA case, nothing).
`parallel.mesh.logical_shardings` maps the result to NamedShardings like any axes tree
(tests/unit/model/test_quant.py places an fsdp x tensor tree and dequantizes it under jit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llamahome.errors import ConfigError, did_you_mean

FORMATS = ("int8", "nf4")
NF4_BLOCK_SIZE = 64

# The 16 NormalFloat4 levels, exactly as bitsandbytes defines them (functional.get_4bit_type
# "nf4"; csrc kernels' nf4_data): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
# Nearest-level decision boundaries: bitsandbytes' dQuantizeNF4 tree compares `x > midpoint`,
# so a value exactly on a midpoint takes the lower code.
NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
NF4_MAX_GAP = float(np.max(np.diff(NF4_LEVELS)))
NF4_ZERO_CODE = 7


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A weight of `shape` stored as `values` with `scales`; `fmt` in FORMATS (module docstring).

    lead        number of leading (layer) axes when quantized; the current ones are read from
                `values` (a per-layer slice of a stacked Quantized stays valid)
    in_dims     number of fan-in axes after the leading ones
    block_size  nf4's block length along the flattened fan-in (0 for int8)
    """

    values: jax.Array
    scales: jax.Array
    fmt: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    in_dims: int = dataclasses.field(metadata={"static": True})
    lead: int = dataclasses.field(default=0, metadata={"static": True})
    block_size: int = dataclasses.field(default=0, metadata={"static": True})

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape `dequantize` returns: the current leading axes + the per-layer shape."""
        num_out = len(self.shape) - self.lead - self.in_dims
        stored_lead = self.values.ndim - num_out - (1 if self.fmt == "nf4" else self.in_dims)
        return tuple(self.values.shape[:stored_lead]) + tuple(self.shape[self.lead:])


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def stored_dtype(w: Any) -> jnp.dtype:
    """The dtype the weight had before quantization (or has, for a plain array)."""
    return jnp.dtype(w.dtype)


def _split(shape: Sequence[int], in_dims: int, lead: int):
    """(lead shape, fan-in shape, fan-out shape) of a weight."""
    return tuple(shape[:lead]), tuple(shape[lead:lead + in_dims]), tuple(shape[lead + in_dims:])


def quantize_int8(w: jax.Array, in_dims: int = 1, lead: int = 0) -> Quantized:
    """Symmetric int8 with one float32 scale per output channel (per leading-axis slice)."""
    w32 = jnp.asarray(w, jnp.float32)
    axes = tuple(range(lead, lead + in_dims))
    scales = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / 127.0
    scales = jnp.where(scales == 0, 1.0, scales)
    values = jnp.clip(jnp.round(w32 / scales), -127, 127).astype(jnp.int8)
    return Quantized(values, scales, "int8", tuple(w.shape), jnp.dtype(w.dtype).name, in_dims,
                     lead)


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ConfigError(f"nf4 block size {block_size!r}: expected an even integer >= 2 "
                          f"(bitsandbytes and QLoRA use {NF4_BLOCK_SIZE})")


def quantize_nf4(w: jax.Array, in_dims: int = 1, lead: int = 0,
                 block_size: int = NF4_BLOCK_SIZE) -> Quantized:
    """NF4 codes of `w` in blocks of `block_size` along the flattened fan-in, packed two a byte."""
    check_block_size(block_size)
    lead_shape, in_shape, out_shape = _split(w.shape, in_dims, lead)
    fan_in = math.prod(in_shape)
    padded = -(-fan_in // block_size) * block_size
    w32 = jnp.asarray(w, jnp.float32).reshape(*lead_shape, fan_in, *out_shape)
    pad = [(0, 0)] * w32.ndim
    pad[lead] = (0, padded - fan_in)
    blocks = jnp.pad(w32, pad).reshape(*lead_shape, padded // block_size, block_size, *out_shape)
    absmax = jnp.max(jnp.abs(blocks), axis=lead + 1)  # [*lead, blocks, *fan_out]
    # x * (1 / absmax) as bitsandbytes computes it; a zero block maps to the exact-zero code.
    inverse = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    normalized = blocks * jnp.expand_dims(inverse, lead + 1)
    codes = jnp.searchsorted(jnp.asarray(NF4_MIDPOINTS), normalized, side="left")
    values = pack_nf4(codes.reshape(*lead_shape, padded, *out_shape), lead)
    return Quantized(values, absmax, "nf4", tuple(w.shape), jnp.dtype(w.dtype).name, in_dims,
                     lead, block_size)


def pack_nf4(codes: jax.Array, axis: int) -> jax.Array:
    """uint8 bytes of 4-bit `codes` (even length along `axis`, which halves): code 2i in the high
    nibble of byte i, code 2i+1 in the low one."""
    shape = codes.shape
    pairs = codes.astype(jnp.uint8).reshape(*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1:])
    high, low = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (high << 4) | low


def unpack_nf4(values: jax.Array, axis: int) -> jax.Array:
    """The 4-bit codes of packed `values` (`axis` doubles, high nibble first): undoes pack_nf4."""
    pairs = jnp.stack([values >> 4, values & 0x0F], axis=axis + 1)
    return pairs.reshape(*values.shape[:axis], 2 * values.shape[axis], *values.shape[axis + 1:])


def _dequantize_nf4(q: Quantized, dtype: Any) -> jax.Array:
    """levels[codes] * absmax: shifts, masks, a 16-entry jnp.take and a multiply, which XLA fuses
    into one elementwise loop (the lookup is a gather from a constant inside that fusion)."""
    weight_shape = q.weight_shape
    num_out = len(q.shape) - q.lead - q.in_dims
    lead = q.values.ndim - 1 - num_out
    codes = unpack_nf4(q.values, lead)  # [*lead, padded, *fan_out]
    levels = jnp.take(jnp.asarray(NF4_LEVELS), codes.astype(jnp.int32), mode="clip")
    blocks = levels.reshape(*codes.shape[:lead], -1, q.block_size, *codes.shape[lead + 1:])
    w = blocks * jnp.expand_dims(q.scales, lead + 1)
    fan_in = math.prod(q.shape[q.lead:q.lead + q.in_dims])
    w = w.reshape(codes.shape)[(slice(None),) * lead + (slice(0, fan_in),)]
    return w.reshape(weight_shape).astype(dtype)


def dequantize(q: Quantized, dtype: Any = jnp.float32) -> jax.Array:
    """The weight `q` stands for, as an array of `dtype` (`q.weight_shape`)."""
    if q.fmt == "int8":
        return (q.values.astype(jnp.float32) * q.scales).astype(dtype)
    if q.fmt == "nf4":
        return _dequantize_nf4(q, dtype)
    raise ValueError(f"unknown quantized format {q.fmt!r}")


def materialize(w: Any, dtype: Any) -> jax.Array:
    """The weight as an array of `dtype`: dequantized when quantized, else cast."""
    if isinstance(w, Quantized):
        return dequantize(w, dtype)
    return w.astype(dtype)


def check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"base quantization {fmt!r} is not one of {', '.join(FORMATS)}."
                          f"{did_you_mean(str(fmt), FORMATS)}")


def quantize(w: jax.Array, fmt: str, in_dims: int = 1, lead: int = 0,
             block_size: int = NF4_BLOCK_SIZE) -> Quantized:
    """`w` [*lead, *fan_in (in_dims axes), *fan_out] quantized to `fmt` (block_size: nf4 only)."""
    if fmt == "int8":
        return quantize_int8(w, in_dims, lead)
    if fmt == "nf4":
        return quantize_nf4(w, in_dims, lead, block_size)
    raise ValueError(f"unknown quantized format {fmt!r}")


def quantize_params(params: Mapping[str, Any], targets: Sequence[str], fmt: str,
                    in_dims: Mapping[str, int], block_size: int = NF4_BLOCK_SIZE) -> dict:
    """`params` with every weight named in `targets` quantized to `fmt` (others unchanged).

    `in_dims[name]` is the number of fan-in axes of weight `name` (lora.TARGET_IN_DIMS). Under a
    `layers` mapping the weights are stacked (one leading axis); a `layers` tuple or list holds
    per-layer trees (`unstack_layers`), quantized one by one with no leading axis. A mixture of
    experts' MLP (a mapping with a `router`) has one more leading axis, its experts.
    """
    check_format(fmt)
    if fmt == "nf4":
        check_block_size(block_size)

    def walk(node: Any, key: str | None, lead: int) -> Any:
        if isinstance(node, Mapping):
            inner = 1 if key == "layers" else lead
            if "router" in node:  # a mixture of experts (llama.MoeMlp): [.., experts, in, out]
                inner += 1
            return {k: walk(value, k, inner) for k, value in node.items()}
        if isinstance(node, tuple | list):
            return type(node)(walk(value, None, lead) for value in node)
        return quantize(node, fmt, in_dims[key], lead, block_size) if key in targets else node

    return walk(params, None, 0)


def _padded(q: Quantized) -> bool:
    return math.prod(q.shape[q.lead:q.lead + q.in_dims]) % max(q.block_size, 1) != 0


def quantized_axes(q: Quantized, base_axes: Sequence[str | None]) -> Quantized:
    """The logical axes (PartitionSpecs) of `q`'s arrays, from the base weight's `base_axes`.

    `q` may hold arrays or `jax.ShapeDtypeStruct`s (`jax.eval_shape` of `quantize`); the result
    is a Quantized with `q`'s static fields whose `values` and `scales` are PartitionSpecs, so
    it has the tree structure of `q` and zips with it in `jax.tree.map` (module docstring:
    packed values shard like the base, scales are replicated along the fan-in / block axis).
    """
    base_axes = tuple(base_axes)
    num_out = len(q.shape) - q.lead - q.in_dims
    lead_axes = base_axes[:len(base_axes) - q.in_dims - num_out]
    in_axes = base_axes[len(lead_axes):len(lead_axes) + q.in_dims]
    out_axes = base_axes[len(base_axes) - num_out:]
    if q.fmt == "int8":
        values = lead_axes + in_axes + out_axes
        scales = lead_axes + (None,) * q.in_dims + out_axes
    else:
        packed = None if _padded(q) else in_axes[0]
        values = lead_axes + (packed,) + out_axes
        scales = lead_axes + (None,) + out_axes
    return dataclasses.replace(q, values=PartitionSpec(*values), scales=PartitionSpec(*scales))


def quantized_param_axes(params: Any, axes: Any) -> Any:
    """`axes` (param_logical_axes of the unquantized model) with each quantized leaf's entry
    replaced by its `quantized_axes`: the logical axes of the quantized `params` tree."""
    return jax.tree.map(lambda w, a: quantized_axes(w, a) if is_quantized(w) else a,
                        params, axes, is_leaf=is_quantized)


def nbytes(tree: Any) -> int:
    """Bytes of a params tree as stored (quantized leaves count their values and scales)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
