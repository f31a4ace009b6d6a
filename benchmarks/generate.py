"""Generation throughput of LlamaHome and of transformers on the same weights; one JSON line.

    python benchmarks/generate.py [--model gin/models/small.gin] [--prompt_len 128]
                                  [--new_tokens 64] [--batches 1 8] [--repeats 3]

Random weights of the preset are exported with save_hf_checkpoint and loaded into
transformers' LlamaForCausalLM (eager PyTorch, on CUDA when there is a GPU, in `--dtype`),
so both run the same model. Both
are measured the same way, greedy with no stop token: prefill = a generate call for 1 new
token (prompt batch through the model + first token), decode = (time for N tokens - time
for 1) / (N - 1) steps. Tokens/s count every row: prefill B * prompt_len, decode B * (N - 1).
Each figure is the median of `repeats` runs after one warm-up (which compiles LlamaHome's
prefill and decode loop once per batch size). "same_tokens" says whether both produced the
same greedy ids.
"""

from __future__ import annotations

from llamahome import allocator

if __name__ == "__main__":
    allocator.reexec()  # tcmalloc or jemalloc when the machine has one, before JAX or torch load

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gin/models/small.gin")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="LlamaHome compute dtype")
    parser.add_argument("--skip_transformers", action="store_true")
    return parser.parse_args()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after a warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def throughput(run, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    """{prefill, decode tokens/s} from run(max_new_tokens) -> ids; and the ids of the long run."""
    t_first, _ = timed(lambda: run(1), repeats)
    t_all, ids = timed(lambda: run(new_tokens), repeats)
    return {"prefill_tokens_per_sec": batch * prompt_len / t_first,
            "decode_tokens_per_sec": batch * (new_tokens - 1) / max(t_all - t_first, 1e-9),
            "prefill_s": t_first, "generate_s": t_all}, ids


def main() -> None:
    args = parse_args()
    import gin  # noqa: PLC0415

    from llamahome.config import gin_config  # noqa: PLC0415
    from llamahome.infer.generate import generate  # noqa: PLC0415
    from llamahome.model.config import LlamaConfig  # noqa: PLC0415
    from llamahome.model.hf import save_hf_checkpoint  # noqa: PLC0415
    from llamahome.model.llama import init_params  # noqa: PLC0415

    gin_config.parse_config([args.model])
    config = LlamaConfig().replace(dtype=args.dtype)
    gin.clear_config()
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)

    report = {"benchmark": "generate", "allocator": allocator.name(), "model": config.name, "params": config.num_params(),
              "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "dtype": args.dtype, "llamahome": {}, "transformers": {}, "same_tokens": {}}
    prompts = {b: rng.integers(3, config.vocab_size, (b, args.prompt_len)) for b in args.batches}
    ours = {}
    for batch in args.batches:
        run = lambda n, b=batch: generate(params, config, prompts[b].tolist(),  # noqa: E731
                                          max_new_tokens=n).tokens
        report["llamahome"][f"batch_{batch}"], ours[batch] = throughput(
            run, batch, args.prompt_len, args.new_tokens, args.repeats)

    if not args.skip_transformers:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_checkpoint(Path(tmp) / "hf", config, params)
            model = transformers.LlamaForCausalLM.from_pretrained(
                Path(tmp) / "hf", dtype=getattr(torch, args.dtype)).eval().to(device)
        report["torch_device"], report["torch_threads"] = device, torch.get_num_threads()
        for batch in args.batches:
            ids = torch.tensor(prompts[batch], dtype=torch.long, device=device)

            def run(n, ids=ids):
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                         pad_token_id=0, eos_token_id=None)
                return out[:, ids.shape[1]:].tolist()

            report["transformers"][f"batch_{batch}"], theirs = throughput(
                run, batch, args.prompt_len, args.new_tokens, args.repeats)
            report["same_tokens"][f"batch_{batch}"] = theirs == ours[batch]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
