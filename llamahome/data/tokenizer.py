"""Tokenizers: one small protocol over HF `tokenizers` (tokenizer.json) and SentencePiece (.model).

Contract (the `Tokenizer` protocol below, what the data pipeline, training and inference
use): a tokenizer has `vocab_size`, `bos_id` (None when the vocabulary has no BOS),
`eos_id`, `pad_id`, `stop_ids` (generation ends at any of them), `chat_template` (Jinja),
`fingerprint` and `spec` (what a worker process loads it again from);
`encode(text, add_bos=None, add_eos=None) -> list[int]` and `encode_batch` (None: the files'
rule, below), `decode(ids) -> str`, `token_id(token) -> int | None`, `adds() -> (bos, eos)`,
`apply_chat_template(messages) -> (ids, loss_mask)` (the mask is 1 on the assistant turns, as
long as ids) and `chat_prompt(messages) -> ids` (the conversation so far plus the assistant's
header, to generate from). `load_tokenizer(path)` accepts a tokenizer.json, a SentencePiece
model file, or a directory holding either; `fingerprint` hashes the files and options so a
token cache is rebuilt when the tokenizer changes.

A tokenizer follows the rules of the files beside it, as `transformers` does (5.x):

- BOS / EOS around encoded text (`add_bos=None`, `add_eos=None`): tokenizer_config.json's
  `add_bos_token` / `add_eos_token` when it names either (or tokenizer.json has no
  post-processor; then both default to False, True for BOS of a `LlamaTokenizer`), else what
  tokenizer.json's post-processor adds. `True` / `False` force a token on or off.
- Special tokens: tokenizer_config.json, then special_tokens_map.json, then common names.
- Chat template: tokenizer_config.json's `chat_template` or chat_template.jinja, rendered as
  transformers renders it (chat_template.py); without one, Llama 3 headers when the vocabulary
  has them, else a plain `<|role|>\\n...` layout closed by EOS.
- Stop ids: generation_config.json's `eos_token_id` (an id or a list: Llama 3 has several), else
  EOS plus Llama 3's <|eot_id|> / <|end_of_text|> when the vocabulary has them.

`load_tokenizer` also takes a `gs://` / `s3://` URI of a tokenizer file or folder: its files are
copied to a local folder (`$TMPDIR/llamahome-tokenizers/<hash of the URI>/`) and loaded from
there, so the tokenizer's `spec` (what workers reload, what the run dir copies) is local.

A training run keeps a copy of its tokenizer in its run dir (`save_run_tokenizer`, read back
by `run_tokenizer`), so the run dir alone is enough to evaluate, generate from or export it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import gin
from absl import logging

from llamahome import files, store
from llamahome.data.chat_template import (LLAMA3_TEMPLATE, PLAIN_TEMPLATE, render_chat,
                                          render_chat_spans)
from llamahome.errors import DataError
from llamahome.files import RunDir

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
_EXTRA_STOP_NAMES = ("<|eot_id|>", "<|end_of_text|>")
# Every file that can make up a tokenizer (copied with it by import, export and training runs).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
_SIDE_FILES = TOKENIZER_FILES[2:]


class Tokenizer(Protocol):
    """What the data pipeline, training and inference need from a tokenizer."""

    vocab_size: int
    bos_id: int | None  # None: the vocabulary has no BOS (ChatML)
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # generation ends at any of these
    chat_template: str  # Jinja
    fingerprint: str
    spec: "TokenizerSpec"  # how worker processes load it again

    def encode(self, text: str, add_bos: bool | None = None,
               add_eos: bool | None = None) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     add_eos: bool | None = None) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...

    def adds(self) -> tuple[bool, bool]: ...

    def apply_chat_template(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]: ...

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """How to load a tokenizer again (in a worker process): its path and options."""

    path: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _token_name(value) -> str | None:
    """A special token's text from a config value (a string or an AddedToken dict)."""
    return value.get("content") if isinstance(value, dict) else value


def _read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json, as transformers merges them."""
    config = dict(_read_json(folder / "tokenizer_config.json"))
    for key, value in _read_json(folder / "special_tokens_map.json").items():
        config.setdefault(key, value)
    return config


def _chat_template(folder: Path, config: dict) -> str | None:
    """The model's Jinja chat template: chat_template.jinja, else tokenizer_config.json's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name", "template"}]: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_eos(folder: Path) -> list[int] | None:
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return None
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


class _Rules:
    """What both tokenizer kinds share: BOS/EOS rules, stop ids and chat templating."""

    bos_prefix: list[int]  # what `encode` puts before the text by the tokenizer's rule
    eos_suffix: list[int]  # ... and after it

    def _init_rules(self, folder: Path, config: dict) -> None:
        template = _chat_template(folder, config)
        if template is None:
            llama3 = None not in (self.token_id(t) for t in
                                  ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
            template = LLAMA3_TEMPLATE if llama3 else PLAIN_TEMPLATE
        self.chat_template = template
        stops = _generation_eos(folder)
        if stops is None:
            extra = (self.token_id(t) for t in _EXTRA_STOP_NAMES)
            stops = [self.eos_id, *(i for i in extra if i is not None)]
        self.stop_ids = tuple(dict.fromkeys(stops))
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        self.special_tokens = {k: self.token_text(i) for k, i in names.items() if i is not None}
        if (unk := _token_name(config.get("unk_token"))) is not None:
            self.special_tokens["unk_token"] = unk

    def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
        bos = self.bos_prefix if add_bos is None else [self.bos_id] if add_bos and \
            self.bos_id is not None else []
        eos = self.eos_suffix if add_eos is None else [self.eos_id] if add_eos else []
        return [*bos, *ids, *eos]

    def adds(self) -> tuple[bool, bool]:
        """(BOS, EOS): whether `encode` adds each by the tokenizer's own rule."""
        return bool(self.bos_prefix), bool(self.eos_suffix)

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of `messages` rendered with the template and its assistant header (generation)."""
        text = render_chat(self.chat_template, messages, add_generation_prompt=True,
                           **self.special_tokens)
        return self._encode_spans(text, [])[0]

    def apply_chat_template(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a loss mask that is 1 on its assistant turns."""
        text, spans = render_chat_spans(self.chat_template, messages, **self.special_tokens)
        return self._encode_spans(text, spans)


def _ordered_unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


class HFTokenizer(_Rules):
    """A `tokenizers` tokenizer.json (byte-level BPE, Llama 3, Mistral tekken, ...)."""

    def __init__(self, spec: TokenizerSpec, file: Path):
        from tokenizers import Tokenizer as _HF  # noqa: PLC0415

        self.spec = spec
        self._tok = _HF.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(file.parent)
        # ChatML tokenizers (Qwen) have no BOS at all; then nothing is ever added in front.
        self.bos_id = self._pick(spec.bos_token or config.get("bos_token"), _BOS_NAMES, "bos",
                                 required=False)
        self.eos_id = self._pick(spec.eos_token or config.get("eos_token"), _EOS_NAMES, "eos")
        pad = self._pick(spec.pad_token or config.get("pad_token"), _PAD_NAMES, "pad", required=False)
        self.pad_id = self.eos_id if pad is None else pad
        self.bos_prefix, self.eos_suffix = self._added_tokens(config)
        self._init_rules(file.parent, config)
        self.fingerprint = _fingerprint(spec, file)

    def _added_tokens(self, config: dict) -> tuple[list[int], list[int]]:
        """(prefix, suffix) encode adds, by transformers' rule (see the module docstring)."""
        if "add_bos_token" in config or "add_eos_token" in config or \
                self._tok.post_processor is None:
            llama = str(config.get("tokenizer_class", "")).startswith("LlamaTokenizer")
            bos = config.get("add_bos_token", llama)
            return ([self.bos_id] if bos and self.bos_id is not None else [],
                    [self.eos_id] if config.get("add_eos_token") else [])
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return full[:start], full[start + len(bare):]
        return [], []

    def _pick(self, name, defaults, what: str, required: bool = True) -> int | None:
        name = _token_name(name)
        for candidate in ([name] if name else list(defaults)):
            if (i := self._tok.token_to_id(candidate)) is not None:
                return i
        if name or required:
            raise DataError(f"tokenizer {self.spec.path}: no {what} token {name or defaults}; bind "
                            f"load_tokenizer.{what}_token to one of its special tokens")
        return None

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_text(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(self, text: str, add_bos: bool | None = None,
               add_eos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     add_eos: bool | None = None) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def _encode_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Ids of `text` and a mask of the tokens overlapping `spans` (as transformers does)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        mask = [int(any(s < end and e > start for start, end in spans))
                for s, e in encoding.offsets]
        return encoding.ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (BOS/EOS/pad) are dropped, as SentencePiece does."""
        return self._tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer(_Rules):
    """A SentencePiece model (Llama 1/2, Mistral v1 layout)."""

    def __init__(self, spec: TokenizerSpec, file: Path):
        import sentencepiece  # noqa: PLC0415

        self.spec = spec
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer {file}: not a SentencePiece model ({e})") from None
        config = _read_tokenizer_config(file.parent)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._special(spec.bos_token, self._sp.bos_id(), "bos")
        self.eos_id = self._special(spec.eos_token, self._sp.eos_id(), "eos")
        pad = self._special(spec.pad_token, self._sp.pad_id(), "pad", required=False)
        self.pad_id = self.eos_id if pad is None else pad
        # transformers' LlamaTokenizer: BOS on, EOS off unless tokenizer_config.json says.
        self.bos_prefix = [self.bos_id] if config.get("add_bos_token", True) else []
        self.eos_suffix = [self.eos_id] if config.get("add_eos_token", False) else []
        self._init_rules(file.parent, config)
        self.fingerprint = _fingerprint(spec, file)

    def _special(self, name: str | None, default: int, what: str, required: bool = True) -> int | None:
        if name:
            i = self.token_id(name)
            if i is None:
                raise DataError(f"tokenizer {self.spec.path}: no {what} token {name!r} in its vocabulary")
            return i
        if default < 0 and required:
            raise DataError(f"tokenizer {self.spec.path} defines no {what} token; bind "
                            f"load_tokenizer.{what}_token")
        return default if default >= 0 else None

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if i != self._sp.unk_id() or token == self._sp.id_to_piece(i) else None

    def token_text(self, i: int) -> str | None:
        return self._sp.id_to_piece(i)

    def encode(self, text: str, add_bos: bool | None = None,
               add_eos: bool | None = None) -> list[int]:
        return self._wrap(self._sp.encode(text), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     add_eos: bool | None = None) -> list[list[int]]:
        return [self._wrap(ids, add_bos, add_eos) for ids in self._sp.encode(list(texts))]

    def _encode_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Ids and span mask of `text`, encoded piece by piece between span edges and special
        tokens (SentencePiece would not read a special token's text as its id)."""
        specials = {t: i for t, i in ((self.token_text(i), i) for i in
                                      _ordered_unique([self.bos_id, self.eos_id, self.pad_id]))}
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        ids: list[int] = []
        mask: list[int] = []
        for start, end in zip(cuts, cuts[1:]):
            on = int(any(s <= start and end <= e for s, e in spans))
            piece, pos = text[start:end], 0
            while pos < len(piece):
                hits = [(piece.find(t, pos), t) for t in specials if piece.find(t, pos) >= 0]
                at, token = min(hits) if hits else (len(piece), None)
                if at > pos:
                    ids += self._sp.encode(piece[pos:at])
                if token is not None:
                    ids.append(specials[token])
                    at += len(token)
                mask += [on] * (len(ids) - len(mask))
                pos = at
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def _fingerprint(spec: TokenizerSpec, file: Path) -> str:
    """Hashes the model file, the side files that change what is encoded, and the options."""
    options = json.dumps([spec.bos_token, spec.eos_token, spec.pad_token])
    sides = [_file_hash(file.parent / name) for name in _SIDE_FILES
             if (file.parent / name).is_file()]
    return hashlib.sha256("|".join([_file_hash(file), *sides, options]).encode()).hexdigest()[:16]


def _resolve_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"tokenizer directory {path} holds neither tokenizer.json nor tokenizer.model; "
                        "point load_tokenizer.path at the tokenizer file")
    raise DataError(f"tokenizer {path} does not exist; bind load_tokenizer.path to a tokenizer.json, "
                    "a SentencePiece .model, or a directory holding one (train one with the "
                    "train_tokenizer job)")


def document_bos(tokenizer: Tokenizer, add_bos: bool | None, add_eos: bool) -> bool:
    """Whether a cached document starts with BOS (None: the tokenizer's rule); logs the layout."""
    bos = tokenizer.adds()[0] if add_bos is None else add_bos
    logging.info("documents are tokenized as %s (BOS by %s; EOS by data_pipeline.add_eos=%s, "
                 "a document boundary for pretraining)",
                 " + ".join(["BOS"] * bos + ["text"] + ["EOS"] * add_eos),
                 "the tokenizer's rule" if add_bos is None else "data_pipeline.add_bos", add_eos)
    return bos


def local_tokenizer_copy(uri: str) -> Path:
    """A local copy of the tokenizer file or folder at a `gs://` / `s3://` URI (re-fetched on
    each call, files replaced atomically); a StorageError or DataError naming the URI."""
    remote = store.as_path(uri)
    local = Path(tempfile.gettempdir()) / "llamahome-tokenizers" / hashlib.sha256(
        uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    names = TOKENIZER_FILES if not remote.suffix else (remote.name, *TOKENIZER_FILES[2:])
    folder = remote if not remote.suffix else remote.parent
    fetched = []
    for name in dict.fromkeys(names):
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001  (fsspec raises per-backend types)
            raise store.StorageError(f"cannot read tokenizer {store.show(folder / name)}: "
                                     f"{store.describe_error(e)}") from None
        files.write_bytes_atomic(local / name, data)
        fetched.append(name)
    if not fetched or (remote.suffix and remote.name not in fetched):
        store.check_access(uri, write=False)  # a missing bucket or credentials, named first
        raise DataError(f"tokenizer {store.show(uri)} does not exist; bind load_tokenizer.path "
                        "to a tokenizer.json, a SentencePiece .model, or a folder holding one")
    return local / remote.name if remote.suffix else local


def tokenizer_from_spec(spec: TokenizerSpec) -> Tokenizer:
    """Loads the tokenizer a spec describes (used by worker processes)."""
    if store.is_remote(spec.path):
        spec = dataclasses.replace(spec, path=os.fspath(local_tokenizer_copy(spec.path)))
    file = _resolve_file(Path(spec.path).expanduser())
    if file.suffix == ".json":
        return HFTokenizer(spec, file)
    return SentencePieceTokenizer(spec, file)


@gin.configurable
def load_tokenizer(path: str = gin.REQUIRED, bos_token: str | None = None,
                   eos_token: str | None = None, pad_token: str | None = None) -> Tokenizer:
    """Loads a tokenizer.json, a SentencePiece model, or a directory holding either."""
    return tokenizer_from_spec(TokenizerSpec(str(path), bos_token, eos_token, pad_token))


def train_bpe_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 8192,
                        min_frequency: int = 2,
                        special_tokens: Sequence[str] = ("<s>", "</s>", "<pad>")) -> Path:
    """Trains a byte-level BPE on `texts`; writes tokenizer.json + tokenizer_config.json into `out`."""
    from tokenizers import Tokenizer as HFTokenizerModel  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tokenizer = HFTokenizerModel(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos, pad = (list(special_tokens) + [None] * 3)[:3]
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad, "add_bos_token": bos is not None,
         "add_eos_token": False}, indent=1))
    logging.info("trained a byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return out


# --- The run's copy ---
# The train job copies the tokenizer it trains with into the run dir, so evaluating,
# generating from or exporting the run needs only the run dir, even after the original file
# (a cache entry, a download) is gone:
#     <run_dir>/tokenizer/   tokenizer.json or tokenizer.model (+ tokenizer_config.json), and
#                            spec.json {"source", "bos_token", "eos_token", "pad_token"}

SPEC_FILE = "spec.json"


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
    final = RunDir(run_dir).tokenizer
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
    folder = RunDir(run_dir).tokenizer
    if not (folder / SPEC_FILE).is_file():
        return None
    record = json.loads((folder / SPEC_FILE).read_text())
    return TokenizerSpec(str(folder), record.get("bos_token"), record.get("eos_token"),
                         record.get("pad_token"))
