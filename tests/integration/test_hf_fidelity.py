"""A Hugging Face model run through the jobs behaves as it does in `transformers` (issue 18).

Random tiny models and tokenizers are built here (no hub): a Llama 2 style tokenizer whose
post-processor adds BOS, a Llama 3 style one that adds none with several eos ids in its
generation config and a Jinja chat template with a default system prompt, and a ChatML one.
`import_hf` -> `generate` (run in-process through llamahome.cli, as the launcher runs them)
must give `transformers`' greedy ids for plain and chat prompts; `train` -> `export_hf` must
give a directory whose tokenizer, chat template and `generate` match the original's.
"""

from __future__ import annotations

import json

import gin
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llamahome import cli
from tests.conftest import write_word_corpus

pytestmark = [pytest.mark.integration]

CORPUS = ["The capital of France is Paris.", "Hello there, how are you today?",
          "the king and the queen speak of love and night."] * 4
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Hello there, how are you?"}]
NEW = 12

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system"
    "<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are Qwen.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }}"
    " [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")

KINDS = {  # special tokens, bos, eos, end-of-turn, post-processor adds BOS, template
    "llama2": (["<s>", "</s>", "<unk>"], "<s>", "</s>", "</s>", True, LLAMA2_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>",
               "<|eot_id|>", False, LLAMA3_TEMPLATE),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>",
               "<|im_end|>", False, CHATML_TEMPLATE),
}


def hf_tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
    specials, bos, eos, _, adds_bos, template = KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = (processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
        (bos, tok.token_to_id(bos))]) if adds_bos else processors.ByteLevel(trim_offsets=False))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    hf.chat_template = template
    return hf


def stop_token(hf_dir, ids: list[int], eos_ids: list[int]) -> tuple[int, int]:
    """(step, token): a token that transformers' unstopped greedy run from `ids` first emits at
    step >= 2, so that listing it as an eos id must end generation right there."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = None  # see every step, past any stop id
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                         max_new_tokens=NEW, do_sample=False, pad_token_id=eos_ids[-1])
    out = out[0, len(ids):].tolist()
    for step, token in enumerate(out[2:NEW - 2], 2):
        if set(eos_ids) & set(out[:step + 1]):
            break
        if token not in out[:step]:
            return step, token
    raise AssertionError(f"no fresh token in the greedy output {out}; change the seed")


def hf_model_dir(tmp_path, kind: str):
    """(dir, step): a random tiny Llama + its tokenizer saved as an HF dir, whose generation
    config lists several eos ids; the last is the token the greedy chat reply emits at `step`
    (found from an unstopped reference run), so the reply must stop there."""
    tokenizer = hf_tokenizer(kind)
    _, _, eos, eot, _, _ = KINDS[kind]
    eos_ids = list(dict.fromkeys(tokenizer.convert_tokens_to_ids([eot, eos])))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids[-1])
    out = tmp_path / f"hf-{kind}"
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    step, token = stop_token(out, chat_ids, eos_ids)
    transformers.GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=[*eos_ids, token],
                                  pad_token_id=eos_ids[-1]).save_pretrained(out)
    return out, step


def hf_generate(hf_dir, prompt) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) of transformers' greedy generation, as a user runs it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                         max_new_tokens=NEW, do_sample=False)
    return ids, out[0, len(ids):].tolist()


def run_job(gin_files: list[str], params: list[str]):
    """One job, bound and launched in-process as `python -m llamahome.launch` does."""
    gin.clear_config()
    try:
        cli.bind_all(gin_files, params, None, None)
        return cli.launch()
    finally:
        gin.clear_config()


def generate_job(checkpoint, run_dir, prompt, extra=()) -> dict:
    chat = not isinstance(prompt, str)
    text = prompt if not chat else prompt[-1]["content"]
    return run_job(["gin/jobs/generate.gin"], [
        f"generate.checkpoint='{checkpoint}'", f"generate.prompts=[{json.dumps(text)}]",
        f"generate.chat={chat}", f"generate.max_new_tokens={NEW}", "generate.stream=False",
        "SamplerConfig.temperature=0.0", "SamplerConfig.top_p=None",
        f"launch.run_dir='{run_dir}'", *extra])[0]


@pytest.mark.parametrize("kind", ["llama2", "llama3", "chatml"])
def test_import_then_generate_matches_transformers(tmp_path, kind):
    hf_dir, step = hf_model_dir(tmp_path, kind)
    imported = run_job(["gin/jobs/import_hf.gin"], [
        f"import_hf.hf_dir='{hf_dir}'", f"import_hf.output_dir='{tmp_path / 'imported'}'",
        f"launch.run_dir='{tmp_path / 'import-run'}'"])
    for i, prompt in enumerate([PROMPT, CHAT]):
        ids, new = hf_generate(hf_dir, prompt)
        record = generate_job(imported, tmp_path / f"gen-{i}", prompt)
        assert record["prompt_tokens"] == len(ids), (kind, prompt)
        assert record["token_ids"] == new, (kind, prompt)
    # The chat reply ends on the extra eos id at `step`, well before max_new_tokens, as in HF.
    assert len(new) == step + 1 and record["finish_reason"] == "stop"


def test_generate_stops_at_a_user_stop_string(tmp_path):
    hf_dir, _ = hf_model_dir(tmp_path, "chatml")
    full = generate_job(hf_dir, tmp_path / "full", PROMPT)
    assert full["finish_reason"] == "length" and len(full["completion"]) > 4
    text = full["completion"]
    start = next(i for i in range(1, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]  # whole characters, not half a UTF-8 sequence
    cut = generate_job(hf_dir, tmp_path / "cut", PROMPT, [f"generate.stop=[{json.dumps(stop)}]"])
    assert cut["completion"] == text[:text.index(stop)]
    assert cut["finish_reason"] == "stop"
    n = len(cut["token_ids"])  # decoding ended at the stop string, not at max_new_tokens
    assert n < len(full["token_ids"]) and cut["token_ids"] == full["token_ids"][:n]


def test_train_then_export_behaves_like_the_original(tmp_path):
    hf_dir, step = hf_model_dir(tmp_path, "llama3")
    imported = tmp_path / "imported"
    run_job(["gin/jobs/import_hf.gin"], [f"import_hf.hf_dir='{hf_dir}'",
                                         f"import_hf.output_dir='{imported}'",
                                         f"launch.run_dir='{tmp_path / 'import-run'}'"])
    write_word_corpus(tmp_path / "txt", paragraphs=40)
    run_dir = tmp_path / "run"
    run_job(["gin/train/tiny_cpu.gin", str(imported / "model.gin")], [
        f"DATA_DIR='{tmp_path / 'txt'}'", f"TOKENIZER='{imported}'",
        f"CacheManager.root='{tmp_path / 'cache'}'", f"launch.run_dir='{run_dir}'",
        "train.progress_bar=False", f"train.init_from='{imported}'", "train.steps=2",
        "train.learning_rate=1e-9", "train.eval_every=0", "CheckpointConfig.async_save=False"])
    export = tmp_path / "export"
    run_job(["gin/jobs/export_hf.gin"], [f"export_hf.checkpoint='{run_dir}'",
                                         f"export_hf.output_dir='{export}'",
                                         f"launch.run_dir='{tmp_path / 'export-run'}'"])

    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    exported = transformers.AutoTokenizer.from_pretrained(export)
    conversation = [*CHAT, {"role": "assistant", "content": "Paris."}, *CHAT]
    for messages, prompt in ((conversation, False), (CHAT, True)):
        assert exported.apply_chat_template(messages, add_generation_prompt=prompt) == \
            original.apply_chat_template(messages, add_generation_prompt=prompt)
    assert exported(PROMPT)["input_ids"] == original(PROMPT)["input_ids"]
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (original.bos_token_id,
                                                                original.eos_token_id)
    for prompt in (CHAT, PROMPT):
        assert hf_generate(export, prompt) == hf_generate(hf_dir, prompt)
    _, new = hf_generate(export, CHAT)
    assert len(new) == step + 1

