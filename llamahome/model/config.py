"""`LlamaConfig`: the shape and numerics of one Llama model, bound in gin (gin/models/<name>.gin).

A preset binds `LlamaConfig.*`; code builds the model with `Llama(LlamaConfig())`. Fields:

    name               preset name, written into run status and imported checkpoints
    vocab_size         None: the train job sets it from the tokenizer (train/run_tokenizer.py)
    hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads
    head_dim           None -> hidden_size // num_heads
    rope_theta         RoPE base
    rope_scaling       None, or HF's dict {"rope_type": "llama3", "factor", "low_freq_factor",
                       "high_freq_factor", "original_max_position_embeddings"} (see rope.py)
    rms_norm_eps, tie_embeddings, max_seq_len
    dtype              compute dtype, "float32" | "bfloat16"
    param_dtype        storage dtype of the parameters
    attention_impl     a name in attention.ATTENTION_IMPLS ("xla" | "dot_product")
    remat_policy       a name in llama.REMAT_POLICIES ("none" | "full" | "save_dots" | ...)
    scan_layers        True: the layers are one `lax.scan` (fast compile of deep models);
                       False: the same stacked parameters, unrolled (fastest step time)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import gin
import jax.numpy as jnp

from llamahome.errors import ConfigError

# The fields that fix a checkpoint's architecture (the rest are run-time choices).
ARCHITECTURE_FIELDS = ("name", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                       "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling",
                       "rms_norm_eps", "tie_embeddings", "max_seq_len")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder (defaults: the `tiny` test size)."""

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
        layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def num_matmul_params(self) -> int:
        """Weights used in matmuls per token: every layer's projections plus the output head."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        return self.num_layers * (attention + 3 * d * f) + self.vocab_size * d

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
    return "".join(f"LlamaConfig.{field} = {getattr(config, field)!r}\n"
                   for field in ARCHITECTURE_FIELDS)
