"""lm-eval loglikelihood throughput: LlamaHomeLM against lm-eval's `hf` backend; one JSON line.

    python benchmarks/lm_eval.py [--hidden 512] [--layers 8] [--docs 100] [--batch_size 16]
                                 [--repeats 3]

A random Llama (transformers, float32; `--hidden`, `--layers`, 8 heads / 4 KV heads) with a
byte-level BPE tokenizer is saved as a Hugging Face directory, and both backends load it: lm-eval's
HFLM (eager PyTorch on CPU, float32) and LlamaHomeLM (the same weights imported). The requests
are those of a 4-way multiple-choice task over `--docs` generated documents (contexts of 30-120
words, continuations of 1-6 words), built once by lm-eval and scored by both at the same batch
size. After one warm-up each (LlamaHomeLM compiles one scoring function per length bucket), the
two alternate, one run each per round, so a shared machine slows both alike. Figures are medians
over `--repeats` rounds with (min, max); "speedup" is the median of the rounds' ratios;
"max_abs_diff" the largest difference of a request's log-likelihood between the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name is the package's: keep its folder off the import path, so `lm_eval` is lm-eval.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from llamahome import launch  # noqa: E402

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import jax

WORDS = ("the king queen crown sword love death night day rose thou art fair sweet heart speak "
         "red blue green gold silver stone river hill shall never morning light ever where").split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_model(out: Path, hidden: int, layers: int) -> None:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([words(rng, 5, 40) for _ in range(2000)], trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                  eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    hf_tok.save_pretrained(out)


def write_task(folder: Path, docs: int) -> None:
    rng = random.Random(1)
    records = [{"q": words(rng, 30, 120), "choices": [words(rng, 1, 6) for _ in range(4)],
                "label": rng.randrange(4)} for _ in range(docs)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "bench_mc.yaml").write_text(json.dumps({
        "task": "bench_mc", "dataset_path": "json", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}},
        "test_split": "test", "doc_to_text": "{{q}}:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))


def requests_of(task_dir: Path) -> list:
    from llamahome.train.downstream import load_tasks, task_manager  # noqa: PLC0415

    task = load_tasks(["bench_mc"], manager=task_manager(str(task_dir), include_defaults=False))
    [task] = task["tasks"].values()
    task.build_all_requests()
    return [r for r in task.instances]


def timed(lm, requests) -> tuple[float, list[float]]:
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [v for v, _ in out]


def main() -> None:
    args = parse_args()
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    from llamahome.infer.lm_eval import LlamaHomeLM  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, task_dir = Path(tmp) / "hf", Path(tmp) / "tasks"
        task_dir.mkdir()
        write_model(hf_dir, args.hidden, args.layers)
        write_task(task_dir, args.docs)
        requests = requests_of(task_dir)
        backends = {"hf": HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32",
                               batch_size=args.batch_size),
                    "llamahome": LlamaHomeLM.from_checkpoint(str(hf_dir), batch_size=args.batch_size)}
        values = {name: timed(lm, requests)[1] for name, lm in backends.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, lm in backends.items():
                times[name].append(timed(lm, requests)[0])
    rate = {name: [len(requests) / t for t in ts] for name, ts in times.items()}
    print(json.dumps({
        "benchmark": "lm_eval_loglikelihood", "requests": len(requests),
        "batch_size": args.batch_size, "model": {"hidden": args.hidden, "layers": args.layers},
        "requests_per_s": {name: {"median": round(statistics.median(r), 1),
                                  "min": round(min(r), 1), "max": round(max(r), 1)}
                           for name, r in rate.items()},
        "speedup": round(statistics.median(h / l for h, l in zip(times["hf"], times["llamahome"])), 2),
        "max_abs_diff": max(abs(a - b) for a, b in zip(values["hf"], values["llamahome"])),
        "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
        "allocator": launch.allocator_name()}))


if __name__ == "__main__":
    main()
