"""Tokenizers against their own libraries used directly (sentencepiece, tokenizers) as references."""

from __future__ import annotations

import json

import pytest
import sentencepiece

from llamahome.data.tokenizer import (document_bos, load_tokenizer, run_tokenizer, save_run_tokenizer,
                                      tokenizer_from_spec, train_bpe_tokenizer)
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
    # No post-processor and no add_bos_token: transformers adds nothing, and neither do we.
    assert tok.encode(TEXT) == ids and tok.adds() == (False, False)
    assert tok.encode(TEXT, add_bos=True, add_eos=True) == [0, *ids, 1]
    assert tok.decode(tok.encode(TEXT, add_bos=False)) == TEXT
    assert tok.vocab_size == reference.get_vocab_size()


def test_fingerprint_changes_with_file_and_options(tmp_path, sp_model_path):
    _train_bpe(tmp_path / "tok")
    a = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    b = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"), eos_token="<pad>")
    c = load_tokenizer(sp_model_path)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == load_tokenizer(str(tmp_path / "tok")).fingerprint


MESSAGES = [{"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "General Kenobi"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Farewell"}]
# ChatML with the assistant turns marked, as transformers' return_assistant_tokens_mask needs.
CHATML_MARKED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_UNMARKED = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _hf_chat_tokenizer(folder, template):
    """A transformers tokenizer with ChatML and Llama 3 specials and `template`, saved."""
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator([TEXT, *(m["content"] for m in MESSAGES)] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                              eos_token="<|end_of_text|>")
    hf.chat_template = template
    hf.save_pretrained(folder)
    return hf


def test_chat_mask_equals_transformers_assistant_mask(tmp_path):
    reference = _hf_chat_tokenizer(tmp_path / "tok", CHATML_MARKED)
    out = reference.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.apply_chat_template(MESSAGES) == (out["input_ids"], out["assistant_masks"])
    assert sum(out["assistant_masks"]) > 0
    assert tok.chat_prompt(MESSAGES[:1]) == reference.apply_chat_template(
        MESSAGES[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_chat_mask_without_marks_covers_assistant_content_and_end_of_turn(tmp_path):
    reference = _hf_chat_tokenizer(tmp_path / "tok", LLAMA3_UNMARKED)
    ids = reference.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    text = reference.apply_chat_template(MESSAGES, tokenize=False)
    encoded = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    turns = [m["content"] + "<|eot_id|>" for m in MESSAGES if m["role"] == "assistant"]
    spans = [(text.index(t), text.index(t) + len(t)) for t in turns]
    expected = [int(any(s < end and e > start for start, end in spans))
                for s, e in encoded["offset_mapping"]]
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert encoded["input_ids"] == ids
    assert tok.apply_chat_template(MESSAGES) == (ids, expected)
    eot = reference.convert_tokens_to_ids("<|eot_id|>")
    assert [i for i, k in zip(ids, expected, strict=True) if k] == [
        *reference.encode("General Kenobi", add_special_tokens=False), eot,
        *reference.encode("Farewell", add_special_tokens=False), eot]


def test_builtin_chat_layout_trains_on_what_generation_emits(sp_tokenizer):
    """A tokenizer with no template (SentencePiece): each assistant turn is the tokens after
    the generation prompt, i.e. the reply encoded on its own plus EOS."""
    ids, mask = sp_tokenizer.apply_chat_template(MESSAGES)
    prompt = sp_tokenizer.chat_prompt(MESSAGES[:1])
    reply = sp_tokenizer.encode("General Kenobi", add_bos=False) + [sp_tokenizer.eos_id]
    assert ids[:len(prompt) + len(reply)] == prompt + reply
    assert mask[:len(prompt) + len(reply)] == [0] * len(prompt) + [1] * len(reply)
    assert sp_tokenizer.decode([i for i, k in zip(ids, mask, strict=True) if k]).split() == \
        ["General", "Kenobi", "Farewell"]


def test_documents_get_bos_by_the_tokenizers_rule(tmp_path, sp_tokenizer, caplog):
    reference = _hf_chat_tokenizer(tmp_path / "tok", LLAMA3_UNMARKED)  # no BOS post-processor
    no_bos = load_tokenizer(str(tmp_path / "tok"))
    assert reference("x")["input_ids"] == reference("x", add_special_tokens=False)["input_ids"]
    with caplog.at_level("INFO"):
        assert document_bos(no_bos, None, True) is False
    assert "text + EOS (BOS by the tokenizer's rule" in caplog.text
    assert document_bos(sp_tokenizer, None, True) is True  # LlamaTokenizer: BOS on
    assert document_bos(no_bos, True, False) is True  # data_pipeline.add_bos overrides


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*train_tokenizer"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))


def test_the_run_dir_copy_loads_the_same_tokenizer(tmp_path):
    folder = train_bpe_tokenizer(["to be or not to be that is the question"] * 50,
                                 tmp_path / "cache-entry", vocab_size=300)
    original = load_tokenizer(str(folder), pad_token="<pad>")
    save_run_tokenizer(tmp_path / "run", original)
    (folder / "tokenizer.json").unlink()  # the cache entry is gone: the run still has its copy
    spec = run_tokenizer(tmp_path / "run")
    assert spec.pad_token == "<pad>"
    copy = tokenizer_from_spec(spec)
    text = "to be, or not to be"
    assert (copy.vocab_size, copy.encode(text), copy.pad_id) == (
        original.vocab_size, original.encode(text), original.pad_id)
    assert run_tokenizer(tmp_path / "elsewhere") is None
