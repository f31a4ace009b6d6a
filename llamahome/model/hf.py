"""Hugging Face Llama-family checkpoints <-> LlamaHome params, without torch (safetensors' numpy API).

Families (config.json `model_type`), each a variation of the one decoder (llama.LlamaConfig):
llama; qwen2 (q/k/v biases: `qkv_bias`); qwen3 (per-head q/k RMSNorm: `qk_norm`); mistral
(`sliding_window`); mixtral (`num_experts` experts under `block_sparse_moe`, as published and
as transformers 5 saves them). A config.json of another family, or with an option the decoder
does not have (attention_bias on Llama, Qwen's per-layer sliding windows, router jitter, an
unknown rope type, ...), is refused with one line naming the key.

    config, params = load_hf_checkpoint("path/to/Llama-3.2-1B")     # a local HF directory
    save_hf_checkpoint("out/hf", config, params)                     # loads in transformers

A directory holds `config.json` and the weights as `model.safetensors` or sharded
`model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`. Pickle checkpoints
(`pytorch_model*.bin`) are refused unless `allow_pickle=True` (then torch reads them with
`weights_only=True`); remote code is never run. HF stores q/k in the same "rotate half" RoPE
layout as attention.py, so weights are only transposed and reshaped, never permuted. Both the
transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) config keys are read
and written. Errors name the key or tensor at fault.

Either directory may be on object storage (`gs://`, `s3://`, see store.py): a remote HF dir is
read from a local copy (`store.download_dir`; safetensors memory-maps local files), and a
remote output is written to a local folder, then uploaded with `config.json` last, so an
upload cut short is never a folder transformers or LlamaHome take for a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llamahome import store
from llamahome.errors import CheckpointError, UserError
from llamahome.model.attention import inverse_frequencies
from llamahome.model.llama import LlamaConfig

# Tensors that HF checkpoints may carry but that are computed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")


# The config.json model_types that import; `_variation` gives the LlamaConfig fields of each.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral")
# model_type -> the `architectures` entry written on export.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                  "mixtral": "MixtralForCausalLM"}
_REFUSED_OPTIONS = {  # truthy values of these keys have no counterpart in the decoder
    "llama": ("attention_bias", "mlp_bias"),
    "qwen2": ("use_sliding_window",),  # per-layer windows (max_window_layers)
    "qwen3": ("attention_bias", "use_sliding_window"),
    "mistral": (),
    "mixtral": ("router_jitter_noise",),
}


def _variation(model_type: str, hf_config: dict[str, Any]) -> dict[str, Any]:
    """The LlamaConfig variation fields of a family's config.json."""
    if model_type == "qwen2":
        return {"qkv_bias": True}
    if model_type == "qwen3":
        return {"qk_norm": True}
    if model_type == "mistral":
        return {"sliding_window": hf_config.get("sliding_window")}
    if model_type == "mixtral":
        for key in ("num_local_experts", "num_experts_per_tok"):
            if key not in hf_config:
                raise CheckpointError(f"config.json is missing key {key!r}")
        return {"num_experts": hf_config["num_local_experts"],
                "num_experts_per_token": hf_config["num_experts_per_tok"],
                "router_aux_loss_coef": hf_config.get("router_aux_loss_coef", 0.001),
                "sliding_window": hf_config.get("sliding_window")}
    return {}


def config_from_hf(hf_config: dict[str, Any], name: str = "hf", **overrides: Any) -> LlamaConfig:
    """A LlamaConfig from an HF `config.json` dict; `overrides` set e.g. dtype or param_dtype."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in FAMILIES:
        raise CheckpointError(f"config.json model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(FAMILIES)}")
    for key in _REQUIRED_KEYS:
        if key not in hf_config:
            raise CheckpointError(f"config.json is missing key {key!r}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json hidden_act {hf_config['hidden_act']!r} is not "
                              f"supported; {model_type} uses 'silu'")
    for key in _REFUSED_OPTIONS[model_type]:
        if hf_config.get(key):
            raise CheckpointError(f"config.json {key} = {hf_config[key]!r} is not supported for "
                                  f"model_type {model_type!r}")
    layer_types = set(hf_config.get("layer_types") or ["full_attention"])
    if layer_types - {"full_attention", "sliding_attention"} or (
            "sliding_attention" in layer_types and model_type not in ("mistral", "mixtral")):
        raise CheckpointError(f"config.json layer_types {sorted(layer_types)} is not supported "
                              "(one attention kind for every layer)")
    rope_theta, rope_scaling = _rope_from_hf(hf_config)
    heads = hf_config["num_attention_heads"]
    fields = dict(
        name=name, vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim"), rope_theta=rope_theta, rope_scaling=rope_scaling,
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        **_variation(model_type, hf_config))
    return LlamaConfig(**{**fields, **overrides})


def _rope_from_hf(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4's keys."""
    if hf_config.get("rope_parameters"):
        where, params = "rope_parameters", dict(hf_config["rope_parameters"])
        theta = params.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    else:
        where, params = "rope_scaling", dict(hf_config.get("rope_scaling") or {})
        theta = hf_config.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type, **params}
    try:
        inverse_frequencies(2, float(theta), scaling)
    except UserError as e:
        raise CheckpointError(f"config.json {where}: {e}") from None
    return float(theta), scaling


def hf_model_type(config: LlamaConfig) -> str:
    """The HF family that holds `config`'s variations; CheckpointError for a mix none holds."""
    c = config
    kinds = [kind for kind, on in (("mixtral", c.num_experts), ("qwen3", c.qk_norm),
                                   ("qwen2", c.qkv_bias)) if on]
    if len(kinds) > 1 or (kinds and c.sliding_window is not None and kinds != ["mixtral"]):
        raise CheckpointError(
            f"no Hugging Face family has this mix of variations (num_experts={c.num_experts}, "
            f"qk_norm={c.qk_norm}, qkv_bias={c.qkv_bias}, sliding_window={c.sliding_window}); "
            "it cannot be exported")
    if kinds:
        return kinds[0]
    return "mistral" if c.sliding_window is not None else "llama"


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The HF `config.json` dict of a LlamaConfig (readable by transformers 4 and 5)."""
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope_parameters.update(config.rope_scaling)
    model_type = hf_model_type(config)
    family = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "qwen2": {"use_sliding_window": False, "sliding_window": None,
                  "max_window_layers": config.num_layers},
        "qwen3": {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                  "max_window_layers": config.num_layers},
        "mistral": {"sliding_window": config.sliding_window},
        "mixtral": {"sliding_window": config.sliding_window,
                    "num_local_experts": config.num_experts,
                    "num_experts_per_tok": config.num_experts_per_token,
                    "router_aux_loss_coef": config.router_aux_loss_coef,
                    "router_jitter_noise": 0.0, "output_router_logits": False},
    }[model_type]
    return {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, **family,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "rope_parameters": rope_parameters,
        "torch_dtype": config.param_dtype, "use_cache": True,
    }


# HF name of each layer tensor -> (our path under params["layers"], expert index or None,
# HF -> ours, ours -> HF). An expert's tensor is one slice of our [layers, experts, ...] array.
def _layer_tensors(c: LlamaConfig
                   ) -> dict[str, tuple[tuple[str, ...], int | None, Callable, Callable]]:
    d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    same = (lambda w: w, lambda w: w)
    attention = {
        "self_attn.q_proj.weight": (("attention", "q_proj"), lambda w: w.T.reshape(d, n, h),
                                    lambda w: w.reshape(d, n * h).T),
        "self_attn.k_proj.weight": (("attention", "k_proj"), lambda w: w.T.reshape(d, k, h),
                                    lambda w: w.reshape(d, k * h).T),
        "self_attn.v_proj.weight": (("attention", "v_proj"), lambda w: w.T.reshape(d, k, h),
                                    lambda w: w.reshape(d, k * h).T),
        "self_attn.o_proj.weight": (("attention", "o_proj"), lambda w: w.T.reshape(n, h, d),
                                    lambda w: w.reshape(n * h, d).T),
        "input_layernorm.weight": (("attention_norm", "scale"), *same),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), *same),
    }
    if c.qkv_bias:
        for proj, heads in (("q", n), ("k", k), ("v", k)):
            attention[f"self_attn.{proj}_proj.bias"] = (
                ("attention", f"{proj}_bias"), lambda w, m=heads: w.reshape(m, h),
                lambda w, m=heads: w.reshape(m * h))
    if c.qk_norm:
        attention.update({"self_attn.q_norm.weight": (("attention", "q_norm", "scale"), *same),
                          "self_attn.k_norm.weight": (("attention", "k_norm", "scale"), *same)})
    tensors = {key: (path, None, *convert) for key, (path, *convert) in attention.items()}
    if not c.num_experts:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"mlp.{proj}.weight"] = (("mlp", proj), None, np.transpose, np.transpose)
        return tensors
    # Mixtral: w1 = gate, w3 = up, w2 = down, each [out, in] per expert; the router is `gate`.
    tensors["block_sparse_moe.gate.weight"] = (("mlp", "router"), None, np.transpose,
                                               np.transpose)
    for j in range(c.num_experts):
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            tensors[f"block_sparse_moe.experts.{j}.{w}.weight"] = (
                ("mlp", proj), j, np.transpose, np.transpose)
    return tensors


def layer_paths(c: LlamaConfig) -> dict[str, tuple[str, ...]]:
    """HF module name inside `model.layers.{i}` (e.g. `self_attn.q_proj`) -> our path under
    params["layers"] (e.g. ("attention", "q_proj")); PEFT adapters name the same modules.
    Experts (one slice each of a stacked weight) and biases are not listed."""
    return {key.removesuffix(".weight"): path
            for key, (path, expert, _, _) in _layer_tensors(c).items()
            if expert is None and key.endswith(".weight")}


def hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of `c` holds, with its shape."""
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    layer = {"self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
             "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
             "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    mlp = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    if c.num_experts:
        layer["block_sparse_moe.gate.weight"] = (c.num_experts, d)
        for j in range(c.num_experts):
            layer.update({f"block_sparse_moe.experts.{j}.{w}.weight": mlp[proj]
                          for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"),
                                          ("w2", "down_proj"))})
    else:
        layer.update({f"mlp.{proj}.weight": shape for proj, shape in mlp.items()})
    if c.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (n * h,), "self_attn.k_proj.bias": (k * h,),
                      "self_attn.v_proj.bias": (k * h,)})
    if c.qk_norm:
        layer.update({"self_attn.q_norm.weight": (h,), "self_attn.k_norm.weight": (h,)})
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{key}": shape for key, shape in layer.items()})
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


class _TensorReader:
    """Reads named tensors of an HF directory from safetensors files (or, if allowed, pickle)."""

    def __init__(self, hf_dir: Path, allow_pickle: bool):
        self.hf_dir = hf_dir
        self.files: dict[str, Path] = {}  # tensor name -> safetensors file
        self.loaded: dict[str, np.ndarray] = {}  # tensors already in memory (pickle)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: hf_dir / file for name, file in weight_map.items()}
        elif safetensors := sorted(hf_dir.glob("*.safetensors")):
            for path in safetensors:
                with safe_open(path, framework="numpy") as f:
                    self.files.update({name: path for name in f.keys()})
        elif bins := sorted(hf_dir.glob("pytorch_model*.bin")):
            if not allow_pickle:
                raise CheckpointError(
                    f"{hf_dir} holds only pickle weights ({bins[0].name}), which can run code "
                    "when loaded; convert them to safetensors, or pass allow_pickle=True "
                    "(import_hf.allow_pickle = True) if you trust their source")
            self.loaded = _load_pickle(bins)
        else:
            raise CheckpointError(f"no weights in {hf_dir}: expected model.safetensors, "
                                  "model-0000x-of-0000y.safetensors with "
                                  "model.safetensors.index.json, or pytorch_model.bin")

    def names(self) -> set[str]:
        return set(self.files) | set(self.loaded)

    def read(self, name: str) -> np.ndarray:
        if name in self.loaded:
            return self.loaded[name]
        path = self.files[name]
        if not path.is_file():
            raise CheckpointError(f"tensor {name!r} is listed in {self.hf_dir}/"
                                  f"model.safetensors.index.json but its file {path.name} is missing")
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name)


def _load_pickle(paths: list[Path]) -> dict[str, np.ndarray]:
    import torch  # noqa: PLC0415  (only for explicitly allowed pickle checkpoints)

    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors.update({name: t.float().numpy() for name, t in state.items()})
    return tensors


def read_hf_config(hf_dir: str | os.PathLike, name: str | None = None,
                   **overrides: Any) -> LlamaConfig:
    """The LlamaConfig of an HF directory's config.json (named after the directory by default)."""
    hf_dir = store.as_path(hf_dir)
    hf_config = read_json(hf_dir / "config.json", "a Hugging Face model directory")
    return config_from_hf(hf_config, name=name or hf_dir.name, **overrides)


def read_json(path: store.AnyPath, folder_kind: str) -> Any:
    """A model folder's JSON file; CheckpointError naming the folder when missing or malformed."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{store.show(path.parent)} is not {folder_kind}: "
                                  f"no {path.name}")
        text = path.read_text()
    except CheckpointError:
        raise
    except Exception as e:  # a bucket that is missing, denied or unreachable
        if not store.is_remote(path):
            raise
        raise store.StorageError(f"cannot read {store.show(path)}: "
                                 f"{store.describe_error(e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{store.show(path)} is not valid JSON: {e}") from None


def load_hf_checkpoint(hf_dir: str | os.PathLike, *, allow_pickle: bool = False,
                       **overrides: Any) -> tuple[LlamaConfig, dict]:
    """(config, params) of an HF Llama directory (local or a URI); params are host numpy."""
    if store.is_remote(hf_dir):
        return _load_remote(str(hf_dir), allow_pickle=allow_pickle, **overrides)
    hf_dir = Path(hf_dir).expanduser()
    config = read_hf_config(hf_dir, **overrides)
    reader = _TensorReader(hf_dir, allow_pickle)
    expected = hf_shapes(config)
    present = reader.names()
    for name in sorted(expected, key=_natural_key):
        if name not in present:
            raise CheckpointError(f"tensor {name!r} is missing from {hf_dir} (config.json says "
                                  f"{config.num_layers} layers, tie_word_embeddings="
                                  f"{config.tie_embeddings})")
    unexpected = sorted(n for n in present - set(expected) if not n.endswith(_IGNORED_SUFFIXES)
                        and not (config.tie_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise CheckpointError(f"{hf_dir} holds tensors a model of this config.json does not have: "
                              f"{', '.join(unexpected[:5])}")

    dtype = config.params_dtype

    def read(name: str) -> np.ndarray:
        tensor = reader.read(name)
        if tensor.shape != expected[name]:
            raise CheckpointError(f"tensor {name!r} in {hf_dir} has shape {tensor.shape}, "
                                  f"expected {expected[name]} from config.json")
        return tensor

    by_path: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    for key, (path, expert, to_ours, _) in _layer_tensors(config).items():
        by_path.setdefault(path, {})[expert] = np.stack(
            [to_ours(read(f"model.layers.{i}.{key}")).astype(dtype)
             for i in range(config.num_layers)])
    layers: dict[str, Any] = {}
    for path, parts in by_path.items():  # [L, ...], or experts stacked into [L, E, ...]
        stacked = parts[None] if None in parts else np.stack([parts[j] for j in sorted(parts)], 1)
        node = layers
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = stacked
    params = {"embedding": read("model.embed_tokens.weight").astype(dtype),
              "layers": layers,
              "final_norm": {"scale": read("model.norm.weight").astype(dtype)}}
    if not config.tie_embeddings:
        params["lm_head"] = read("lm_head.weight").T.astype(dtype)
    return config, params


def _load_remote(uri: str, **kwargs: Any) -> tuple[LlamaConfig, dict]:
    """`load_hf_checkpoint` of a `gs://` / `s3://` HF dir, through a local copy of it."""
    name = store.as_path(uri).name
    store.check_access(uri, write=False)
    read_hf_config(uri)  # no config.json (or no bucket): refused before any weights are copied
    with tempfile.TemporaryDirectory(prefix="llamahome-hf-") as tmp:
        local = store.download_dir(uri, Path(tmp) / name)
        try:
            return load_hf_checkpoint(local, **kwargs)
        except CheckpointError as e:  # name the URI, not the temporary copy
            raise type(e)(str(e).replace(str(local), store.show(uri))) from None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def hf_tensors(config: LlamaConfig, params: dict, dtype: Any = None) -> dict[str, np.ndarray]:
    """HF-named host tensors of `params` (in `dtype`, by default the params' own)."""
    def host(x) -> np.ndarray:
        x = np.asarray(x)
        return np.ascontiguousarray(x.astype(dtype) if dtype is not None else x)

    tensors = {"model.embed_tokens.weight": host(params["embedding"]),
               "model.norm.weight": host(params["final_norm"]["scale"])}
    for key, (path, expert, _, to_hf) in _layer_tensors(config).items():
        stacked = params["layers"]
        for name in path:
            stacked = stacked[name]
        stacked = np.asarray(stacked)
        for i in range(config.num_layers):
            w = stacked[i] if expert is None else stacked[i, expert]
            tensors[f"model.layers.{i}.{key}"] = host(to_hf(w))
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = host(np.asarray(params["lm_head"]).T)
    return tensors


def save_hf_checkpoint(hf_dir: str | os.PathLike, config: LlamaConfig, params: dict, *,
                       dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes `params` as an HF Llama directory (config.json + safetensors, sharded if large).

    The directory is written under a temporary name and renamed into place (on object storage:
    uploaded with config.json last), so a killed export never leaves a half-written model
    behind; an existing non-empty `hf_dir` is refused.
    """
    tensors = hf_tensors(config, params, dtype)
    shards = _shard(tensors, max_shard_bytes)
    with new_dir(hf_dir) as tmp:
        _write_hf_dir(tmp, config, tensors, shards, dtype)
    return store.as_path(hf_dir)


def _write_hf_dir(tmp: Path, config: LlamaConfig, tensors: dict[str, np.ndarray],
                  shards: list[dict[str, np.ndarray]], dtype: Any) -> None:
    hf_config = config_to_hf(config)
    if dtype is not None:
        hf_config["torch_dtype"] = np.dtype(dtype).name
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def new_dir(out: str | os.PathLike, last: tuple[str, ...] = ("config.json",)) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds.

    A killed or failed write never leaves a half-written directory at `out`; an existing
    non-empty `out` is refused before anything is written. For a `gs://` / `s3://` `out` the
    folder is local and uploaded when the block succeeds, the files named in `last` (what
    makes the folder a model for its readers) after all others.
    """
    if store.is_remote(out):
        with _new_remote_dir(str(out), last) as tmp:
            yield tmp
        return
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists and is not empty; choose another "
                              "output directory or remove it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def refuse_nonempty(out: str | os.PathLike) -> None:
    """CheckpointError if the folder `out` (local or a URI) already holds files."""
    where = store.as_path(out)
    if where.is_dir() and any(where.iterdir()):
        raise CheckpointError(f"{store.show(out)} already exists and is not empty (an upload "
                              "cut short leaves files without config.json); choose another "
                              "output directory or remove it")


@contextlib.contextmanager
def _new_remote_dir(out: str, last: tuple[str, ...]) -> Iterator[Path]:
    store.check_access(out)
    refuse_nonempty(out)
    with tempfile.TemporaryDirectory(prefix="llamahome-out-") as tmp:
        yield Path(tmp)
        store.upload_dir(tmp, out, last=last)


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        if shards[-1] and size + tensors[name].nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    return shards
