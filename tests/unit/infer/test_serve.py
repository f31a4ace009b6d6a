"""The OpenAI-compatible HTTP layer (llamahome/infer/serve.py) over a scripted stand-in engine.

The stand-in has the Engine's contract (slots, a bounded queue, one step for all slots,
cancel) and emits each request's tokens from a script, so these tests check the protocol:
fields, errors, stop strings, logprobs, SSE, auth, limits, disconnects. The real engine is
behind the server in tests/integration/test_serve.py.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import httpx
import pytest

from llamahome import secrets
from llamahome.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from llamahome.errors import ConfigError
from llamahome.infer import jobs, serve
from llamahome.infer.engine import QueueFull
from tests.conftest import serving

MODEL = "tiny-test"
KEY = "sk-test-0123456789abcdef"
Event = collections.namedtuple("Event", "token_id logprob finish_reason")
WORDS = "the king queen crown sword love death night day rose thou art fair sweet heart".split()


running = serving  # uvicorn in a thread on a free loopback port (tests/conftest.py)


def sse_payloads(lines: Iterator[str]) -> list:
    """The JSON of each `data:` line of an SSE body, up to `data: [DONE]` (required)."""
    payloads = []
    for line in lines:
        if line == "data: [DONE]":
            return payloads
        if line.startswith("data: "):
            payloads.append(json.loads(line[len("data: "):]))
    raise AssertionError(f"the stream ended without data: [DONE] after {payloads}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = train_bpe_tokenizer([" ".join(WORDS)] * 40, tmp_path_factory.mktemp("bpe"),
                                 vocab_size=300)
    return load_tokenizer(str(folder))


class Listened:
    """Hands what the fake engine puts to a submit's `listener`, as the Engine does."""

    def __init__(self, listener: Callable[[object], None]):
        self.put = listener


class FakeHandle:
    def __init__(self, engine: FakeEngine, tokens: list[int], max_tokens: int,
                 stop_ids: Sequence[int], listener: Callable[[object], None] | None = None):
        self.engine, self.tokens, self.max_tokens = engine, tokens, max_tokens
        self.stop_ids, self.sent = set(stop_ids), 0
        self.events = queue.Queue() if listener is None else Listened(listener)
        self.cancelled_at: int | None = None

    def __iter__(self):
        while (event := self.events.get()) is not None:
            yield event

    def cancel(self) -> None:
        self.engine.cancel(self)


class FakeEngine:
    """The Engine contract with scripted tokens: `script(prompt_ids)` is what each request emits."""

    def __init__(self, script: Callable[[list[int]], list[int]], max_batch: int = 4,
                 max_queue: int = 4, step_s: float = 0.002):
        self.script, self.max_batch, self.max_queue, self.step_s = script, max_batch, max_queue, step_s
        self.max_seq_len = 64
        self.waiting: collections.deque = collections.deque()
        self.active: list[FakeHandle] = []
        self.steps, self.submitted = 0, []
        self.lock, self.closed = threading.Condition(), False
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, prompt_ids, max_tokens, *, temperature=0.0, top_p=1.0, seed=None,
               stop_ids=(), logprobs=False, listener=None):
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull("queue full")
            handle = FakeHandle(self, self.script(list(prompt_ids)), max_tokens, stop_ids,
                                listener)
            self.submitted.append(dict(prompt_ids=list(prompt_ids), max_tokens=max_tokens,
                                       temperature=temperature, top_p=top_p, seed=seed,
                                       logprobs=logprobs, handle=handle))
            self.waiting.append(handle)
            self.lock.notify()
        return handle

    def cancel(self, handle: FakeHandle) -> None:
        with self.lock:
            if handle.cancelled_at is None:
                handle.cancelled_at = self.steps
            if handle in self.waiting:
                self.waiting.remove(handle)
            if handle in self.active or handle in self.waiting:
                return
            handle.events.put(None)

    def _step(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.popleft())
        for handle in list(self.active):
            if handle.cancelled_at is not None:
                self.active.remove(handle)
                handle.events.put(None)
                continue
            token = handle.tokens[handle.sent % len(handle.tokens)]
            handle.sent += 1
            finish = ("stop" if token in handle.stop_ids else
                      "length" if handle.sent >= handle.max_tokens else None)
            handle.events.put(Event(token, -0.5 * handle.sent, finish))
            if finish:
                self.active.remove(handle)
                handle.events.put(None)
        self.steps += 1

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.active or self.waiting or self.closed):
                    self.lock.wait()
                if self.closed:
                    return
                self._step()
            time.sleep(self.step_s)

    def stats(self) -> dict:
        with self.lock:
            return {"slots": self.max_batch, "active": len(self.active),
                    "waiting": len(self.waiting), "steps": self.steps}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False, add_eos=False)


@pytest.fixture(scope="module")
def server(tokenizer):
    """A served app whose engine emits " the king STOP queen crown ..." forever (no stop id)."""
    tokens = text_ids(tokenizer, " the king STOP queen crown sword love")
    engine = FakeEngine(lambda prompt: tokens, max_batch=2, max_queue=2)
    app = serve.build_app(engine, tokenizer, model_name=MODEL, api_key=KEY,
                          max_body_bytes=4096)
    with running(app) as url:
        yield url, engine, tokens
    engine.close()


def post(url: str, path: str, body, *, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str, Iterator)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={**headers, **kwargs.pop("headers", {})},
                      timeout=10, **kwargs)


def stream_text(url: str, path: str, body: dict) -> tuple[list[dict], str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=10,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream")
        chunks = sse_payloads(response.iter_lines())
    key = "delta" if path.endswith("chat/completions") else None
    text = "".join((c["choices"][0]["delta"].get("content", "") if key else c["choices"][0]["text"])
                   for c in chunks if c["choices"])
    return chunks, text


def test_completion_cuts_at_a_stop_string_streamed_or_not(server, tokenizer):
    url, engine, tokens = server
    body = {"model": MODEL, "prompt": "thou art", "max_tokens": 20, "stop": ["STOP"]}
    answer = post(url, "/v1/completions", body).json()
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    [choice] = answer["choices"]
    assert choice["text"] == " the king " and choice["finish_reason"] == "stop"
    used = len(text_ids(tokenizer, " the king STOP"))  # the stop string's tokens were decoded
    prompt_len = len(tokenizer.encode("thou art"))
    assert answer["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": used,
                               "total_tokens": prompt_len + used}
    assert engine.submitted[-1]["prompt_ids"] == tokenizer.encode("thou art")
    assert engine.submitted[-1]["handle"].cancelled_at is not None  # its slot was given back

    chunks, text = stream_text(url, "/v1/completions", body)
    # Text once sent is never taken back: a stop string's first letters were held back.
    assert text == " the king " and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_length_finish_usage_chunk_and_token_id_prompts(server, tokenizer):
    url, _, tokens = server
    body = {"prompt": [tokenizer.encode("the")], "max_tokens": 3, "temperature": 0,
            "stream_options": {"include_usage": True}}
    chunks, text = stream_text(url, "/v1/completions", body)
    assert text == tokenizer.decode(tokens[:3])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_renders_the_template_and_streams_openai_chunks(server, tokenizer):
    url, engine, tokens = server
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    answer = post(url, "/v1/chat/completions",
                  {"model": MODEL, "messages": messages, "max_tokens": 2}).json()
    rendered = [messages[0], {"role": "user", "content": "hi there"}]
    assert engine.submitted[-1]["prompt_ids"] == tokenizer.chat_prompt(rendered)
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"] == {"role": "assistant",
                                               "content": tokenizer.decode(tokens[:2])}
    chunks, text = stream_text(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert text == tokenizer.decode(tokens[:2]) and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_logprobs_give_each_tokens_own_logprob(server, tokenizer):
    url, engine, tokens = server
    answer = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 3, "logprobs": 2}).json()
    logprobs = answer["choices"][0]["logprobs"]
    assert engine.submitted[-1]["logprobs"] is True
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in tokens[:3]]
    assert logprobs["token_logprobs"] == [-0.5, -1.0, -1.5]
    assert logprobs["top_logprobs"][1] == {tokenizer.decode([tokens[1]]): -1.0}
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [1, 1 + lengths[0], 1 + lengths[0] + lengths[1]]  # after "a"
    plain = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 1, "logprobs": 0}).json()
    assert plain["choices"][0]["logprobs"]["top_logprobs"] is None
    chat = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                              "max_tokens": 2, "logprobs": True}).json()
    assert [c["logprob"] for c in chat["choices"][0]["logprobs"]["content"]] == [-0.5, -1.0]


def test_sampling_fields_reach_the_engine(server):
    url, engine, _ = server
    post(url, "/v1/completions", {"prompt": "a", "max_tokens": 2, "temperature": 0.7,
                                  "top_p": 0.9, "seed": 5, "user": "u", "presence_penalty": 0})
    asked = engine.submitted[-1]
    assert (asked["temperature"], asked["top_p"], asked["seed"], asked["max_tokens"]) == (0.7, 0.9, 5, 2)


BAD_REQUESTS = [
    ({"prompt": 3}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    (b'{"prompt": "a", "temperature": 1e999}', 400, "temperature"),
    ({"prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a", "stop": ["x"] * 5}, 400, "stop"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "a", "bogus": 1}, 400, "bogus"),
    ({"prompt": "the " * 70}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 64}, 400, "max_tokens"),
    ({"prompt": [[1, 2], [3]]}, 400, "prompt"),
    ({"prompt": [10**6]}, 400, "prompt"),
    ({"prompt": "\ud800"}, 400, "prompt"),
    ({"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS, ids=[str(b)[:40] for b, *_ in BAD_REQUESTS])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    url, _, _ = server
    response = post(url, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
])
def test_bad_chat_requests_get_openai_errors(server, body, param):
    response = post(server[0], "/v1/chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_malformed_bodies_routes_and_sizes_are_4xx_json(server):
    url, _, _ = server
    for body in (b"{not json", b'{"prompt": NaN}', b"\xff\xfe", b"[" * 3000):
        response = post(url, "/v1/completions", body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    big = json.dumps({"prompt": "x" * 10_000_000}).encode()
    response = post(url, "/v1/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = post(url, "/v1/completions", iter([b'{"prompt": "', b"x" * 5000, b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted while read
    assert httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    wrong_method = httpx.get(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert post(url, "/v1/completions", {"prompt": "a", "max_tokens": 1}).status_code == 200


def test_api_key_is_required_and_never_echoed_or_logged(server, caplog):
    url, _, _ = server
    caplog.set_level(logging.INFO)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        response = httpx.post(url + "/v1/completions", json={"prompt": "a"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in response.text
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # liveness needs no key
    ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.json()["data"][0]["id"] == MODEL and KEY not in ok.text
    assert post(url, "/v1/completions", {"prompt": "a", "max_tokens": 1}).status_code == 200
    assert KEY not in caplog.text and "tokens in" in caplog.text


def test_foreign_hosts_and_cross_site_browsers_are_refused(server):
    url, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    rebinding = httpx.get(url + "/v1/models", headers={**auth, "Host": "evil.example:80"})
    assert rebinding.status_code == 403
    cross = post(url, "/v1/completions", {"prompt": "a"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403


def test_queue_full_is_429_and_nothing_is_lost(tokenizer):
    engine = FakeEngine(lambda prompt: [5], max_batch=1, max_queue=1, step_s=0.01)
    app = serve.build_app(engine, tokenizer, model_name=MODEL)
    results = []
    with running(app) as url:
        def ask():
            response = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 8},
                                  timeout=20)
            results.append(response.status_code if response.status_code != 200 else
                           response.json()["usage"]["completion_tokens"])
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = httpx.get(url + "/stats").json()
    engine.close()
    assert sorted(set(results)) == [8, 429], results
    assert stats["requests"]["rejected_queue_full"] == results.count(429)
    assert stats["requests"]["active"] == 0


def test_a_client_that_disconnects_mid_stream_is_cancelled(tokenizer, caplog):
    """After its first text the request makes only empty text (pad tokens), so nothing is
    written that could fail: the server must notice the disconnect by listening for it."""
    caplog.set_level(logging.INFO)
    engine = FakeEngine(lambda prompt: [5] + [tokenizer.pad_id] * 99, max_batch=1, step_s=0.05)
    app = serve.build_app(engine, tokenizer, model_name=MODEL)
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/completions", timeout=10,
                          json={"prompt": "a", "max_tokens": 60, "stream": True}) as response:
            next(response.iter_lines())  # the first token arrived: the request holds the slot
        closed_at = engine.steps
        deadline = time.monotonic() + 5
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.005)
        handle = engine.submitted[-1]["handle"]
        assert engine.stats()["active"] == 0 and handle.sent < 60
        assert handle.cancelled_at - closed_at <= 1  # noticed at once, not at the next write
        # A non-streamed request whose client leaves is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 60}, timeout=0.3)
        deadline = time.monotonic() + 5
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.submitted[-1]["handle"].sent < 60 and engine.stats()["active"] == 0
    engine.close()
    assert caplog.text.count("finish cancelled (cancelled at engine step") == 2


def test_a_public_bind_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="serve.allow_public=True"):
        serve.listen("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="serve.allow_public=True"):
        serve.listen("192.0.2.1", 0)
    sock = serve.listen("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
        serve.listen("127.0.0.1", sock.getsockname()[1])
    sock.close()


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(secrets.API_KEY_VAR, raising=False)
    assert secrets.api_key() is None
    monkeypatch.setenv(secrets.API_KEY_VAR, KEY)
    assert secrets.api_key() == KEY and secrets.redact(f"x {KEY} y") == "x <redacted> y"
    assert serve.authorized({"authorization": f"Bearer {KEY}"}, KEY)
    assert not serve.authorized({"authorization": f"Bearer {KEY}x"}, KEY)


def test_usage_hint_quotes_names_for_the_shell():
    hint = serve.usage_hint("http://127.0.0.1:8000", "it's", with_key=True)
    assert "http://127.0.0.1:8000/v1" in hint and "$LLAMAHOME_API_KEY" in hint
    assert KEY not in hint


def test_the_serve_job_refuses_a_public_bind_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match=r"serve.host='0.0.0.0' is not a loopback address"):
        jobs.serve(run_dir=str(tmp_path), checkpoint=str(tmp_path / "missing"), host="0.0.0.0")
