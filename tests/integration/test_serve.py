"""The `serve` job's server on the real engine, driven by the official `openai` client.

One tiny random-init model (an HF directory with a byte-level BPE tokenizer) serves every
test; the server runs in-process on a free 127.0.0.1 port, laid out on the mesh and rules the
serve job uses (gin/jobs/serve.gin: FSDP over this session's 8 fake devices), except the last
test, which starts the job itself as the README's command does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import gin
import httpx
import jax
import numpy as np
import pytest

import llamahome.cli  # noqa: F401  (registers launch, which the job gin files bind)
from llamahome.config import gin_config
from llamahome.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from llamahome.infer import jobs, serve
from llamahome.infer.engine import Engine
from llamahome.model import hf
from llamahome.model.checkpoints import load_model
from llamahome.model.llama import LlamaConfig, param_shapes
from llamahome.parallel.mesh import axis_rules, build_mesh
from tests.conftest import REPO
from tests.unit.infer.test_serve import WORDS, running, sse_payloads

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.integration

NAME = "tiny-served"
CONTEXT = 64
PROMPTS = ["the king", "love death night day rose thou art fair sweet heart speak the crown",
           "sword", " ".join(WORDS + WORDS[:8])]
CHAT = [{"role": "system", "content": "speak as a king"}, {"role": "user", "content": "who art thou"}]


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random weights (numpy: init_params takes many seconds on a busy CPU); norms at 1."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if path[-1].key == "scale":
            return np.ones(shape.shape, shape.dtype)
        return (0.15 * rng.standard_normal(shape.shape)).astype(shape.dtype)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-init tiny Llama as a Hugging Face directory with its tokenizer files. Its
    context (64) is what the generate job pads these prompts to, so the job and the server
    share compiled prefills and decode steps (XLA:CPU compiles are seconds each)."""
    root = tmp_path_factory.mktemp("served")
    bpe = train_bpe_tokenizer([" ".join(WORDS)] * 40, root / "bpe", vocab_size=400)
    vocab = load_tokenizer(str(bpe)).vocab_size
    config = LlamaConfig(name="tiny", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=CONTEXT)
    folder = hf.save_hf_checkpoint(root / "hf", config, random_params(config))
    for file in bpe.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(hf_dir):
    """(base URL, engine) of the app the serve job builds, on the same mesh and rules."""
    mesh, rules = build_mesh(), axis_rules("fsdp")
    model = load_model(hf_dir, mesh=mesh, rules=rules)
    tokenizer = load_tokenizer(str(hf_dir))
    with Engine(model.config, model.params, tokenizer, max_batch=8, max_seq_len=CONTEXT, mesh=mesh,
                rules=rules, max_queue=16) as engine:
        with running(serve.build_app(engine, tokenizer, model_name=NAME)) as url:
            yield url, engine


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def generate_job(tmp_path, hf_dir, bindings: list[str]) -> list[dict]:
    gin.clear_config()
    gin_config.parse_config(["gin/jobs/generate.gin"], [], [], [
        f"generate.checkpoint = '{hf_dir}'", "generate.max_new_tokens = 12",
        "SamplerConfig.temperature = 0.0", "generate.stream = False", *bindings])
    return jobs.generate(run_dir=str(tmp_path / "gen"))


def test_openai_client_gets_the_generate_jobs_text(server, hf_dir, tmp_path):
    url, _ = server
    expected = generate_job(tmp_path, hf_dir, [f"generate.prompts = {PROMPTS!r}"])
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    chat_expected = generate_job(tmp_path, hf_dir, [
        f"generate.prompts_file = '{tmp_path / 'chat.jsonl'}'", "generate.chat = True"])
    api = client(url)
    for prompt, record in zip(PROMPTS, expected):
        answer = api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert answer.choices[0].text == record["completion"]
        assert answer.choices[0].finish_reason == record["finish_reason"]
        assert answer.usage.completion_tokens == len(record["token_ids"])
        streamed = api.completions.create(model=NAME, prompt=prompt, max_tokens=12,
                                          temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == record["completion"]
    [record] = chat_expected
    answer = api.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == record["completion"]
    assert answer.usage.prompt_tokens == record["prompt_tokens"]
    streamed = api.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12,
                                           temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == record["completion"]
    assert [m.id for m in api.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_sixteen_concurrent_streams_each_equal_their_prompt_alone(server):
    url, _ = server
    prompts = [" ".join(WORDS[i % len(WORDS):] + WORDS[:i])[:5 + 6 * i] for i in range(16)]
    api = client(url)

    def stream(prompt: str) -> str:
        chunks = api.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                        stream=True)
        return "".join(c.choices[0].text for c in chunks)

    alone = [stream(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone
    assert len(set(alone)) > 8  # the prompts lead to different texts: the check can tell them apart


def _wait_idle(engine: Engine, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (stats := engine.stats())["active"] and time.monotonic() < deadline:
        time.sleep(0.005)
    return stats


def test_a_client_that_disconnects_frees_its_slot_within_one_step(server, caplog):
    url, engine = server
    caplog.set_level(logging.INFO)
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "model": NAME, "prompt": "the king", "max_tokens": 60, "temperature": 0,
            "stream": True}) as response:
        chunks = response.iter_lines()
        while not next(chunks).startswith("data: "):
            pass  # the first token arrived: the request holds a slot
    stats = _wait_idle(engine)
    assert stats["active"] == 0 and len(stats["free_slots"]) == 8
    [line] = [r.getMessage() for r in caplog.records if "finish cancelled" in r.getMessage()]
    cancelled_at = int(re.search(r"cancelled at engine step (\d+)", line)[1])
    tokens_out = int(re.search(r"(\d+) out", line)[1])
    assert tokens_out < 60
    assert stats["steps"] - cancelled_at <= 1  # at most the step in flight ran with it


def test_two_hundred_requests_32_at_a_time_each_answered_or_429(server):
    url, engine = server
    prompts = PROMPTS * 2
    with httpx.Client(timeout=60) as http:
        def ask(i: int) -> tuple[int, object]:
            response = http.post(url + "/v1/completions", json={
                "model": NAME, "prompt": prompts[i % len(prompts)], "max_tokens": 4,
                "temperature": 0, "stream": i % 2 == 1})
            if response.status_code != 200:
                return response.status_code, response.json()
            if i % 2:
                chunks = sse_payloads(response.text.splitlines())
                return 200, ("".join(c["choices"][0]["text"] for c in chunks),
                             chunks[-1]["choices"][0]["finish_reason"])
            choice = response.json()["choices"][0]
            return 200, (choice["text"], choice["finish_reason"])

        alone = {p: ask(i)[1] for i, p in enumerate(prompts[:len(PROMPTS)])}
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(ask, range(200)))
        elapsed = time.perf_counter() - start
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(200) >= 16, statuses
    for i, (status, answer) in enumerate(results):
        if status == 200:  # complete, and the same text as the prompt alone
            assert answer == alone[prompts[i % len(prompts)]], (i, answer)
        else:
            assert answer["error"]["code"] == "rate_limit_exceeded"
    assert _wait_idle(engine)["active"] == 0 and elapsed < 120


@contextlib.contextmanager
def serve_job(hf_dir, *params: str, env: dict[str, str] | None = None):
    """The serve job as a user starts it (on one CPU device: compiles faster); yields it."""
    command = [sys.executable, "-m", "llamahome.launch", "--gin_file=gin/jobs/serve.gin",
               f"--gin_param=serve.checkpoint='{hf_dir}'", "--gin_param=serve.port=0", *params]
    process = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO),
                                                            "XLA_FLAGS": "", **(env or {})})
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        process.stdout.close()
        process.stderr.close()


@pytest.mark.slow
def test_the_serve_job_prints_commands_that_work_as_printed(hf_dir, tmp_path):
    key = "sk-serve-job-test-key-0123456789"
    with serve_job(hf_dir, env={"LLAMAHOME_API_KEY": key}) as process:
        printed = [process.stdout.readline() for _ in range(4)]
        assert printed[0].startswith(f"serving '{hf_dir.name}'"), printed
        curl, python = printed[1].strip(), printed[2].strip()
        shell_env = {**os.environ, "LLAMAHOME_API_KEY": key, "PYTHONPATH": str(REPO)}
        answer = subprocess.run(curl, shell=True, capture_output=True, text=True, env=shell_env,
                                timeout=120, check=True)
        assert json.loads(answer.stdout)["usage"]["completion_tokens"] >= 1, answer.stdout
        text = subprocess.run(python, shell=True, capture_output=True, text=True, env=shell_env,
                              timeout=120)
        assert text.returncode == 0, text.stderr[-2000:]
        refused = subprocess.run(curl.replace("$LLAMAHOME_API_KEY", "wrong"), shell=True,
                                 capture_output=True, text=True, timeout=60)
        assert json.loads(refused.stdout)["error"]["code"] == "invalid_api_key"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert key not in "".join(printed) + out + err + answer.stdout + refused.stdout
    assert "tokens in" in err  # one log line per request
