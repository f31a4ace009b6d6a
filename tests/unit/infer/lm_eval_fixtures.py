"""A tiny random HF Llama with a BPE tokenizer, and lm-eval tasks over local JSON files:
one multiple-choice, one loglikelihood_rolling and one generate_until task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

WORDS = ("the king queen crown sword love death night day rose thou art fair sweet heart speak "
         "red blue green gold silver stone river hill").split()
MC_TASK, ROLLING_TASK, GEN_TASK = "tiny_mc", "tiny_rolling", "tiny_gen"
TASKS = [MC_TASK, ROLLING_TASK, GEN_TASK]


def sentence(rng: random.Random, lo: int = 3, hi: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_hf_model(out: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer that adds BOS (as Llama 2's), and a random 2-layer Llama."""
    rng = random.Random(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sentence(rng, 5, 30) for _ in range(300)], trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                  eos_token="</s>", pad_token="<pad>")
    hf_tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
                            "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharp logits, and greedy picks only tokens of printable text
        model.lm_head.weight.mul_(20.0)
        for i in range(len(hf_tok)):
            text = hf_tok.decode([i])
            if not (text.isascii() and text.isprintable() and text.strip()):
                model.lm_head.weight[i] = -model.lm_head.weight[i].abs().mean()
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def _dump(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_tasks(folder: Path, docs: int = 6, seed: int = 1) -> Path:
    """Task YAMLs (and their JSONL data) under `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    mc = [{"question": sentence(rng), "choices": [sentence(rng, 1, 3) for _ in range(3)],
           "label": rng.randrange(3)} for _ in range(docs)]
    single = [{"question": sentence(rng), "choices": [" " + w for w in rng.sample(WORDS, 4)],
               "label": 0} for _ in range(2)]  # one-token continuations: grouped requests
    files = {"mc_test": _dump(folder / "mc_test.jsonl", mc + single),
             "mc_train": _dump(folder / "mc_train.jsonl", mc[:3]),
             "text": _dump(folder / "text.jsonl",
                           [{"text": sentence(rng, 20, 110)} for _ in range(docs)]),
             "qa": _dump(folder / "qa.jsonl", [{"question": sentence(rng, 2, 6) + " is",
                                                "answer": rng.choice(WORDS)} for _ in range(docs)])}
    data = lambda **splits: {"data_files": splits}  # noqa: E731
    configs = {
        MC_TASK: {"output_type": "multiple_choice", "dataset_kwargs": data(
            test=files["mc_test"], train=files["mc_train"]), "test_split": "test",
            "fewshot_split": "train", "doc_to_text": "{{question}}:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        ROLLING_TASK: {"output_type": "loglikelihood_rolling", "dataset_kwargs": data(
            test=files["text"]), "test_split": "test", "doc_to_text": "",
            "doc_to_target": "{{text}}", "metric_list": [
                {"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                {"metric": "bits_per_byte"}]},
        GEN_TASK: {"output_type": "generate_until", "dataset_kwargs": data(test=files["qa"]),
                   "test_split": "test", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                   "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 10,
                                         "do_sample": False},
                   "metric_list": [{"metric": "exact_match"}]},
    }
    for name, config in configs.items():
        body = {"task": name, "dataset_path": "json", **config}
        (folder / f"{name}.yaml").write_text(json.dumps(body, indent=1))  # JSON is YAML
    return folder
