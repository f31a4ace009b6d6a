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
stop ids). `checkpoint` is a training run dir (latest step, or `step`), a step dir, or an
import_hf output dir.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gin
from absl import logging

from llamahome.data.tokenizer import TOKENIZER_FILES, TokenizerSpec, tokenizer_from_spec
from llamahome.files import models_dir
from llamahome.hub import download, storage
from llamahome.jobs import job
from llamahome.model import hf, params_io
from llamahome.model.checkpoints import MODEL_GIN, PARAMS_SUBDIR, describe, load_model
from llamahome.model.llama import DTYPES, LlamaConfig, architecture_gin


@job
def import_hf(run_dir: str, hf_dir: str = gin.REQUIRED, output_dir: str | None = None,
              param_dtype: str = "float32", allow_pickle: bool = False) -> str:
    """Converts a local HF Llama directory into <output_dir>/{params,model.gin}; returns output_dir."""
    config, params = hf.load_hf_checkpoint(hf_dir, allow_pickle=allow_pickle,
                                           param_dtype=param_dtype)
    out = Path(output_dir).expanduser() if output_dir else models_dir() / config.name
    params_io.save_params(out / PARAMS_SUBDIR, params)
    copied = _copy_tokenizer(Path(hf_dir).expanduser(), out)
    if not any(name in copied for name in TOKENIZER_FILES[:2]):
        logging.warning("%s holds no tokenizer.json or tokenizer.model; generate and evaluate on "
                        "the import will need a tokenizer flag", hf_dir)
    (out / MODEL_GIN).write_text(f"# Imported from {Path(hf_dir).expanduser().absolute()}\n"
                                 + architecture_gin(config))
    logging.info("imported %s (%s, %d parameters) into %s", hf_dir, config.name,
                 config.num_params(), out)
    return str(out)


def _copy_tokenizer(source: Path, out: Path) -> list[str]:
    """Copies the tokenizer files of `source` (a folder, or a tokenizer file) into `out`."""
    folder = source if source.is_dir() else source.parent
    files = [folder / name for name in TOKENIZER_FILES]
    if source.is_file():  # a tokenizer file under another name
        files = [source, *(f for f in files[2:])]
    copied = []
    for file in files:
        if file.is_file():
            name = file.name if file.name in TOKENIZER_FILES else (
                "tokenizer.json" if file.suffix == ".json" else "tokenizer.model")
            shutil.copy2(file, out / name)
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
              parent: str | None = None) -> str:
    """Writes a checkpoint (run dir, step dir or params dir) as an HF directory; may register it.

    With `register_as`, the export becomes a new version in the model registry, recorded as a
    fine-tune of `parent` (a registry ref such as 'llama3_2_1b@1') when given.
    """
    model = load_model(checkpoint, step=step, config=LlamaConfig())
    out = hf.save_hf_checkpoint(output_dir, model.config, model.params,
                                dtype=DTYPES[dtype] if dtype else None)
    if model.tokenizer is None:
        logging.warning("%s names no tokenizer: the export has no tokenizer, chat template or "
                        "generation config; train with load_tokenizer.path bound", checkpoint)
    else:
        _copy_tokenizer(Path(model.tokenizer.path).expanduser(), Path(out))
        _add_special_ids(Path(out), model.tokenizer)
    logging.info("exported %s to %s", describe(model), out)
    if register_as:
        version = download.install(str(out), name=register_as, parent=parent,
                                   budget=storage.StorageBudget(), progress=False)
        logging.info("registered %s%s", version.ref, f" (fine-tune of {parent})" if parent else "")
    return str(out)
