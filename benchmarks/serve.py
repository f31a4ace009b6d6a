"""Serving throughput and latency under N concurrent clients, beside `transformers` one request
at a time on the same weights; one JSON line.

    python benchmarks/serve.py [--clients 1 8 32] [--requests 32] [--prompt_len 16 64]
                               [--new_tokens 32] [--repeats 3] [--quick]

The model is d256x4 (benchmarks/train_step.py) with random weights, exported with
save_hf_checkpoint beside Mistral v1's 32k SentencePiece tokenizer. For each N the `serve`
job serves it in a process of its own, started as a user starts it (python -m
llamahome.launch --gin_file=gin/jobs/serve.gin, so under launch's allocator) with
serve.max_batch = N; transformers' LlamaForCausalLM loads the same weights in this process.

Requests: `--requests` prompts of random token ids, lengths uniform in `--prompt_len`, each
asking `--new_tokens` greedy tokens, streamed over SSE (httpx, one thread per client). N
clients run a closed loop: each sends the next request when its last one ends. Per request:
time to first token (send -> the first chunk with text) and per-token latency ((last chunk -
first chunk) / (tokens - 1)). Per round: tokens/s = all generated tokens / the round's wall
time. transformers generates the same prompts one at a time (greedy, exactly --new_tokens,
no EOS). After a warm-up round of each (compiles every prefill bucket and the decode step),
the server rounds and the transformers round alternate, so a machine shared with other jobs
slows both alike; tokens/s is the median over `--repeats` rounds with its [min, max], the
latencies are medians and p99s pooled over the rounds. Ratios: N clients' tokens/s over 1
client's, and over transformers'. `--quick` is a seconds-long smoke run (tests).
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import concurrent.futures
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np

from generate import transformers_runner  # noqa: E402  (benchmarks/generate.py)
from train_step import named_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one server of 2 clients, 4 requests of 4 tokens")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.prompt_len, args.new_tokens, args.repeats = [2], 4, [8, 16], 4, 1
    return args


def export_model(folder: Path):
    """(config, params, hf_dir): random d256x4 weights as an HF directory with a tokenizer."""
    import mistral_common  # noqa: PLC0415  (its 32k SentencePiece model, the Llama layout)

    from llamahome.model.hf import save_hf_checkpoint  # noqa: PLC0415
    from llamahome.model.llama import init_params  # noqa: PLC0415

    config, _, _ = named_config("d256x4")
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    hf_dir = save_hf_checkpoint(folder / "hf", config, params)
    tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    (hf_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return config, params, hf_dir


@contextlib.contextmanager
def serve_job(hf_dir: Path, run_dir: Path, max_batch: int, max_seq_len: int):
    """The serve job in its own process; yields a function that waits until it listens and
    returns its base URL (the caller works meanwhile: the job takes seconds to start)."""
    params = [f"serve.checkpoint='{hf_dir}'", "serve.port=0", f"serve.max_batch={max_batch}",
              f"serve.max_seq_len={max_seq_len}", f"launch.run_dir='{run_dir}'"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    env.pop("LLAMAHOME_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "llamahome.launch",
                                "--gin_file=gin/jobs/serve.gin",
                                *[f"--gin_param={p}" for p in params]],
                               cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)

    def url() -> str:
        line = process.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"the serve job did not start (exit {process.wait()}): {line!r}")
        return line.split(" on ")[1].split("/v1")[0]

    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def stream_request(http: httpx.Client, url: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed completion: {tokens, ttft_s, per_token_s}."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"]:
                first, last = first or time.perf_counter(), time.perf_counter()
            else:
                tokens = chunk["usage"]["completion_tokens"]
    return {"tokens": tokens, "ttft_s": first - start,
            "per_token_s": (last - first) / max(tokens - 1, 1)}


def server_round(url: str, clients: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts through `clients` concurrent clients: {tokens_per_sec, requests}."""
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda p: stream_request(http, url, p, new_tokens), prompts))
        elapsed = time.perf_counter() - start
    return {"tokens_per_sec": sum(r["tokens"] for r in results) / elapsed, "requests": results}


def transformers_round(run, prompts: list[list[int]], new_tokens: int) -> float:
    """tokens/s of transformers generating the prompts one at a time."""
    start = time.perf_counter()
    tokens = sum(len(run([prompt], new_tokens)[0]) for prompt in prompts)
    return tokens / (time.perf_counter() - start)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "range": [min(values), max(values)]}


def latency(requests: list[dict], key: str) -> dict:
    values = np.array([r[key] for r in requests])
    return {"median_ms": 1e3 * float(np.median(values)),
            "p99_ms": 1e3 * float(np.percentile(values, 99))}


def measure(args, urls: dict[int, str], hf_run, prompts) -> tuple[dict, list[float]]:
    """Warm-up, then `repeats` alternating rounds: ({clients: [round]}, [transformers tok/s])."""
    for url in urls.values():
        server_round(url, max(urls), prompts, args.new_tokens)  # compiles buckets and the step
    transformers_round(hf_run, prompts[:2], args.new_tokens)
    rounds: dict[int, list[dict]] = {n: [] for n in urls}
    hf_rates = []
    for _ in range(args.repeats):
        for n, url in urls.items():
            rounds[n].append(server_round(url, n, prompts, args.new_tokens))
        hf_rates.append(transformers_round(hf_run, prompts, args.new_tokens))
    return rounds, hf_rates


def report(args, config, rounds: dict[int, list[dict]], hf_rates: list[float], info: dict) -> dict:
    server = {}
    for n, runs in rounds.items():
        requests = [r for run in runs for r in run["requests"]]
        server[f"clients_{n}"] = {"tokens_per_sec": spread([run["tokens_per_sec"] for run in runs]),
                                  "ttft": latency(requests, "ttft_s"),
                                  "per_token": latency(requests, "per_token_s"),
                                  "tokens": sum(r["tokens"] for r in requests)}
    one, hf = min(rounds), statistics.median(hf_rates)
    rate = {n: server[f"clients_{n}"]["tokens_per_sec"]["median"] for n in rounds}
    return {"benchmark": "serve", "allocator": launch.allocator_name(), "model": config.name,
            "params": config.num_params(), "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "requests": args.requests, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "server": server,
            "transformers_tokens_per_sec": hf, "transformers_range": [min(hf_rates), max(hf_rates)],
            "ratio_vs_one_client": {f"clients_{n}": rate[n] / rate[one] for n in rounds},
            "ratio_vs_transformers": {f"clients_{n}": rate[n] / hf for n in rounds}, **info}


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        config, params, hf_dir = export_model(Path(tmp))
        prompts = [rng.integers(3, config.vocab_size, rng.integers(*args.prompt_len, endpoint=True)
                                ).tolist() for _ in range(args.requests)]
        max_seq_len = args.prompt_len[1] + args.new_tokens
        with contextlib.ExitStack() as stack:
            started = {n: stack.enter_context(serve_job(hf_dir, Path(tmp) / f"run{n}", n, max_seq_len))
                       for n in args.clients}
            hf_run, info = transformers_runner(config, params, "float32")  # while the jobs start
            urls = {n: url() for n, url in started.items()}
            rounds, hf_rates = measure(args, urls, hf_run, prompts)
    result = report(args, config, rounds, hf_rates, info)
    result.update(load_average_start=load_start, load_average_end=os.getloadavg()[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
