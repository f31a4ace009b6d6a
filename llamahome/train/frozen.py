"""The frozen base of a LoRA run: loaded from `train.init_from`, fingerprinted, held quantized
or in a smaller dtype, and sharded by the same logical axis rules as a trained model.

    base = load_base(init_from, resolved_path, config, mesh, rules, fmt="nf4", dtype=None)
    train_step(state, batch, base.params)        # a step argument: never donated or differentiated
    Checkpointer(..., on_commit=base.meta_writer(lora, config))   # adapter.json in every step
    base.check_step(step_dir)                    # on resume: the same base, or CheckpointError

The digest (`lora.params_digest`) is taken of the base as loaded, before quantization: it names
the weights, so a resume (or an adapter load) on other weights is refused whatever the weights
are called. QLoRA (Dettmers et al. 2023) quantizes every linear layer of the decoder but not
the embedding or the output head; so does `QUANTIZED_TARGETS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from llamahome.model import lora as lora_lib
from llamahome.model import quant
from llamahome.model.checkpoints import load_params_for, resolve
from llamahome.model.llama import DTYPES, LlamaConfig, architecture_gin, param_logical_axes
from llamahome.model.lora import AdapterMeta, LoraConfig
from llamahome.parallel.mesh import Rules, logical_shardings
from llamahome.train.step import frozen_shardings

QUANTIZED_TARGETS = lora_lib.ATTENTION_TARGETS + lora_lib.MLP_TARGETS


@dataclasses.dataclass(frozen=True)
class FrozenBase:
    """The base weights as the run holds them, and what identifies them.

    params  the params tree on the mesh; projections are `quant.Quantized` when `fmt` is set
    ref     what the user named (train.init_from); path: the checkpoint it resolved to
    step    the base's training step (None for an import_hf or Hugging Face directory)
    digest  `lora.params_digest` of the weights as loaded (before quantization)
    """

    params: Any
    ref: str
    path: str
    step: int | None
    digest: str
    fmt: str | None

    def meta(self, lora: LoraConfig, config: LlamaConfig) -> AdapterMeta:
        return AdapterMeta(lora=lora, base_ref=self.ref, base_path=self.path,
                           base_step=self.step, base_digest=self.digest, base_quant=self.fmt,
                           architecture=architecture_gin(config))

    def meta_writer(self, lora: LoraConfig, config: LlamaConfig) -> Callable[[Path], None]:
        """`Checkpointer.on_commit`: writes this base's adapter.json into a committed step."""
        meta = self.meta(lora, config)
        return lambda step_dir: lora_lib.write_meta(step_dir, meta)

    def check_step(self, step_dir: Path) -> str | None:
        """None if `step_dir` was trained on this base; raises CheckpointError if on another.

        A step without adapter.json was committed by a run killed before sealing it (an older
        sealed step makes the restore skip it anyway; the first step is resumed, as for a full
        fine-tune): it was trained on the base this run's own config names.
        """
        meta = lora_lib.read_meta(step_dir)
        if meta is None:
            logging.warning("%s has no %s (the run stopped before sealing it): resuming it on "
                            "the base %s", step_dir, lora_lib.META_FILE, self.ref)
            return None
        lora_lib.check_base(meta, self.digest, str(step_dir))
        return None

    def nbytes(self) -> int:
        return quant.nbytes(self.params)


def load_base(ref: str, path: str, config: LlamaConfig, mesh: Mesh, rules: Rules,
              fmt: str | None = None, dtype: str | None = None) -> FrozenBase:
    """The base at `path` (what `ref` resolved to), hashed, then held as `fmt` / `dtype`."""
    kind, where = resolve(path)
    specs = param_logical_axes(config)
    params = load_params_for(path, config, logical_shardings(specs, mesh, rules))
    digest = lora_lib.params_digest(params)
    held = hold(params, specs, mesh, rules, fmt, dtype)
    return FrozenBase(held, ref, str(where), int(where.name) if kind == "train" else None,
                      digest, fmt)


def hold(params: Any, specs: Any, mesh: Mesh, rules: Rules, fmt: str | None,
         dtype: str | None) -> Any:
    """`params` with the decoder's projections quantized to `fmt` and the other weights cast
    to `dtype` (each optional), computed on the mesh shard by shard."""
    if fmt is None and dtype is None:
        return params

    def convert(tree):
        if fmt is not None:
            tree = quant.quantize_params(tree, QUANTIZED_TARGETS, fmt, lora_lib.TARGET_IN_DIMS)
        if dtype is not None:
            tree = jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(DTYPES[dtype]),
                                tree, is_leaf=quant.is_quantized)
        return tree

    shardings = frozen_shardings(jax.eval_shape(convert, params), specs, mesh, rules)
    return jax.jit(convert, out_shardings=shardings)(params)
