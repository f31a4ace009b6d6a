"""LlamaHome against its PyTorch peer, same process: one JSON line per config with both tokens/s.

    python benchmarks/compare_torch.py                    # d256x4 and d512x8, float32
    python benchmarks/compare_torch.py --config d256x4 --rounds 7 --block 2
    python benchmarks/compare_torch.py --config d512x8 --torch_autocast bf16
    python benchmarks/compare_torch.py --config d256x4 --seq 64 --batch 2   # other shapes

The peer is `transformers.LlamaForCausalLM` (sdpa attention, eager, float32) trained with
`torch.optim.AdamW` and global-norm clipping, the same update as LlamaHome's train step
(benchmarks/train_step.py builds that). `--torch_autocast bf16` runs the peer's forward and loss
under `torch.autocast("cpu", dtype=torch.bfloat16)`, a PyTorch user's best CPU setting where
the CPU has bf16 matmul units (AMX); LlamaHome stays float32. Both train on the same random
tokens. After warmup the two alternate in timed blocks of `--block` steps for `--rounds` rounds,
so a noisy neighbour slows both alike; each side's figure is its median step time over all its
steps.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from train_step import CONFIGS, build, config_name, named_config  # noqa: E402

from llamahome.model.llama import LlamaConfig  # noqa: E402


AUTOCAST = {"none": None, "bf16": torch.bfloat16}


def torch_step_fn(config: LlamaConfig, tokens: np.ndarray, autocast: str = "none"):
    """A closure running one PyTorch train step on `tokens` [batch, seq + 1], autocast or not."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
    inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    targets = torch.from_numpy(tokens[:, 1:].astype(np.int64))

    def step() -> float:
        with torch.autocast("cpu", dtype=AUTOCAST[autocast] or torch.bfloat16,
                            enabled=AUTOCAST[autocast] is not None):
            logits = model(input_ids=inputs).logits  # [B, T, V]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def compare(name: str, rounds: int, block: int, warmup: int, autocast: str = "none",
            seq: int | None = None, batch: int | None = None) -> dict:
    config, config_seq, config_batch = named_config(name, "float32")
    seq, batch = seq or config_seq, batch or config_batch
    config = config.replace(max_seq_len=max(seq, config.max_seq_len))
    jax_step, state, data, _ = build(config, seq, batch)
    tokens = np.concatenate([np.asarray(data["inputs"]), np.asarray(data["targets"])[:, -1:]], 1)
    torch_step = torch_step_fn(config, tokens, autocast)

    def run_jax():
        nonlocal state
        state, metrics = jax_step(state, data)
        return float(metrics["loss"])

    times: dict[str, list[float]] = {"llamahome": [], "torch": []}
    losses: dict[str, float] = {}
    runners = {"llamahome": run_jax, "torch": torch_step}
    for run in runners.values():
        for _ in range(warmup):
            run()
    for _ in range(rounds):
        for side, run in runners.items():
            for _ in range(block):
                start = time.perf_counter()
                losses[side] = run()
                times[side].append(time.perf_counter() - start)
    result = {"benchmark": "compare_torch", "allocator": launch.allocator_name(), "config": name,
              "dtype": "float32", "torch_autocast": autocast, "seq": seq, "batch": batch, "params": config.num_params(), "threads": torch.get_num_threads(),
              "steps_each": rounds * block}
    for side, ts in times.items():
        result[f"{side}_tokens_per_sec"] = batch * seq / statistics.median(ts)
        result[f"{side}_step_time_s"] = statistics.median(ts)
        result[f"{side}_step_time_spread_s"] = [min(ts), max(ts)]
        result[f"{side}_loss"] = losses[side]
    result["ratio"] = result["llamahome_tokens_per_sec"] / result["torch_tokens_per_sec"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="all", type=config_name, choices=["all", *CONFIGS])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=1, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the config's)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the config's)")
    parser.add_argument("--torch_autocast", default="none", choices=list(AUTOCAST),
                        help="the PyTorch peer's autocast dtype (LlamaHome stays float32)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    for name in CONFIGS if args.config == "all" else [args.config]:
        print(json.dumps(compare(name, args.rounds, args.block, args.warmup, args.torch_autocast,
                                 args.seq, args.batch)), flush=True)


if __name__ == "__main__":
    main()
