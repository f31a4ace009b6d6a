"""The run's tokenizer: a copy kept in the run dir, and the vocabulary size it implies.

    <run_dir>/tokenizer/   tokenizer.json or tokenizer.model (+ tokenizer_config.json), and
                           spec.json {"source", "bos_token", "eos_token", "pad_token"}

The train job copies the tokenizer it trains with into the run dir, so evaluating, generating
from or exporting the run needs only the run dir, even after the original file (a cache entry,
a download) is gone. `fit_vocab` sizes the model's embedding to the tokenizer when
`LlamaConfig.vocab_size = None`, and refuses a tokenizer the model cannot embed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gin
from absl import logging

from llamahome.config.gin_text import gin_bindings
from llamahome.data.tokenizer import TOKENIZER_FILES, Tokenizer, TokenizerSpec
from llamahome.errors import ConfigError
from llamahome.model.config import LlamaConfig

TOKENIZER_DIR = "tokenizer"
SPEC_FILE = "spec.json"
VOCAB_MULTIPLE = 128  # embedding rows padded to a multiple of this: full-width matmul tiles


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def fit_vocab(config: LlamaConfig, tokenizer_size: int, checkpoint_vocab: int | None = None,
              multiple: int = VOCAB_MULTIPLE) -> LlamaConfig:
    """`config` with the vocabulary the run trains: the checkpoint's when resuming, else
    `config.vocab_size`, or (when that is None) the tokenizer's size rounded up to `multiple`.

    The chosen size is bound in gin (`LlamaConfig.vocab_size`) so checkpoints record it.
    """
    if checkpoint_vocab is not None:
        vocab, why = checkpoint_vocab, "the checkpoint's"
    elif config.vocab_size is None:
        vocab = round_up(tokenizer_size, multiple)
        why = f"the tokenizer's {tokenizer_size} tokens rounded up to a multiple of {multiple}"
    else:
        vocab, why = config.vocab_size, "bound"
    if tokenizer_size > vocab:
        raise ConfigError(
            f"the tokenizer has {tokenizer_size} tokens but the model's vocabulary is {vocab} "
            f"({why}): ids >= {vocab} would have no embedding. Use the tokenizer the model was "
            "trained with, or (for a new model) set LlamaConfig.vocab_size=None to follow the "
            "tokenizer")
    if vocab >= 2 * round_up(tokenizer_size, multiple):
        logging.warning("LlamaConfig.vocab_size %d is much larger than the tokenizer's %d tokens: "
                        "%d embedding rows are never used; set LlamaConfig.vocab_size=None to "
                        "follow the tokenizer", vocab, tokenizer_size, vocab - tokenizer_size)
    if vocab != config.vocab_size:
        logging.info("model vocabulary: %d (%s)", vocab, why)
        with gin.unlock_config():
            gin.bind_parameter("LlamaConfig.vocab_size", vocab)
    return config.replace(vocab_size=vocab)


def checkpoint_vocab(saved_config: str | None) -> int | None:
    """The `LlamaConfig.vocab_size` a checkpoint's saved gin config records (None if none)."""
    if not saved_config:
        return None
    vocab = gin_bindings(saved_config, "LlamaConfig").get("vocab_size")
    return vocab if isinstance(vocab, int) else None


def tokenizer_files(path: Path) -> list[Path]:
    """The files that make up the tokenizer at `path` (a file, or a folder holding one)."""
    if path.is_file():
        siblings = [path.parent / name for name in TOKENIZER_FILES[2:]] if path.suffix == ".json" else []
        return [path, *(f for f in siblings if f.is_file() and f != path)]
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def save_run_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> Path:
    """Copies `tokenizer`'s files into `run_dir`/tokenizer (atomically); returns that folder."""
    spec = tokenizer.spec
    source = Path(spec.path).expanduser().absolute()
    final = run_dir / TOKENIZER_DIR
    if (final / SPEC_FILE).is_file() and json.loads((final / SPEC_FILE).read_text()) == \
            _spec_record(spec, source):
        return final
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tokenizer-") as tmp:
        for file in tokenizer_files(source):
            name = file.name if file.name in TOKENIZER_FILES else (
                "tokenizer.json" if file.suffix == ".json" else "tokenizer.model")
            shutil.copy2(file, Path(tmp) / name)
        (Path(tmp) / SPEC_FILE).write_text(json.dumps(_spec_record(spec, source), indent=1))
        if final.exists():
            shutil.rmtree(final)
        Path(tmp).rename(final)
        Path(tmp).mkdir()  # TemporaryDirectory cleans up the now-empty name
    return final


def _spec_record(spec: TokenizerSpec, source: Path) -> dict:
    return {"source": str(source), "bos_token": spec.bos_token, "eos_token": spec.eos_token,
            "pad_token": spec.pad_token}


def run_tokenizer(run_dir: Path) -> TokenizerSpec | None:
    """The spec of the tokenizer saved in `run_dir`, or None when the run has no copy."""
    folder = run_dir / TOKENIZER_DIR
    if not (folder / SPEC_FILE).is_file():
        return None
    record = json.loads((folder / SPEC_FILE).read_text())
    return TokenizerSpec(str(folder), record.get("bos_token"), record.get("eos_token"),
                         record.get("pad_token"))
