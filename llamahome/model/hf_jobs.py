"""Jobs that convert between Hugging Face directories and LlamaHome params checkpoints.

    python -m llamahome.launch --gin_file=gin/jobs/import_hf.gin \\
        --gin_param='import_hf.hf_dir="/models/Llama-3.2-1B"'
writes <output_dir>/params (an Orbax params checkpoint, see params_io.py),
<output_dir>/model.gin (the LlamaConfig preset of the model, for training and generation) and
the model's tokenizer files, chat template and generation config (data/tokenizer.py's
TOKENIZER_FILES), so every job runs on the import with no tokenizer flag.

    python -m llamahome.launch --gin_file=gin/jobs/export_hf.gin \\
        --gin_param='export_hf.checkpoint="runs/<run>"' --gin_param='export_hf.output_dir="out"'
writes an HF directory that `transformers` loads and runs like the model it came from: weights,
config.json with the bos/eos/pad ids, the run's tokenizer files with its chat template, and
generation_config.json (the model's own, else one whose `eos_token_id` lists the tokenizer's
stop ids). `checkpoint` is a training run dir (latest step, or `step`), a step dir, an
import_hf output dir or `model:name@N`. A LoRA checkpoint (a LoRA run, an import_peft output)
is written as a PEFT adapter dir that `peft.PeftModel.from_pretrained(base, out)` loads
(adapter_config.json + adapter_model.safetensors, plus LlamaHome's adapter.json naming the
base, so the export is itself a checkpoint every job takes); with `export_hf.merged=True` the
adapters are folded into the base and a plain HF model is written.

    python -m llamahome.launch --gin_file=gin/jobs/import_peft.gin \
        --gin_param='import_peft.adapter_dir="/adapters/my-lora"' \
        --gin_param='import_peft.base="model:llama3_2_1b@1"'
loads a PEFT LoRA adapter onto its base (any checkpoint: a registry ref, an import_hf output,
an HF dir) into <output_dir> (default <models_dir>/<adapter dir name>): the adapter in PEFT
form, adapter.json (the base's path, step and content digest, verified whenever the adapter
is loaded) and the base's tokenizer files. With `register_as` it becomes a registry version
whose parent is the base (when the base is a registry ref).

Every directory here may be a `gs://` or `s3://` URI (store.py). A remote output is checked
for write access (`store.check_access`) before anything is read or written, and is made whole
by the file its readers look for, written last: an import's model.gin (after params/ and the
tokenizer files; an import without it is refused, not loaded), an export's config.json or an
adapter's adapter.json then adapter_config.json (the export is written to a local folder and
uploaded, those last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gin
from absl import logging

from llamahome import store
from llamahome.data.tokenizer import TOKENIZER_FILES, TokenizerSpec, tokenizer_from_spec
from llamahome.errors import CheckpointError
from llamahome.files import models_dir
from llamahome.hub import download, storage
from llamahome.hub.registry import MODEL_REF_PREFIX, Registry, parse_ref, resolve_model_path
from llamahome.jobs import job
from llamahome.model import hf, lora, params_io, peft
from llamahome.model.checkpoints import (
    MODEL_GIN,
    PARAMS_SUBDIR,
    LoadedModel,
    describe,
    load_model,
)
from llamahome.model.llama import DTYPES, LlamaConfig, architecture_gin


@job
def import_hf(run_dir: str, hf_dir: str = gin.REQUIRED, output_dir: str | None = None,
              param_dtype: str = "float32", allow_pickle: bool = False) -> str:
    """Converts an HF Llama directory into <output_dir>/{params,model.gin}; returns output_dir."""
    if store.is_remote(hf_dir):
        store.check_access(hf_dir, write=False)
    out = store.as_path(output_dir) if output_dir else models_dir() / hf.read_hf_config(hf_dir).name
    _check_import_output(out)
    config, params = hf.load_hf_checkpoint(hf_dir, allow_pickle=allow_pickle,
                                           param_dtype=param_dtype)
    params_io.save_params(os.fspath(out / PARAMS_SUBDIR), params)
    copied = _copy_tokenizer(store.as_path(hf_dir), out)
    if not any(name in copied for name in TOKENIZER_FILES[:2]):
        logging.warning("%s holds no tokenizer.json or tokenizer.model; generate and evaluate on "
                        "the import will need a tokenizer flag", store.show(hf_dir))
    # model.gin last: it is what makes the folder a finished import (see _check_import_output).
    _write(out / MODEL_GIN, (f"# Imported from {store.show(store.resolve(hf_dir))}\n"
                             + architecture_gin(config)).encode())
    logging.info("imported %s (%s, %d parameters) into %s", store.show(hf_dir), config.name,
                 config.num_params(), store.show(out))
    return os.fspath(out)


def _check_import_output(out: store.AnyPath) -> None:
    """Refuses an output dir that cannot be written, or that holds an import (whole or cut
    short: params/ without the model.gin written last) before anything is written."""
    store.check_access(os.fspath(out))
    if (out / PARAMS_SUBDIR).exists():
        state = "a finished import" if (out / MODEL_GIN).is_file() else (
            "an unfinished import (params/ but no model.gin: it was cut short)")
        raise CheckpointError(f"{store.show(out)} already holds {state}; choose another "
                              "import_hf.output_dir or remove it")


def _write(path: store.AnyPath, data: bytes) -> None:
    """One whole file: a local write, or one PUT (store.put) for an object."""
    if store.is_remote(path):
        store.put(path, data)
    else:
        Path(path).write_bytes(data)


def _copy_tokenizer(source: store.AnyPath, out: store.AnyPath) -> list[str]:
    """Copies the tokenizer files of `source` (a folder, or a tokenizer file) into `out`."""
    source = store.as_path(source)
    folder = source if source.is_dir() else source.parent
    files = [folder / name for name in TOKENIZER_FILES]
    if source.is_file():  # a tokenizer file under another name
        files = [source, *(f for f in files[2:])]
    copied = []
    for file in files:
        if file.is_file():
            name = file.name if file.name in TOKENIZER_FILES else (
                "tokenizer.json" if file.suffix == ".json" else "tokenizer.model")
            _write(out / name, file.read_bytes())
            copied.append(name)
    return copied


def _write_generation_config(out: Path, hf_config: dict, stop_ids: list[int]) -> None:
    """The copied generation_config.json with the model's special ids, else a new one."""
    path = out / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {"eos_token_id": stop_ids}
    for key in ("bos_token_id", "pad_token_id"):
        config.setdefault(key, hf_config[key])
    config.setdefault("eos_token_id", stop_ids)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _add_special_ids(out: Path, spec: TokenizerSpec) -> None:
    """Records the tokenizer's bos/eos/pad ids in config.json and generation_config.json, and its
    special tokens and chat template in tokenizer_config.json, as transformers' own saves do."""
    tokenizer = tokenizer_from_spec(dataclasses.replace(spec, path=str(out)))
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id)
    config_path.write_text(json.dumps(hf_config, indent=2) + "\n")
    _write_generation_config(out, hf_config, list(tokenizer.stop_ids))
    tokenizer_config = out / "tokenizer_config.json"
    saved = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    for key, token in tokenizer.special_tokens.items():
        saved.setdefault(key, token)
    if not (out / "chat_template.jinja").is_file():
        saved.setdefault("chat_template", tokenizer.chat_template)
    tokenizer_config.write_text(json.dumps(saved, indent=2) + "\n")


@job
def export_hf(run_dir: str, checkpoint: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
              step: int | None = None, dtype: str | None = None, register_as: str | None = None,
              parent: str | None = None, merged: bool = False) -> str:
    """Writes a checkpoint as an HF directory (a LoRA one as a PEFT adapter dir, or merged into
    a plain HF model with `merged`); may register it.

    With `register_as`, the export becomes a new version in the model registry, recorded as a
    fine-tune of `parent` (a registry ref such as 'llama3_2_1b@1') when given; an adapter's
    parent defaults to its base when that is a registry version. A `gs://` / `s3://`
    output_dir is written locally, then uploaded with the file that makes it a model last.
    """
    if store.is_remote(output_dir):  # refused before the model is read
        store.check_access(output_dir)
        hf.refuse_nonempty(output_dir)
    model = load_model(resolve_model_path(checkpoint, run_dir), step=step, config=LlamaConfig())
    np_dtype = DTYPES[dtype] if dtype else None
    with _staged(output_dir) as out:
        if model.lora is not None and not merged:
            _write_adapter(out, model, model.adapter_meta, np_dtype)
        else:
            params = model.params
            if model.lora is not None:
                params = lora.merge(model.params, model.adapters, model.lora)
            hf.save_hf_checkpoint(out, model.config, params, dtype=np_dtype)
            _add_tokenizer(out, model, checkpoint)
        if register_as:
            _register(out, register_as, parent or (None if merged else _base_parent(model)),
                      source=store.show(output_dir) if store.is_remote(output_dir) else None)
    logging.info("exported %s to %s%s", describe(model), store.show(output_dir),
                 " (adapters merged)" if model.lora is not None and merged else "")
    return os.fspath(store.as_path(output_dir))


# The files that make a folder a model for its readers, uploaded last: a PEFT adapter's
# adapter.json then adapter_config.json (checkpoints.resolve and PEFT look for it), an HF
# dir's config.json.
MARKERS = ("adapter.json", "adapter_config.json", "config.json")


@contextlib.contextmanager
def _staged(output_dir: str) -> Iterator[Path]:
    """`output_dir` itself when local; for a URI, a local folder uploaded there (MARKERS last)
    when the block succeeds."""
    if not store.is_remote(output_dir):
        yield Path(output_dir).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="llamahome-export-") as tmp:
        local = Path(tmp) / store.as_path(output_dir).name
        yield local
        store.upload_dir(local, output_dir, last=MARKERS)


def _add_tokenizer(out: Path, model: LoadedModel, checkpoint: str) -> None:
    if model.tokenizer is None:
        logging.warning("%s names no tokenizer: the export has no tokenizer, chat template or "
                        "generation config; train with load_tokenizer.path bound", checkpoint)
        return
    _copy_tokenizer(store.as_path(model.tokenizer.path), Path(out))
    _add_special_ids(Path(out), model.tokenizer)


def _base_parent(model: LoadedModel) -> str | None:
    """The registry version holding an adapter's base, when it was named as `model:name[@N]`
    (the version its files are in, so `model:name` names the version trained on)."""
    meta = model.adapter_meta
    if meta is None or not meta.base_ref.startswith(MODEL_REF_PREFIX):
        return None
    registry = Registry(models_dir())
    name, _ = parse_ref(meta.base_ref[len(MODEL_REF_PREFIX):])
    base = os.fspath(store.resolve(meta.base_path))

    def holds(directory: store.AnyPath) -> bool:
        root = os.fspath(store.resolve(directory if store.is_remote(directory)
                                       else Path(directory).resolve()))
        return base == root or base.startswith(root.rstrip("/") + "/")

    return next((v.ref for v in registry.list(name) if holds(registry.version_dir(v))), None)


def _register(out: Path, name: str, parent: str | None, source: str | None = None) -> None:
    version = download.install(str(out), name=name, parent=parent, recorded_source=source,
                               budget=storage.StorageBudget(), progress=False)
    logging.info("registered %s%s", version.ref, f" (parent {version.parent})"
                 if version.parent else "")


def _write_adapter(output_dir: str | Path, model: LoadedModel, meta: lora.AdapterMeta,
                   dtype=None) -> Path:
    """A PEFT adapter dir of `model`'s adapters with its adapter.json and tokenizer files.

    Its base_model_name_or_path is the base's directory when transformers can load it (an HF
    dir, e.g. a registered Hub model), else the base as the user named it.
    """
    is_hf = (store.as_path(meta.base_path) / "config.json").is_file()
    with hf.new_dir(output_dir, last=MARKERS) as tmp:
        peft.write_peft_files(tmp, model.config, model.adapters, model.lora,
                              base_name=meta.base_path if is_hf else meta.base_ref, dtype=dtype)
        lora.write_meta(tmp, meta)
        if model.tokenizer is not None:
            _copy_tokenizer(store.as_path(model.tokenizer.path), tmp)
    return store.as_path(output_dir)


@job
def import_peft(run_dir: str, adapter_dir: str = gin.REQUIRED, base: str = gin.REQUIRED,
                output_dir: str | None = None, register_as: str | None = None) -> str:
    """Loads a PEFT LoRA adapter onto `base` as a LlamaHome adapter dir; returns output_dir."""
    base_model = load_model(resolve_model_path(base, run_dir), config=LlamaConfig())
    if base_model.lora is not None:
        raise CheckpointError(f"import_peft.base={base!r} is itself a LoRA adapter; name its "
                              "base model instead")
    lora_config, adapters = peft.load_peft_adapter(adapter_dir, base_model.config)
    meta = lora.AdapterMeta(
        lora=lora_config, base_ref=base, base_path=str(base_model.path), base_step=base_model.step,
        base_digest=lora.params_digest(base_model.params), base_quant=None,
        architecture=architecture_gin(base_model.config))
    out = (store.as_path(output_dir) if output_dir
           else models_dir() / store.as_path(adapter_dir).name)
    store.check_access(os.fspath(out))
    model = dataclasses.replace(base_model, lora=lora_config, adapters=adapters)
    _write_adapter(out, model, meta)
    logging.info("imported LoRA adapter %s (r=%d on %s) onto %s into %s", store.show(adapter_dir),
                 lora_config.rank, ", ".join(lora_config.targets), describe(base_model),
                 store.show(out))
    if register_as:
        _register(out, register_as, _base_parent(dataclasses.replace(model, adapter_meta=meta)))
    return str(out)
