"""Generation throughput of LlamaHome and of transformers on the same weights; one JSON line.

    python benchmarks/generate.py [--model small|deep_narrow|gin/models/<name>.gin]
                                  [--prompt_len 128] [--new_tokens 64] [--batches 1 8]
                                  [--repeats 3]

Random weights of the model are exported with save_hf_checkpoint and loaded into
transformers' LlamaForCausalLM (eager PyTorch, on CUDA when there is a GPU, in `--dtype`),
so both run the same model. Both are measured the same way, greedy with no stop token:
prefill = a generate call for 1 new token (prompt batch through the model + first token),
decode = (time for N tokens - time for 1) / (N - 1) steps. Tokens/s count every row: prefill
B * prompt_len, decode B * (N - 1). After one warm-up of each (which compiles LlamaHome's
prefill and decode loop once per batch size), the two alternate, one run each per round, so
a machine shared with other jobs slows both alike; each figure is the median over `repeats`
rounds with its (min, max), and "decode_ratio" the median of the rounds' LlamaHome /
transformers decode ratios. "same_tokens" says whether both produced the same greedy ids.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


# Named models: `small` is gin/models/small.gin (19M params, the test size); `deep_narrow`
# has SmolLM2-135M's shape (30 layers of hidden 576, 9 heads / 3 KV heads, a 49,152 tied
# vocabulary), where per-token overheads that scale with depth show.
MODELS = {"small": "gin/models/small.gin", "deep_narrow": "gin/models/smollm2_135m.gin"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small",
                        help=f"one of {sorted(MODELS)} or a gin/models/<name>.gin file")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="LlamaHome compute dtype")
    parser.add_argument("--skip_transformers", action="store_true")
    return parser.parse_args()


def timed(fn) -> tuple[float, object]:
    """Seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def one_round(run, batch: int, prompt_len: int, new_tokens: int) -> tuple[dict, object]:
    """{prefill, decode tokens/s} from run(max_new_tokens) -> ids; and the ids of the long run."""
    t_first, _ = timed(lambda: run(1))
    t_all, ids = timed(lambda: run(new_tokens))
    return {"prefill_tokens_per_sec": batch * prompt_len / t_first,
            "decode_tokens_per_sec": batch * (new_tokens - 1) / max(t_all - t_first, 1e-9),
            "prefill_s": t_first, "generate_s": t_all}, ids


def summary(rounds: list[dict]) -> dict:
    """Median of each figure over the rounds, with [min, max] of each as "<figure>_range"."""
    out = {"runs": len(rounds)}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        out[key] = statistics.median(values)
        out[f"{key}_range"] = [min(values), max(values)]
    return out


def transformers_runner(config, params, dtype: str):
    """run(prompts [B, T] array, max_new_tokens) -> new ids, for transformers on `params`."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from llamahome.model.hf import save_hf_checkpoint  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(Path(tmp) / "hf", config, params)
        model = transformers.LlamaForCausalLM.from_pretrained(
            Path(tmp) / "hf", dtype=getattr(torch, dtype)).eval().to(device)

    def run(prompts, n):
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].tolist()

    return run, {"torch_device": device, "torch_threads": torch.get_num_threads()}


def main() -> None:
    args = parse_args()
    import gin  # noqa: PLC0415

    from llamahome.config import gin_config  # noqa: PLC0415
    from llamahome.infer.engine import engine_params  # noqa: PLC0415
    from llamahome.infer.generate import generate  # noqa: PLC0415
    from llamahome.model.llama import LlamaConfig, init_params  # noqa: PLC0415

    gin_config.parse_config([MODELS.get(args.model, args.model)])
    config = LlamaConfig().replace(dtype=args.dtype)
    gin.clear_config()
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)

    report = {"benchmark": "generate", "allocator": launch.allocator_name(), "model": config.name,
              "params": config.num_params(), "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "dtype": args.dtype,
              "load_average_start": os.getloadavg()[0], "llamahome": {}, "transformers": {},
              "decode_ratio": {}, "same_tokens": {}}
    # Laid out for the engine once, as a Generator (the generate job, serve) holds them, and
    # as transformers' model is loaded once.
    ours = engine_params(params)
    sides = {"llamahome": lambda prompts, n: generate(ours, config, prompts,
                                                       max_new_tokens=n).tokens}
    if not args.skip_transformers:
        sides["transformers"], info = transformers_runner(config, params, args.dtype)
        report.update(info)
    for batch in args.batches:
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).tolist()
        runs = {name: (lambda n, fn=fn: fn(prompts, n)) for name, fn in sides.items()}
        for run in runs.values():  # warm-up: compiles LlamaHome's prefill and decode loop
            run(1), run(args.new_tokens)
        rounds, ids = {name: [] for name in runs}, {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                figures, ids[name] = one_round(run, batch, args.prompt_len, args.new_tokens)
                rounds[name].append(figures)
        key = f"batch_{batch}"
        for name in runs:
            report[name][key] = summary(rounds[name])
        if "transformers" in runs:
            ratios = [ours["decode_tokens_per_sec"] / theirs["decode_tokens_per_sec"]
                      for ours, theirs in zip(rounds["llamahome"], rounds["transformers"])]
            report["decode_ratio"][key] = statistics.median(ratios)
            report["decode_ratio"][f"{key}_range"] = [min(ratios), max(ratios)]
            report["same_tokens"][key] = ids["transformers"] == ids["llamahome"]
    report["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
