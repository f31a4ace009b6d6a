"""LoRA adapters (Hu et al. 2021): the config, the adapter tree's layout, merging, and the
record of which base an adapter was trained on.

A LoRA run trains low-rank updates of some projections and freezes the base weights:

    y = x @ W + scale * (dropout(x) @ A) @ B,     scale = alpha / rank   (rsLoRA: alpha / sqrt(rank))

Layout. The adapters are the Flax variable collection `"lora"`, beside `"params"` (the base,
unchanged, so HF import/export and every full-model path read it as before). An adapter of the
base weight at `params/<path>/<proj>` lives at `lora/<path>/<proj>_a` and `lora/<path>/<proj>_b`:

    <proj>_a  [*lead, *fan_in_shape, rank]    e.g. q_proj_a [L, embed, r], o_proj_a [L, heads, head_dim, r]
    <proj>_b  [*lead, rank, *fan_out_shape]   e.g. q_proj_b [L, r, heads, head_dim], o_proj_b [L, r, embed]

where `lead` is `(layers,)` for the stacked layers (`()` for `lm_head`, and per-layer trees of
`unstack_layers` have none). Logical axes: the base weight's own axes with `"lora_rank"` (never
sharded) in place of the other side, so FSDP/TP presets shard adapters like their bases.
A is initialised like PEFT's default (Kaiming-uniform), B as zeros: a new adapter is a no-op.

    variables = {"params": base, "lora": adapters}
    logits = Llama(config, lora=lora_config).apply(variables, tokens)
    merged = merge(base, adapters, lora_config)          # plain params: W + scale * A @ B

A checkpointed adapter step carries `adapter.json` (`AdapterMeta`): the LoRA config and the
base it was trained on (what the user named, the resolved path, and a content hash checked on
resume and load, so an adapter is never silently applied to other weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from llamahome import store
from llamahome.errors import CheckpointError, ConfigError, did_you_mean
from llamahome.files import write_text_atomic
from llamahome.model import quant

# Projection name -> number of leading (fan-in) axes of its base weight, after any `lead` axes.
TARGET_IN_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
                  "gate_proj": 1, "up_proj": 1, "down_proj": 1, "lm_head": 1}
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
META_FILE = "adapter.json"
RANK_AXIS = "lora_rank"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """One LoRA setup (gin/train/lora.gin binds it).

    rank       r, the inner size of A [in, r] and B [r, out]; 1 <= r <= min(fan_in, fan_out)
    alpha      the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout    dropout on the adapter's input during training (0 = none)
    targets    projections to adapt: any of q_proj k_proj v_proj o_proj gate_proj up_proj
               down_proj lm_head ("all-linear" = every projection but lm_head, as in PEFT)
    rslora     rank-stabilised scaling (Kalajdzievski 2023)
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS
    rslora: bool = False

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        expanded = []
        for name in targets:  # "all-linear" may sit beside "lm_head", as PEFT allows
            expanded.extend(ATTENTION_TARGETS + MLP_TARGETS if name == "all-linear" else (name,))
        targets = tuple(dict.fromkeys(expanded))
        if not targets:
            raise ConfigError("LoraConfig.targets is empty: name at least one projection, e.g. "
                              "('q_proj', 'v_proj')")
        for name in targets:
            if name not in TARGET_IN_DIMS:
                raise ConfigError(f"LoraConfig.targets: {name!r} matches no projection of the "
                                  f"model.{did_you_mean(name, TARGET_IN_DIMS)} "
                                  f"Projections: {', '.join(TARGET_IN_DIMS)}")
        object.__setattr__(self, "targets", targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoraConfig.rank={self.rank!r}: expected an integer >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha={self.alpha!r}: expected a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets), "rslora": self.rslora}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoraConfig:
        return cls(rank=int(data["rank"]), alpha=float(data["alpha"]),
                   dropout=float(data.get("dropout", 0.0)), targets=tuple(data["targets"]),
                   rslora=bool(data.get("rslora", False)))


def check_fits(lora: LoraConfig, model_config: Any) -> None:
    """Refuses a rank larger than a targeted layer and `lm_head` on a tied-embedding model."""
    c = model_config
    sizes = {"q_proj": (c.hidden_size, c.num_heads * c.head_dim),
             "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
             "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
             "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
             "gate_proj": (c.hidden_size, c.intermediate_size),
             "up_proj": (c.hidden_size, c.intermediate_size),
             "down_proj": (c.intermediate_size, c.hidden_size),
             "lm_head": (c.hidden_size, c.vocab_size or 0)}
    if "lm_head" in lora.targets and c.tie_embeddings:
        raise ConfigError("LoraConfig.targets names 'lm_head', but this model ties its output "
                          "head to the embedding (LlamaConfig.tie_embeddings=True): drop it")
    experts = set(lora.targets) & set(MLP_TARGETS)
    if getattr(c, "num_experts", 0) and experts:
        raise ConfigError(f"LoraConfig.targets names {sorted(experts)}, but this model's MLP is "
                          f"a mixture of {c.num_experts} experts, which takes no adapters: "
                          f"set LoraConfig.targets = {list(ATTENTION_TARGETS)}")
    for name in lora.targets:
        fan_in, fan_out = sizes[name]
        if fan_out and lora.rank > min(fan_in, fan_out):
            raise ConfigError(f"LoraConfig.rank={lora.rank} is larger than {name} "
                              f"({fan_in} x {fan_out}) allows: expected <= {min(fan_in, fan_out)}")


def is_adapter_name(name: str) -> bool:
    return name.endswith(("_a", "_b")) and name[:-2] in TARGET_IN_DIMS


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _paths(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def delta(a: jax.Array, b: jax.Array, in_dims: int, scale: float) -> jax.Array:
    """scale * A @ B in the base weight's shape (any leading `lead` axes kept)."""
    lead = a.ndim - in_dims - 1
    fan_in = math.prod(a.shape[lead:lead + in_dims])
    a2 = a.reshape(*a.shape[:lead], fan_in, a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*b.shape[:lead], b.shape[lead], -1).astype(jnp.float32)
    out = jnp.matmul(a2, b2) * scale
    return out.reshape(*a.shape[:lead + in_dims], *b.shape[lead + 1:])


def merge(params: Mapping[str, Any], adapters: Mapping[str, Any], lora: LoraConfig) -> dict:
    """The base `params` with every adapter folded in: W + scale * A @ B, in W's dtype.

    Quantized base weights are dequantized first (llamahome/model/quant.py), so the result is
    always a plain params tree any job can use (the merged export, a merged generate).
    """
    merged = _tree_copy(params)
    done = set()
    for path, a in _paths(adapters):
        name = path[-1]
        if not name.endswith("_a"):
            continue
        proj = name[:-2]
        parent = path[:-1]
        b = _get(adapters, parent + (proj + "_b",))
        node = _get(merged, parent)
        base = node[proj]
        dtype = quant.stored_dtype(base)
        w = quant.materialize(base, jnp.float32)
        node[proj] = (w + delta(a, b, TARGET_IN_DIMS[proj], lora.scale)).astype(dtype)
        done.add(parent + (proj,))
    if not done:
        raise CheckpointError("merge: the adapter tree holds no <proj>_a/<proj>_b pairs")
    return merged


def _tree_copy(tree: Any) -> Any:
    return {k: _tree_copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def adapter_bytes(adapters: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(adapters))


# --- Which base an adapter belongs to ---

def params_digest(params: Any) -> str:
    """sha256 over the base weights' paths, shapes, dtypes and bytes, in path order.

    Computed on the host from the restored base (seconds for a 1B model); a different base,
    a different vocabulary or a re-quantized copy all give a different digest.
    """
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
    """`adapter.json` of an adapter step: its LoRA config and its base.

    base_ref      what the user named (`train.init_from`: a path, `model:name@N`, an HF dir)
    base_path     that resolved to a local checkpoint or HF directory
    base_step     the base checkpoint's step (None for an HF dir)
    base_digest   `params_digest` of the base weights as trained on (before any quantization)
    base_quant    None | "int8" | "nf4": how the frozen base was held while training
    architecture  the base's architecture gin (llama.architecture_gin)
    """

    lora: LoraConfig
    base_ref: str
    base_path: str
    base_step: int | None
    base_digest: str
    base_quant: str | None
    architecture: str

    def to_json(self) -> dict[str, Any]:
        return {"format": "llamahome-lora/1", "lora": self.lora.to_json(),
                "base": {"ref": self.base_ref, "path": self.base_path, "step": self.base_step,
                         "digest": self.base_digest, "quant": self.base_quant},
                "architecture": self.architecture}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdapterMeta:
        base = data["base"]
        return cls(lora=LoraConfig.from_json(data["lora"]), base_ref=base["ref"],
                   base_path=base["path"], base_step=base.get("step"),
                   base_digest=base["digest"], base_quant=base.get("quant"),
                   architecture=data.get("architecture", ""))


def write_meta(folder: str | Path, meta: AdapterMeta) -> Path:
    path = store.as_path(folder) / META_FILE
    write_text_atomic(path, json.dumps(meta.to_json(), indent=2) + "\n")
    return path


def read_meta(folder: str | Path) -> AdapterMeta | None:
    """The folder's `adapter.json`, None when it has none; a malformed one is an error."""
    path = store.as_path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        return AdapterMeta.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{store.show(path)} is not a valid adapter record ({e})") from None


def check_base(meta: AdapterMeta, digest: str, where: str) -> None:
    """Refuses a base whose digest differs from the one the adapter was trained on."""
    if digest != meta.base_digest:
        raise CheckpointError(
            f"{where}: the adapter was trained on base {meta.base_ref!r} with digest "
            f"{meta.base_digest[:19]}..., but the base given has digest {digest[:19]}...; "
            f"use the same base weights (train.init_from / the adapter's base)")
