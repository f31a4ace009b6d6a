"""Tokenizers: one small protocol over HF `tokenizers` (tokenizer.json) and SentencePiece (.model).

Contract (see /work/notes/contracts.md): a `Tokenizer` has `vocab_size`, `bos_id`, `eos_id`,
`pad_id`, `encode(text, add_bos=True, add_eos=False) -> list[int]`, `decode(ids) -> str`,
`apply_chat_template(messages) -> (ids, loss_mask)`. `load_tokenizer(path)` accepts a
tokenizer.json, a SentencePiece model file, or a directory holding either; `fingerprint`
hashes the file and options so a token cache is rebuilt when the tokenizer changes.

Chat template: Llama 3 headers (`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`)
when the vocabulary has them, otherwise a plain `<|role|>\\n...` layout closed by EOS. The
loss mask is 1 only on assistant content and the token that closes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import gin
from absl import logging

from llamahome.errors import DataError

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
    """What the data pipeline, training and inference need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    fingerprint: str
    spec: "TokenizerSpec"  # how worker processes load it again

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     add_eos: bool = False) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int | None: ...

    def apply_chat_template(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]: ...


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """How to load a tokenizer again (in a worker process): its path and options."""

    path: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _wrap(ids: list[int], bos: int, eos: int, add_bos: bool, add_eos: bool) -> list[int]:
    return ([bos] if add_bos else []) + ids + ([eos] if add_eos else [])


class _ChatMixin:
    """Chat templating shared by both tokenizer kinds."""

    def apply_chat_template(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Token ids of `messages` ([{role, content}]) and a loss mask over assistant tokens."""
        start, end, eot = (self.token_id(t) for t in
                           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        llama3 = None not in (start, end, eot)
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            try:
                role, content = message["role"], message["content"]
            except (KeyError, TypeError):
                raise DataError(f"chat message {i} is {message!r}; each message needs 'role' and "
                                "'content'") from None
            if llama3:
                header = [start, *self.encode(role, add_bos=False), end, *self.encode("\n\n", add_bos=False)]
                close = eot
            else:
                header = self.encode(f"<|{role}|>\n", add_bos=False)
                close = self.eos_id
            body = self.encode(content, add_bos=False) + [close]
            on = 1 if role == "assistant" else 0
            ids += header + body
            mask += [0] * len(header) + [on] * len(body)
        return ids, mask


class HFTokenizer(_ChatMixin):
    """A `tokenizers` tokenizer.json (byte-level BPE, Llama 3, Mistral tekken, ...)."""

    def __init__(self, spec: TokenizerSpec, file: Path):
        from tokenizers import Tokenizer as _HF  # noqa: PLC0415

        self.spec = spec
        self._tok = _HF.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(file.parent)
        self.bos_id = self._pick(spec.bos_token or config.get("bos_token"), _BOS_NAMES, "bos")
        self.eos_id = self._pick(spec.eos_token or config.get("eos_token"), _EOS_NAMES, "eos")
        pad = self._pick(spec.pad_token or config.get("pad_token"), _PAD_NAMES, "pad", required=False)
        self.pad_id = self.eos_id if pad is None else pad
        self.fingerprint = _fingerprint(spec, file)

    def _pick(self, name, defaults, what: str, required: bool = True) -> int | None:
        if isinstance(name, dict):  # tokenizer_config.json may hold an AddedToken dict
            name = name.get("content")
        for candidate in ([name] if name else list(defaults)):
            if (i := self._tok.token_to_id(candidate)) is not None:
                return i
        if name or required:
            raise DataError(f"tokenizer {self.spec.path}: no {what} token {name or defaults}; bind "
                            f"load_tokenizer.{what}_token to one of its special tokens")
        return None

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _wrap(ids, self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     add_eos: bool = False) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [_wrap(e.ids, self.bos_id, self.eos_id, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (BOS/EOS/pad) are dropped, as SentencePiece does."""
        return self._tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer(_ChatMixin):
    """A SentencePiece model (Llama 1/2, Mistral v1 layout)."""

    def __init__(self, spec: TokenizerSpec, file: Path):
        import sentencepiece  # noqa: PLC0415

        self.spec = spec
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer {file}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._special(spec.bos_token, self._sp.bos_id(), "bos")
        self.eos_id = self._special(spec.eos_token, self._sp.eos_id(), "eos")
        pad = self._special(spec.pad_token, self._sp.pad_id(), "pad", required=False)
        self.pad_id = self.eos_id if pad is None else pad
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

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        return _wrap(self._sp.encode(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True,
                     add_eos: bool = False) -> list[list[int]]:
        return [_wrap(ids, self.bos_id, self.eos_id, add_bos, add_eos)
                for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def _fingerprint(spec: TokenizerSpec, file: Path) -> str:
    options = json.dumps([spec.bos_token, spec.eos_token, spec.pad_token])
    return hashlib.sha256(f"{_file_hash(file)}|{options}".encode()).hexdigest()[:16]


def _read_tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


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


def tokenizer_from_spec(spec: TokenizerSpec) -> Tokenizer:
    """Loads the tokenizer a spec describes (used by worker processes)."""
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
        {"bos_token": bos, "eos_token": eos, "pad_token": pad}, indent=1))
    logging.info("tokenizer with %d tokens written to %s", tokenizer.get_vocab_size(), out)
    return out
