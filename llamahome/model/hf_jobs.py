"""Jobs that convert between Hugging Face directories and LlamaHome params checkpoints.

    python -m llamahome.launch --gin_file=gin/jobs/import_hf.gin \\
        --gin_param='import_hf.hf_dir="/models/Llama-3.2-1B"'
writes <output_dir>/params (an Orbax params checkpoint, see params_io.py) and
<output_dir>/model.gin (the LlamaConfig preset of the model, for training and generation).

    python -m llamahome.launch --gin_file=gin/jobs/export_hf.gin --gin_file=<dir>/model.gin \\
        --gin_param='export_hf.params_dir="<dir>/params"' --gin_param='export_hf.output_dir="out"'
writes an HF directory that `transformers.LlamaForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

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


@job
def export_hf(run_dir: str, params_dir: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
              dtype: str | None = None) -> str:
    """Writes the params checkpoint `params_dir` of the gin-bound LlamaConfig as an HF directory."""
    config = LlamaConfig()
    params = params_io.load_params(params_dir, config)
    out = hf.save_hf_checkpoint(output_dir, config, params,
                                dtype=DTYPES[dtype] if dtype else None)
    logging.info("exported %s (%s) to %s", params_dir, config.name, out)
    return str(out)
