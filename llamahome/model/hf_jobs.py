"""Jobs that convert between Hugging Face directories and LlamaHome params checkpoints.

    python -m llamahome.launch --gin_file=gin/jobs/import_hf.gin \\
        --gin_param='import_hf.hf_dir="/models/Llama-3.2-1B"'
writes <output_dir>/params (an Orbax params checkpoint, see params_io.py) and
<output_dir>/model.gin (the LlamaConfig preset of the model, for training and generation).

    python -m llamahome.launch --gin_file=gin/jobs/export_hf.gin \\
        --gin_param='export_hf.checkpoint="runs/<run>"' --gin_param='export_hf.output_dir="out"'
writes an HF directory (weights, config, the run's tokenizer) that
`transformers.LlamaForCausalLM.from_pretrained` loads; `checkpoint` is a training run dir
(latest step, or `step`), a step dir, or an import_hf output dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gin
from absl import logging

from llamahome import paths
from llamahome.jobs import job
from llamahome.model import hf, params_io
from llamahome.model.config import DTYPES, LlamaConfig, architecture_gin

PARAMS_SUBDIR = "params"
MODEL_GIN = "model.gin"


@job
def import_hf(run_dir: str, hf_dir: str = gin.REQUIRED, output_dir: str | None = None,
              param_dtype: str = "float32", allow_pickle: bool = False) -> str:
    """Converts a local HF Llama directory into <output_dir>/{params,model.gin}; returns output_dir."""
    config, params = hf.load_hf_checkpoint(hf_dir, allow_pickle=allow_pickle,
                                           param_dtype=param_dtype)
    out = Path(output_dir).expanduser() if output_dir else paths.models_dir() / config.name
    params_io.save_params(out / PARAMS_SUBDIR, params)
    (out / MODEL_GIN).write_text(f"# Imported from {Path(hf_dir).expanduser().absolute()}\n"
                                 + architecture_gin(config))
    logging.info("imported %s (%s, %d parameters) into %s", hf_dir, config.name,
                 config.num_params(), out)
    return str(out)


def _copy_tokenizer(spec_path: str | None, out: Path) -> None:
    """Puts the run's tokenizer files beside the exported weights, so the directory is whole."""
    if not spec_path:
        return
    source = Path(spec_path).expanduser()
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    files = [source] if source.is_file() else [source / n for n in names]
    for file in files:
        if file.is_file():
            shutil.copy2(file, out / file.name)


@job
def export_hf(run_dir: str, checkpoint: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
              step: int | None = None, dtype: str | None = None, register_as: str | None = None,
              parent: str | None = None) -> str:
    """Writes a checkpoint (run dir, step dir or params dir) as an HF directory; may register it.

    With `register_as`, the export becomes a new version in the model registry, recorded as a
    fine-tune of `parent` (a registry ref such as 'llama3_2_1b@1') when given.
    """
    from llamahome.hub import download, storage  # noqa: PLC0415  (hub builds on the model)
    from llamahome.infer.checkpoints import describe, load_model  # noqa: PLC0415

    model = load_model(checkpoint, step=step, config=LlamaConfig())
    out = hf.save_hf_checkpoint(output_dir, model.config, model.params,
                                dtype=DTYPES[dtype] if dtype else None)
    _copy_tokenizer(model.tokenizer.path if model.tokenizer else None, Path(out))
    logging.info("exported %s to %s", describe(model), out)
    if register_as:
        version = download.install(str(out), name=register_as, parent=parent,
                                   budget=storage.StorageBudget(), progress=False)
        logging.info("registered %s%s", version.ref, f" (fine-tune of {parent})" if parent else "")
    return str(out)
