"""Tokenizers against their own libraries used directly (sentencepiece, tokenizers) as references."""

from __future__ import annotations

import json

import pytest
import sentencepiece

from llamahome.data.tokenizer import load_tokenizer
from llamahome.errors import DataError

TEXT = "To be, or not to be: that is the question."


def test_sentencepiece_matches_library_and_places_bos_eos(sp_model_path, sp_tokenizer):
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model_path)
    ids = sp.encode(TEXT)
    assert (sp_tokenizer.vocab_size, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (32000, 1, 2)
    assert sp_tokenizer.encode(TEXT) == [1, *ids]
    assert sp_tokenizer.encode(TEXT, add_bos=False, add_eos=True) == [*ids, 2]
    assert sp_tokenizer.encode_batch([TEXT, "x"], add_eos=True) == [[1, *ids, 2], [1, *sp.encode("x"), 2]]
    assert sp_tokenizer.decode(ids) == TEXT


def _train_bpe(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_hf_tokenizer_json_from_directory_with_config(tmp_path):
    reference = _train_bpe(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = reference.encode(TEXT, add_special_tokens=False).ids
    assert tok.encode(TEXT, add_eos=True) == [0, *ids, 1]
    assert tok.decode(tok.encode(TEXT, add_bos=False)) == TEXT
    assert tok.vocab_size == reference.get_vocab_size()


def test_fingerprint_changes_with_file_and_options(tmp_path, sp_model_path):
    _train_bpe(tmp_path / "tok")
    a = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    b = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"), eos_token="<pad>")
    c = load_tokenizer(sp_model_path)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == load_tokenizer(str(tmp_path / "tok")).fingerprint


def test_chat_template_masks_only_assistant_tokens(sp_tokenizer):
    messages = [{"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "General Kenobi"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell"}]
    ids, mask = sp_tokenizer.apply_chat_template(messages)
    enc = lambda s: sp_tokenizer.encode(s, add_bos=False)  # noqa: E731
    expected, expected_mask = [1], [0]
    for m in messages:
        header, body = enc(f"<|{m['role']}|>\n"), enc(m["content"]) + [2]
        expected += header + body
        expected_mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
    assert ids == expected and mask == expected_mask
    assert sp_tokenizer.decode([i for i, k in zip(ids, mask, strict=True) if k]).split() == \
        ["General", "Kenobi", "Farewell"]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*train_tokenizer"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))
