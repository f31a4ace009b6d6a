"""Loading a model from any of the three places LlamaHome keeps weights.

    model = load_model("runs/20250101-120000")                 # a training run: latest step
    model = load_model("runs/20250101-120000", step=200)       # ... or a given step
    model = load_model("runs/20250101-120000/checkpoints/200") # the same, by path
    model = load_model("models/llama3_2_1b")                   # import_hf: params/ + model.gin
    model = load_model("/models/Llama-3.2-1B")                 # a Hugging Face directory
    model = load_model("models/my-adapter")                    # a LoRA adapter: base + adapters

An import_hf output dir (model/hf_jobs.py) holds `PARAMS_SUBDIR`/ (a params checkpoint,
params_io.py) and `MODEL_GIN` (the model's LlamaConfig bindings).
A training step (llamahome/train/checkpoint.py) holds the whole TrainState; only its params
are read (Orbax partial restore), so the optimizer state never reaches memory. The model
config comes from the gin config saved with the step (or the run dir's config.gin), a
params checkpoint's model.gin, or an HF config.json; `config` stands in when there is none.
A training run's tokenizer is the copy in its run dir (`<run_dir>/tokenizer/`), else the one
its config binds; other kinds use the tokenizer files beside the weights.
`overrides` change run-time fields (e.g. dtype="bfloat16"). With a mesh the params are
restored directly onto their shardings from the logical axis rules.

LoRA adapters (model/lora.py) are checkpoints too: a LoRA training step (its state holds the
adapters, and `adapter.json` sits beside it) or an adapter directory (import_peft's output, a
LoRA export_hf: PEFT's adapter_config.json + adapter_model.safetensors, plus `adapter.json`).
Loading one loads its base from `adapter.json` (base path and step), refuses a base whose
`params_digest` differs from the recorded one, and returns the base params with `lora` and
`adapters` set, unmerged: `Llama(config, lora).apply({"params": params, "lora": adapters})`.
A PEFT directory without `adapter.json` names no base LlamaHome can verify: import it with
the import_peft job first. An adapter trained on a quantized base (QLoRA, adapter.json's
base.quant) is applied to the full-precision base, as PEFT applies QLoRA adapters.

Any of these may be a `gs://` or `s3://` URI (llamahome/store.py). Arrays are read from the
bucket directly (Orbax, TensorStore); small files (the saved gin config, a run dir's
config.gin, adapter.json, model.gin) are read as objects. A training step there is taken only
once sealed (its `llamahome_manifest.json`, train/checkpoint.py): the newest sealed step of a
run dir, and a named step that is not sealed is refused. What only reads local folders, a
Hugging Face or PEFT directory and a tokenizer's files, is first downloaded into a temporary
local folder (`_local_copy`), removed when the process exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, SingleDeviceSharding

from llamahome import store
from llamahome.config.gin_config import gin_bindings
from llamahome.data import tokenizer as tokenizer_lib
from llamahome.data.tokenizer import TokenizerSpec, run_tokenizer
from llamahome.errors import CheckpointError
from llamahome.files import RunDir
from llamahome.model import hf, lora, params_io, peft
from llamahome.model.llama import (
    LlamaConfig,
    adapter_logical_axes,
    adapter_shapes,
    param_logical_axes,
    param_shapes,
)
from llamahome.parallel.mesh import Rules, logical_shardings

PARAMS_SUBDIR = "params"
MODEL_GIN = "model.gin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MANIFEST = "llamahome_manifest.json"  # a sealed training step (train/checkpoint.py MANIFEST)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model config, its params (device arrays), and its tokenizer if the checkpoint says.

    For a LoRA adapter, `params` is its base, and `lora` / `adapters` are set (see above).
    """

    config: LlamaConfig
    params: dict
    tokenizer: TokenizerSpec | None
    kind: str  # "train" | "params" | "hf" | "adapter"
    path: store.AnyPath  # the step dir, params dir, HF dir or adapter dir read
    step: int | None = None
    gin_config: str | None = None  # a training step's saved gin config (its data, its schedule)
    lora: lora.LoraConfig | None = None
    adapters: dict | None = None
    adapter_meta: lora.AdapterMeta | None = None  # its adapter.json: which base, its digest


def _is_step_dir(path: store.AnyPath) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def _sealed(step_dir: store.AnyPath) -> bool:
    """Whether a step may be read: always on local disk, once sealed on object storage."""
    return not store.is_remote(step_dir) or (step_dir / MANIFEST).is_file()


def _steps(checkpoints: store.AnyPath) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if _is_step_dir(p) and _sealed(p))


def _local_copy(remote: store.AnyPath, files: tuple[str, ...] | None = None) -> Path:
    """A temporary local copy of the folder `remote` (only its top-level `files` if given), for
    readers of local folders (HF, PEFT, tokenizers); removed when the process exits."""
    digest = hashlib.sha256(store.uri(remote).encode()).hexdigest()[:12]
    local = Path(tempfile.mkdtemp(prefix=f"llamahome-{digest}-"))
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    if files is None:
        return store.download_dir(remote, local)
    for name in files:
        if (remote / name).is_file():
            (local / name).write_bytes((remote / name).read_bytes())
    return local


def resolve(path: str | Path, step: int | None = None) -> tuple[str, store.AnyPath]:
    """(kind, directory) of what `path` names: a train step dir, a params checkpoint, an HF dir.

    An HF or PEFT directory on object storage is returned as a local copy (`_local_copy`).
    """
    path = store.resolve(path)
    remote = store.is_remote(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {store.show(path)} does not exist")
    # A PEFT dir before config.json: an adapter dir may hold a copy of it (peft.is_peft_dir).
    for kind, marker in (("adapter", peft.CONFIG_FILE), ("hf", "config.json")):
        if (path / marker).is_file():
            return kind, _local_copy(path) if remote else path
    if _is_step_dir(path):
        if not _sealed(path):
            raise CheckpointError(f"{store.show(path)} has no {MANIFEST}: its save did not finish "
                                  "(on object storage a step is read once sealed); use another "
                                  "step")
        return "train", path
    if (path / RunDir.CHECKPOINTS_DIR).is_dir():
        path = path / RunDir.CHECKPOINTS_DIR
    if path.name == RunDir.CHECKPOINTS_DIR:
        steps = _steps(path)
        if not steps:
            raise CheckpointError(f"{store.show(path)} holds no finished checkpoint step yet")
        if step is None:
            return "train", path / str(steps[-1])
        if step not in steps:
            raise CheckpointError(f"{store.show(path)} has no step {step}; it has steps {steps}")
        return "train", path / str(step)
    if (path / PARAMS_SUBDIR).is_dir():
        return "params", path / PARAMS_SUBDIR
    if (path / "_CHECKPOINT_METADATA").is_file() or (path / "_METADATA").is_file():
        return "params", path
    raise CheckpointError(
        f"{store.show(path)} is not a checkpoint: expected a training run dir (with "
        "checkpoints/<step>/), a step dir, an import_hf output (params/ + model.gin), a Hugging "
        "Face directory (config.json + safetensors) or a LoRA adapter (adapter_config.json + "
        "adapter.json)")


def _run_tokenizer(run_dir: store.AnyPath) -> TokenizerSpec | None:
    """The run dir's own tokenizer copy (data/tokenizer.py), downloaded if the run is remote."""
    if store.is_remote(run_dir):
        folder = run_dir / RunDir.TOKENIZER_DIR
        if not folder.is_dir():
            return None
        local = _local_copy(run_dir, ())
        store.download_dir(folder, local / RunDir.TOKENIZER_DIR)
        run_dir = local
    return run_tokenizer(run_dir)


def _saved_gin_config(step_dir: store.AnyPath) -> str:
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            return checkpointer.restore(step_dir / "config")["gin_config"]
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        run_config = step_dir.parent.parent / RunDir.CONFIG_FILE  # in the bucket for a remote run
        if run_config.is_file():
            return run_config.read_text()
        raise CheckpointError(f"{store.show(step_dir)} has no saved gin config (config/) and its "
                              "run dir no config.gin; cannot tell which model it holds") from None


def _config_from_gin(text: str, where: store.AnyPath) -> LlamaConfig:
    fields = gin_bindings(text, "LlamaConfig")
    try:
        return LlamaConfig(**fields)
    except TypeError as e:
        raise CheckpointError(f"the LlamaConfig bindings of {store.show(where)} do not build a "
                              f"config: {e}")


def _tokenizer_in(*folders: store.AnyPath) -> TokenizerSpec | None:
    for folder in folders:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                if store.is_remote(folder):  # tokenizer.json, its config, its chat template...
                    folder = _local_copy(folder, tokenizer_lib.TOKENIZER_FILES)
                return TokenizerSpec(str(folder))
    return None


def _tokenizer_bound(gin_text: str) -> TokenizerSpec | None:
    """The tokenizer a training run's gin config binds (load_tokenizer.*)."""
    bound = gin_bindings(gin_text, "load_tokenizer")
    if not isinstance(bound.get("path"), str) or "<redacted>" in bound["path"]:
        return None
    return TokenizerSpec(bound["path"], *(bound.get(f"{t}_token") for t in ("bos", "eos", "pad")))


def _shardings(config: LlamaConfig, mesh: Mesh | None, rules: Rules | None,
               adapters: lora.LoraConfig | None = None):
    """Shardings of the params (or, given a LoraConfig, of the adapters) by the axis rules."""
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shapes = adapter_shapes(config, adapters) if adapters else param_shapes(config)
        return jax.tree.map(lambda _: device, shapes)
    axes = adapter_logical_axes(config, adapters) if adapters else param_logical_axes(config)
    return logical_shardings(axes, mesh, rules)


def _restore_train_params(step_dir: store.AnyPath, config: LlamaConfig, shardings,
                          shapes: dict | None = None) -> dict:
    """The state's "params" (the adapters of a LoRA step, with their `shapes`), partially read."""
    shapes = param_shapes(config) if shapes is None else shapes
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                                target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args},
                partial_restore=True))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot read the params of {store.show(step_dir)}: {e}") from e
    return restored["params"]


def load_model(path: str | Path, *, step: int | None = None, config: LlamaConfig | None = None,
               mesh: Mesh | None = None, rules: Rules | None = None,
               **overrides: Any) -> LoadedModel:
    """Reads config and params from a run dir / step dir / params checkpoint / HF directory,
    or a LoRA adapter's base params and adapters."""
    kind, where = resolve(path, step)
    meta = lora.read_meta(where) if kind in ("train", "adapter") else None
    if meta is not None:
        return _load_adapter(kind, where, meta, mesh, rules, overrides)
    if kind == "adapter":
        raise CheckpointError(f"{where} is a PEFT adapter without the adapter.json that names its "
                              "base; load it onto its base with the import_peft job "
                              "(gin/jobs/import_peft.gin)")
    if kind == "hf":
        hf_config, host_params = hf.load_hf_checkpoint(where, **overrides)
        params = jax.device_put(host_params, _shardings(hf_config, mesh, rules))
        return LoadedModel(hf_config, params, _tokenizer_in(where), kind, where)
    if kind == "train":
        text = _saved_gin_config(where)
        model_config = _config_from_gin(text, where).replace(**overrides)
        params = _restore_train_params(where, model_config,
                                       _shardings(model_config, mesh, rules))
        # The run's own copy (data/tokenizer.py) outlives the file it was trained from.
        tokenizer = _run_tokenizer(where.parent.parent) or _tokenizer_bound(text)
        return LoadedModel(model_config, params, tokenizer, kind, where, int(where.name), text)
    model_gin = where.parent / MODEL_GIN
    if model_gin.is_file():
        model_config = _config_from_gin(model_gin.read_text(), model_gin)
    elif config is not None:
        model_config = config
    else:
        raise CheckpointError(f"{store.show(where)} has no model.gin beside it; bind the LlamaConfig preset "
                              "it was made with (e.g. --gin_file=gin/models/<name>.gin)")
    model_config = model_config.replace(**overrides)
    params = params_io.load_params(where, model_config, _shardings(model_config, mesh, rules))
    return LoadedModel(model_config, params, _tokenizer_in(where.parent, where), kind, where)


def _load_adapter(kind: str, where: store.AnyPath, meta: lora.AdapterMeta, mesh: Mesh | None,
                  rules: Rules | None, overrides: dict) -> LoadedModel:
    """The base of `meta` (digest checked) with the adapters of `where` (a step or PEFT dir)."""
    arch = _config_from_gin(meta.architecture, where / lora.META_FILE)
    text, held = None, {}
    if kind == "train":  # the digest covers dtypes: read the base as the run held it
        text = _saved_gin_config(where)
        held = {"param_dtype": _config_from_gin(text, where).param_dtype}
    base = load_model(meta.base_path, step=meta.base_step, config=arch, mesh=mesh, rules=rules,
                      **{**held, **overrides})
    if base.lora is not None:
        raise CheckpointError(f"{store.show(where)}: its base {meta.base_path} is itself an adapter; "
                              "adapters go on a plain base model")
    lora.check_base(meta, lora.params_digest(base.params), store.show(where))
    if meta.base_quant:
        logging.info("%s was trained on its base quantized to %s; it runs on the base as "
                     "stored", where, meta.base_quant)
    shardings = _shardings(base.config, mesh, rules, meta.lora)
    if kind == "train":
        adapters = _restore_train_params(where, base.config, shardings,
                                         adapter_shapes(base.config, meta.lora))
        tokenizer = _run_tokenizer(where.parent.parent) or _tokenizer_bound(text)
        step = int(where.name)
    else:
        step, tokenizer = None, _tokenizer_in(where)
        _, host = peft.load_peft_adapter(where, base.config)
        adapters = jax.device_put(host, shardings)
    return dataclasses.replace(
        base, tokenizer=tokenizer or base.tokenizer, kind=kind, path=where, step=step,
        gin_config=text or base.gin_config, lora=meta.lora, adapters=adapters, adapter_meta=meta)


def load_params_for(path: str | Path, config: LlamaConfig, shardings, *,
                    step: int | None = None) -> dict:
    """Params for `config` from any checkpoint kind (what `train.init_from` starts from)."""
    kind, where = resolve(path, step)
    if kind == "adapter" or (kind == "train" and lora.read_meta(where)):
        raise CheckpointError(f"{store.show(where)} is a LoRA adapter, not a full model; start from its base "
                              "(train.init_from = its base) or merge it first (export_hf with "
                              "export_hf.merged=True)")
    if kind == "train":
        return _restore_train_params(where, config, shardings)
    if kind == "params":
        return params_io.load_params(where, config, shardings)
    hf_config, host_params = hf.load_hf_checkpoint(where, param_dtype=config.param_dtype)
    expected = jax.tree.map(lambda x: x.shape, param_shapes(config))
    found = jax.tree.map(lambda x: x.shape, host_params)
    if expected != found:
        raise CheckpointError(f"{where} holds a {hf_config.name} model whose parameter shapes differ "
                              f"from the bound LlamaConfig ({config.name}); bind the matching preset "
                              "(e.g. --gin_file=gin/models/<name>.gin)")
    return jax.device_put(host_params, shardings)


def describe(model: LoadedModel) -> str:
    """One line naming what was loaded."""
    at = f" step {model.step}" if model.step is not None else ""
    what = (f"{model.config.name} ({model.config.num_params():,} params) from {model.kind} "
            f"checkpoint {store.show(model.path)}{at}")
    meta = model.adapter_meta
    if meta is None:
        return what
    return (f"{what}: LoRA r={meta.lora.rank} on {', '.join(meta.lora.targets)} over base "
            f"{meta.base_ref} ({meta.base_path})")

