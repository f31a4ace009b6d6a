"""PEFT LoRA adapter directories <-> LlamaHome adapter trees (model/lora.py's layout), no torch.

    lora_config, adapters = load_peft_adapter("path/to/adapter", config)   # for a base of `config`
    save_peft_adapter("out/adapter", config, adapters, lora_config, base_name="org/base")

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]
    base_model.model.lm_head.lora_A.weight, ...lora_B.weight

PEFT adds scale * B (A x) to W x, so our `<proj>_a` [*fan_in, r] is lora_A transposed and
`<proj>_b` [r, *fan_out] is lora_B transposed, each reshaped to its base weight's sides
(q_proj's out side is [heads, head_dim], o_proj's in side [heads, head_dim]). HF keeps q/k
in the rotate-half RoPE layout that attention.py uses (hf.py never permutes them), so the
rows of lora_B need no permutation either. Layers a PEFT adapter leaves out
(`layers_to_transform`) get zero adapters, which change nothing.

Only plain LoRA is read: DoRA, biases, `modules_to_save`, per-module ranks or alphas
(`rank_pattern`, `alpha_pattern`) and adapters on modules LlamaHome does not adapt
(e.g. embed_tokens) are refused with one line naming the key or tensor, as is an adapter
whose shapes do not fit the base (one made for another architecture).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import safe_open
from safetensors.numpy import save_file

from llamahome import store
from llamahome.errors import CheckpointError, UserError
from llamahome.model import hf
from llamahome.model.llama import LlamaConfig, param_shapes
from llamahome.model.lora import TARGET_IN_DIMS, LoraConfig, check_fits

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KINDS = {"lora_A.weight": "a", "lora_B.weight": "b"}
# adapter_config.json keys whose non-empty value changes the adapter's math: refused.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "fan_in_fan_out": "fan_in_fan_out weights (GPT-2 Conv1D)", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


def is_peft_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding a PEFT adapter (adapter_config.json)."""
    return (store.as_path(path) / CONFIG_FILE).is_file()


def _modules(c: LlamaConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """HF module name (after `base_model.model.`) -> (our base weight's path, layer or None)."""
    names: dict[str, tuple[tuple[str, ...], int | None]] = {}
    for key, path in hf.layer_paths(c).items():
        if path[-1] in TARGET_IN_DIMS:
            names.update({f"model.layers.{i}.{key}": (("layers", *path), i)
                          for i in range(c.num_layers)})
    names["lm_head"] = (("lm_head",), None)  # a tied model has none: check_fits refuses it
    return names


def _sides(shape: tuple[int, ...], proj: str, stacked: bool) -> tuple[tuple, tuple]:
    """(fan_in shape, fan_out shape) of a base weight, without its `layers` axis."""
    lead = 1 if stacked else 0
    split = lead + TARGET_IN_DIMS[proj]
    return tuple(shape[lead:split]), tuple(shape[split:])


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# --- reading -------------------------------------------------------------------------------------

def read_peft_config(peft_dir: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json, checked to describe plain LoRA that LlamaHome can apply."""
    path = store.as_path(peft_dir) / CONFIG_FILE
    data = hf.read_json(path, "a PEFT adapter directory")
    if data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {data.get('peft_type')!r} is not supported; "
                              "only 'LORA' adapters can be loaded")
    if data.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{path}: task_type {data['task_type']!r} is not supported; "
                              "expected 'CAUSAL_LM'")
    if data.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={data['bias']!r} is not supported (Llama has no "
                              "biases); expected 'none'")
    for key, what in _UNSUPPORTED.items():
        if data.get(key):
            raise CheckpointError(f"{path}: {what} is not supported ({key}={data[key]!r}); "
                                  "only plain LoRA adapters can be loaded")
    return data


def _lora_config(data: dict[str, Any], targets: tuple[str, ...], where: Path) -> LoraConfig:
    try:
        return LoraConfig(rank=int(data["r"]), alpha=float(data.get("lora_alpha", 8)),
                          dropout=float(data.get("lora_dropout") or 0.0), targets=targets,
                          rslora=bool(data.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise CheckpointError(f"{where / CONFIG_FILE}: not a usable LoRA config ({e})") from None


def _read_tensors(peft_dir: Path) -> dict[str, np.ndarray]:
    path = peft_dir / WEIGHTS_FILE
    if not path.is_file():
        other = "adapter_model.bin" if (peft_dir / "adapter_model.bin").is_file() else None
        raise CheckpointError(f"{peft_dir} has no {WEIGHTS_FILE}" + (
            f" (only the pickle {other}; re-save the adapter with safe_serialization=True)"
            if other else ""))
    if store.is_remote(path):  # one object, read whole (safetensors maps only local files)
        return safetensors.numpy.load(path.read_bytes())
    with safe_open(path, framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _pairs(tensors: dict[str, np.ndarray], modules: Mapping[str, Any],
           where: Path) -> dict[str, dict[str, np.ndarray]]:
    """{HF module name: {"a": lora_A, "b": lora_B}}; any other adapter tensor is refused."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in tensors.items():
        module, _, kind = name.removeprefix(PREFIX).partition(".lora_")
        if name.startswith(PREFIX) and name.endswith(".base_layer.weight"):
            continue  # PEFT's copy of a targeted lm_head's base weight; the base has its own
        known = name.startswith(PREFIX) and f"lora_{kind}" in _KINDS
        if known and module not in modules and module.rpartition(".")[2] in TARGET_IN_DIMS:
            raise CheckpointError(f"{where / WEIGHTS_FILE}: tensor {name!r} names a layer this "
                                  "base does not have: the adapter was made for a different "
                                  "architecture than the base")
        if not known or module not in modules:
            raise CheckpointError(
                f"{where / WEIGHTS_FILE}: tensor {name!r} is not a LoRA A/B matrix of a Llama "
                f"projection LlamaHome adapts ({', '.join(TARGET_IN_DIMS)})")
        pairs.setdefault(module, {})[_KINDS[f"lora_{kind}"]] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise CheckpointError(f"{where / WEIGHTS_FILE}: {module} has lora_"
                                  f"{'A' if 'a' in pair else 'B'} but not its partner")
    if not pairs:
        raise CheckpointError(f"{where / WEIGHTS_FILE} holds no LoRA tensors")
    return pairs


def _check_shapes(module: str, pair: dict[str, np.ndarray], fan_in: tuple, fan_out: tuple,
                  rank: int, where: Path) -> None:
    expected = {"a": (rank, int(np.prod(fan_in))), "b": (int(np.prod(fan_out)), rank)}
    for kind, shape in expected.items():
        if pair[kind].shape != shape:
            raise CheckpointError(
                f"{where / WEIGHTS_FILE}: {module}.lora_{kind.upper()}.weight has shape "
                f"{pair[kind].shape}, but this base needs {shape} (r={rank}): the adapter was "
                "made for a different architecture than the base")


def load_peft_adapter(peft_dir: str | os.PathLike, config: LlamaConfig,
                      dtype: Any = np.float32) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters) of a PEFT LoRA directory, for a base model of `config`.

    `adapters` is a host numpy tree in lora.py's layout (stacked over layers), in `dtype`.
    """
    where = store.as_path(peft_dir)
    data = read_peft_config(where)
    modules = _modules(config)
    pairs = _pairs(_read_tensors(where), modules, where)
    targets = tuple(p for p in TARGET_IN_DIMS if any(modules[m][0][-1] == p for m in pairs))
    lora = _lora_config(data, targets, where)
    try:
        check_fits(lora, config)
    except UserError as e:
        raise CheckpointError(f"{where}: {e}") from None
    shapes = param_shapes(config)
    adapters: dict[str, Any] = {}
    for module, (path, layer) in modules.items():
        if path[-1] not in targets:
            continue
        fan_in, fan_out = _sides(_get(shapes, path).shape, path[-1], layer is not None)
        a_shape, b_shape = (*fan_in, lora.rank), (lora.rank, *fan_out)
        lead = (config.num_layers,) if layer is not None else ()
        node = adapters
        for key in path[:-1]:
            node = node.setdefault(key, {})
        a = node.setdefault(f"{path[-1]}_a", np.zeros(lead + a_shape, dtype))
        b = node.setdefault(f"{path[-1]}_b", np.zeros(lead + b_shape, dtype))
        if module in pairs:
            _check_shapes(module, pairs[module], fan_in, fan_out, lora.rank, where)
            index = layer if layer is not None else ...
            a[index] = pairs[module]["a"].T.reshape(a_shape)
            b[index] = pairs[module]["b"].T.reshape(b_shape)
    return lora, adapters


# --- writing -------------------------------------------------------------------------------------

def peft_tensors(config: LlamaConfig, adapters: Mapping[str, Any], lora: LoraConfig,
                 dtype: Any = None) -> dict[str, np.ndarray]:
    """PEFT-named host tensors of `adapters` (in `dtype`, by default the adapters' own)."""
    tensors = {}
    for module, (path, layer) in _modules(config).items():
        proj = path[-1]
        if proj not in lora.targets:
            continue
        parent = _get(adapters, path[:-1])
        a, b = np.asarray(parent[f"{proj}_a"]), np.asarray(parent[f"{proj}_b"])
        if layer is not None:
            a, b = a[layer], b[layer]
        a, b = a.reshape(-1, lora.rank).T, b.reshape(lora.rank, -1).T
        for kind, x in (("A", a), ("B", b)):
            x = x.astype(dtype) if dtype is not None else x
            tensors[f"{PREFIX}{module}.lora_{kind}.weight"] = np.ascontiguousarray(x)
    return tensors


def peft_config(lora: LoraConfig, base_name: str | None) -> dict[str, Any]:
    """The adapter_config.json of `lora` (what peft.PeftModel.from_pretrained reads)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets),
            "use_rslora": lora.rslora, "bias": "none", "base_model_name_or_path": base_name,
            "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
            "layers_pattern": None, "init_lora_weights": True, "inference_mode": True}


def write_peft_files(folder: Path, config: LlamaConfig, adapters: Mapping[str, Any],
                     lora: LoraConfig, *, base_name: str | None = None, dtype: Any = None) -> None:
    """Writes adapter_config.json and adapter_model.safetensors into `folder`."""
    tensors = peft_tensors(config, adapters, lora, dtype)
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config(lora, base_name), indent=2) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def save_peft_adapter(out_dir: str | os.PathLike, config: LlamaConfig,
                      adapters: Mapping[str, Any], lora: LoraConfig, *,
                      base_name: str | None = None, dtype: Any = None) -> Path:
    """Writes a PEFT adapter directory (atomically; an existing non-empty one is refused)."""
    with hf.new_dir(out_dir, last=(CONFIG_FILE,)) as tmp:
        write_peft_files(tmp, config, adapters, lora, base_name=base_name, dtype=dtype)
    return store.as_path(out_dir)
