"""An OpenAI-compatible HTTP API over the continuous-batching engine (the `serve` job's app).

    app = build_app(engine, tokenizer, model_name="my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)   # the `serve` job does this (infer/jobs.py)

Routes (JSON; errors are OpenAI's {"error": {"message", "type", "param", "code"}}, always 4xx
for a client mistake, 500 only for a bug, whose traceback goes to the log alone):
  GET  /health                 {"status": "ok"} (no API key needed)
  GET  /v1/models              the one model served, as {"object": "list", "data": [...]}
  GET  /v1/models/<id>
  POST /v1/completions         prompt: a string, a list of token ids, or a list holding one
                               of either
  POST /v1/chat/completions    messages [{"role", "content"}] rendered with the model's chat
                               template plus its assistant header (as the generate job does,
                               data/chat_template.py); content: a string or text parts
  GET  /stats                  the engine's slots, queue and steps, and request counts

Fields: model (optional; another name -> 404), max_tokens (max_completion_tokens in chat;
default 16 for completions, the room left in max_seq_len for chat), temperature [0, 2] (0 is
greedy), top_p (0, 1], seed (any 64-bit integer, used mod 2**32), stop (a string or up to 4 strings; the text is cut before the
first one, which is not returned), n (1 only), stream (server-sent events of OpenAI chunk
objects, ending with `data: [DONE]`), stream_options.include_usage, logprobs. Fields that
only change behaviour this server lacks (presence_penalty, frequency_penalty, logit_bias,
best_of, echo, suffix, tools, response_format, ...) are accepted at their neutral default and
refused (400) otherwise; any other field is refused by name.

Logprobs: completions take `logprobs` k in [0, 5], chat `logprobs: true` with `top_logprobs`
k in [0, 20]. Every generated token comes with its own log-probability (`token_logprobs` /
`content[i].logprob`); `top_logprobs` lists that chosen token only, not the k most likely
(the engine reports no alternatives).

Generation: the prompt is encoded by the tokenizer's own BOS rule, the engine decodes it
among the other requests of its batch (infer/engine.py: greedy output does not depend on
them), generation ends at the tokenizer's stop ids ("stop"), a stop string ("stop") or
max_tokens ("length"); text is produced by generator.TextStream, so a stream never splits a
character and holds back text that may begin a stop string. usage counts prompt tokens and
every generated token, a stop id included.

Limits and refusals: a body over `max_body_bytes` (default 1 MiB) -> 413; bad JSON -> 400;
a prompt that leaves no room in max_seq_len, or max_tokens past it -> 400; a full engine
queue -> 429; with an API key, a request without `Authorization: Bearer <key>` -> 401 (the
key is compared in constant time and never logged or echoed). Served on a loopback address,
requests must name a loopback Host (a DNS-rebinding page cannot reach the API) and a
browser's cross-site request (Sec-Fetch-Site) is refused. A client that disconnects, mid-
stream or while a non-streamed answer is being made, cancels its engine request at once,
which frees its slot within one decode step. Each request ends with one log line: id,
route, tokens in and out, time to first token, total time, finish reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import json
import shlex
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import anyio
from absl import logging
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llamahome.data.tokenizer import Tokenizer
from llamahome import net
from llamahome.errors import UserError
from llamahome.infer.engine import MAX_SEED as ENGINE_SEEDS, Engine, EngineClosed, QueueFull
from llamahome.infer.generator import TextStream, encode_prompt

MAX_BODY_BYTES = 1 << 20
MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1  # any 64-bit seed; the engine draws with seed mod 2**32
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Fields of behaviour this server does not have, accepted at their neutral values only.
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {}),
           "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
           "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"}), "store": (None, False)}
IGNORED = ("user", "metadata")  # accepted and not used: they do not change the answer
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                 "stop", "seed", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
                 *IGNORED}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                               "tool_choice", "parallel_tool_calls", "response_format", "store"}


class ApiError(Exception):
    """A refused request: `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers={"Cache-Control": "no-store"})


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, message, field, "invalid_value")


# --- Request fields -----------------------------------------------------------------------------

def _get(body: dict, field: str, types: tuple[type, ...], what: str, default):
    """body[field] if of one of `types` (a bool is no number); `default` if absent or null."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
        raise _invalid(field, f"{field} must be {what}; got {json.dumps(value)[:80]}")
    return value


def _integer(body: dict, field: str, default: int | None, low: int, high: int) -> int | None:
    what = f"an integer in [{low}, {high}]"
    value = _get(body, field, (int,), what, default)
    if value is not None and not low <= value <= high:
        raise _invalid(field, f"{field} must be {what}; got {value}")
    return value


def _number(body: dict, field: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    try:
        value = float(_get(body, field, (int, float), what, default))
    except OverflowError:  # an integer beyond the float range
        raise _invalid(field, f"{field} must be {what}") from None
    if not (low < value if low_open else low <= value) or not value <= high:
        raise _invalid(field, f"{field} must be {what}; got {value}")
    return value


def _check_fields(body: object, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_body")
    if unknown := sorted(set(body) - allowed):
        raise ApiError(400, f"unknown field {unknown[0]!r}; this server takes "
                            f"{', '.join(sorted(allowed))}", unknown[0], "unknown_field")
    for field, neutral in NEUTRAL.items():
        value = body.get(field)
        if field in body and not any(type(value) is type(n) and value == n for n in neutral):
            raise ApiError(400, f"{field}={json.dumps(value)[:80]} is not supported by this "
                                f"server; leave it out (or {json.dumps(neutral[-1])})",
                           field, "unsupported_value")
    if _integer(body, "n", 1, 1, 2**31 - 1) != 1:
        raise ApiError(400, "only n=1 is supported: send one request per completion", "n",
                       "unsupported_value")
    return body


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and s for s in stops)):
        raise _invalid("stop", f"stop must be a non-empty string or a list of at most "
                               f"{MAX_STOP_STRINGS} of them")
    return tuple(stops)


def _stream_options(body: dict, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (stream_options.include_usage)."""
    options = _get(body, "stream_options", (dict,), "an object", {})
    if options and not stream:
        raise _invalid("stream_options", "stream_options is only allowed with stream: true")
    if unknown := sorted(set(options) - {"include_usage", "include_obfuscation"}):
        raise _invalid("stream_options", f"unknown stream_options field {unknown[0]!r}")
    return bool(_get(options, "include_usage", (bool,), "true or false", False))


@dataclasses.dataclass(frozen=True)
class Ask:
    """What one validated request asks of the engine."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None  # None: no logprobs; else the top-k asked (the chosen token is given)
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class Served:
    """The model behind the API: its name, tokenizer and context length."""

    name: str
    tokenizer: Tokenizer
    max_seq_len: int
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def _check_model(body: dict, served: Served) -> None:
    model = _get(body, "model", (str,), "a string", served.name)
    if model != served.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                            f"{served.name!r}", "model", "model_not_found")


def _room(body: dict, field: str, prompt_field: str, n_prompt: int, served: Served,
          default: int | None) -> int:
    """max_tokens: as asked (or `default`, capped by the room left); 400 if it does not fit."""
    room = served.max_seq_len - n_prompt
    if n_prompt == 0:
        raise _invalid(prompt_field, "the prompt is empty (it encodes to no tokens)")
    if room < 1:
        raise ApiError(400, f"the prompt is {n_prompt} tokens, but this model's context is "
                            f"{served.max_seq_len} tokens (serve.max_seq_len), with at least one "
                            "for the completion; shorten the prompt", prompt_field,
                       "context_length_exceeded")
    asked = _integer(body, field, None, 1, 2**31 - 1)
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        raise ApiError(400, f"{field}={asked} does not fit: the prompt is {n_prompt} tokens and "
                            f"the context {served.max_seq_len} (serve.max_seq_len), which leaves "
                            f"{room}", field, "context_length_exceeded")
    return asked


def _ask(body: dict, chat: bool, prompt_ids: list[int], served: Served) -> Ask:
    """The fields shared by both endpoints, validated, with the prompt's ids."""
    prompt_field = "messages" if chat else "prompt"
    max_field = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _room(body, max_field, prompt_field, len(prompt_ids), served,
                       None if chat else COMPLETION_DEFAULT_MAX_TOKENS)
    stream = _get(body, "stream", (bool,), "true or false", False)
    if chat:
        wanted = _get(body, "logprobs", (bool,), "true or false", False)
        top = _integer(body, "top_logprobs", None, 0, 20)
        if top is not None and not wanted:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs = (top or 0) if wanted else None
    else:
        logprobs = _integer(body, "logprobs", None, 0, 5)
    return Ask(chat=chat, prompt_ids=prompt_ids, max_tokens=max_tokens,
               temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
               top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
               seed=_seed(_integer(body, "seed", None, -MAX_SEED - 1, MAX_SEED)),
               stop=_stop(body), logprobs=logprobs, stream=stream,
               include_usage=_stream_options(body, stream))


def _seed(seed: int | None) -> int | None:
    return None if seed is None else seed % ENGINE_SEEDS


def _token_ids(value: object, vocab_size: int) -> list[int] | None:
    """`value` as token ids if it is a list of ints in the vocabulary; None if not a list of ints."""
    if not (isinstance(value, list) and value and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value)):
        return None
    if not all(0 <= i < vocab_size for i in value):
        raise _invalid("prompt", f"prompt token ids must be in [0, {vocab_size})")
    return value


def _valid_text(text: str, field: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON)
        raise _invalid(field, f"{field} is not valid Unicode (a lone surrogate)") from None
    return text


def parse_completion(body: object, served: Served) -> Ask:
    """A /v1/completions body, validated; ApiError (4xx) naming the field otherwise."""
    body = _check_fields(body, COMPLETION_FIELDS)
    _check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode_prompt(served.tokenizer, _valid_text(prompt, "prompt"))
    elif (ids := _token_ids(prompt, served.tokenizer.vocab_size)) is None:
        raise _invalid("prompt", "prompt must be a string, a list of token ids, or a list holding "
                                 "one of them (one prompt per request)")
    return _ask(body, False, ids, served)


def _message(i: int, message: object) -> dict:
    field = f"messages[{i}]"
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
        raise _invalid(field, f"{field} must be an object with a string role and content")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _invalid(f"{field}.content", f"{field}.content must be a string or a list of "
                                           "text parts ({\"type\": \"text\", \"text\": ...})")
    return {"role": message["role"], "content": _valid_text(content, f"{field}.content")}


def parse_chat(body: object, served: Served) -> Ask:
    """A /v1/chat/completions body, validated; the messages rendered and encoded."""
    body = _check_fields(body, CHAT_FIELDS)
    _check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty list of {role, content}")
    try:
        ids = served.tokenizer.chat_prompt([_message(i, m) for i, m in enumerate(messages)])
    except UserError as e:  # the template refused the conversation
        raise _invalid("messages", str(e)) from None
    return _ask(body, True, ids, served)


# --- From engine events to text -----------------------------------------------------------------

@dataclasses.dataclass
class Delta:
    """New text of a request, the tokens behind it (id, logprob), and why it ended if it did."""

    text: str
    tokens: list[tuple[int, float | None]]
    finish_reason: str | None = None


_END = object()


class EngineEvents:
    """A request's events on the event loop: the engine thread hands each over with
    call_soon_threadsafe (its `listener`), so no thread per request wakes for every token to
    compete with the engine thread for the GIL."""

    def __init__(self) -> None:
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def listener(self, item) -> None:
        """Called by the engine thread: a TokenEvent, None (no more), or an exception."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, _END if item is None else item)

    async def batches(self) -> AsyncIterator[list]:
        """Lists of events: every event that arrived since the last, so a busy server sends
        fewer chunks; ends after a finish reason, the end of the request, or raises its error."""
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            events = [item for item in items if item is not _END and not isinstance(item, Exception)]
            if events:
                yield events
            if errors := [item for item in items if isinstance(item, Exception)]:
                raise errors[0]
            if _END in items or any(e.finish_reason is not None for e in events):
                return


class Run:
    """One request's pass through the engine: its deltas, counts and timings, and its log line."""

    def __init__(self, state: ServerState, ask: Ask, route: str) -> None:
        self.state, self.ask, self.route = state, ask, route
        self.id = f"{'chatcmpl' if ask.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens_out = 0
        self.finish_reason = "cancelled"
        self.events = EngineEvents()
        self.handle = state.submit(ask, self.events.listener)  # QueueFull -> 429 up front
        self.engine_done = self.closed = False

    def close(self) -> None:
        """Cancels the engine request unless the engine ended it (a stop string, a client that
        left, a failure: its slot is free within one step), and logs the run, once."""
        if not self.engine_done:
            self.handle.cancel()
        if not self.closed:
            self.closed = True
            self.state.finished(self)

    async def deltas(self) -> AsyncIterator[Delta]:
        """The completion as it is decoded: a Delta per new text, the last with its finish reason."""
        tokenizer = self.state.served.tokenizer
        text = TextStream(tokenizer, self.ask.prompt_ids, tokenizer.stop_ids, self.ask.stop)
        tokens: list[tuple[int, float | None]] = []
        try:
            async with contextlib.aclosing(self.events.batches()) as batches:
                async for events in batches:
                    self.first = self.first or time.perf_counter()
                    piece, finish = self._take(events, text, tokens)
                    if finish is not None:
                        whole = text.text()  # held-back text is released at the end
                        rest = whole[len(text.emitted):] if whole.startswith(text.emitted) else ""
                        self.finish_reason = finish
                        yield Delta(piece + rest, tokens, finish)
                        return
                    if piece:
                        yield Delta(piece, tokens)
                        tokens = []
            raise RuntimeError("the engine ended a request without a finish reason")
        finally:
            self.close()

    def _take(self, events: list, text: TextStream, tokens: list) -> tuple[str, str | None]:
        """Pushes events into `text` (their text tokens and logprobs into `tokens`) up to the
        first that ends the request; (the new text, the finish reason or None)."""
        pieces = []
        for event in events:
            self.tokens_out += 1
            taken = len(text.ids)
            pieces.append(text.push([event.token_id]))
            if len(text.ids) > taken:  # a token of the text (no stop id, not past a stop)
                tokens.append((event.token_id, event.logprob))
            self.engine_done = event.finish_reason is not None
            if text.stopped or self.engine_done:
                return "".join(pieces), "stop" if text.stopped else event.finish_reason
        return "".join(pieces), None

    async def collect(self) -> Delta:
        """The whole completion in one Delta."""
        whole = Delta("", [])
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                whole.text += delta.text
                whole.tokens += delta.tokens
                whole.finish_reason = delta.finish_reason
        return whole

    def usage(self) -> dict:
        n_in = len(self.ask.prompt_ids)
        return {"prompt_tokens": n_in, "completion_tokens": self.tokens_out,
                "total_tokens": n_in + self.tokens_out}

    def log_line(self) -> str:
        ttft = f"{self.first - self.start:.3f} s" if self.first else "-"
        return (f"{self.id} {self.route}: {len(self.ask.prompt_ids)} tokens in, {self.tokens_out} "
                f"out, first token {ttft}, total {time.perf_counter() - self.start:.3f} s, "
                f"finish {self.finish_reason}")


# --- Response shapes ----------------------------------------------------------------------------

class Shape:
    """OpenAI's objects for a run: the whole answer, and the chunks of a stream."""

    def __init__(self, run: Run) -> None:
        self.run, self.tokenizer = run, run.state.served.tokenizer
        # Completions' text_offset counts from the start of the prompt's text, as OpenAI's.
        wants_offsets = run.ask.logprobs is not None and not run.ask.chat
        self.offset = len(self.tokenizer.decode(run.ask.prompt_ids)) if wants_offsets else 0
        self.base = {"id": run.id, "created": int(time.time()), "model": run.state.served.name}

    def _pieces(self, tokens: list[tuple[int, float | None]]) -> list[tuple[str, float | None]]:
        return [(self.tokenizer.decode([token]), logprob) for token, logprob in tokens]

    def logprobs(self, tokens: list[tuple[int, float | None]]) -> dict | None:
        if self.run.ask.logprobs is None:
            return None
        pieces = self._pieces(tokens)
        top = self.run.ask.logprobs > 0  # the chosen token stands for the top k (module doc)
        if self.run.ask.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": t, "logprob": lp,
                                                   "bytes": list(t.encode())}] if top else []}
                                for t, lp in pieces]}
        offsets = list(itertools.accumulate((len(t) for t, _ in pieces), initial=self.offset))
        self.offset = offsets.pop()
        return {"tokens": [t for t, _ in pieces], "token_logprobs": [lp for _, lp in pieces],
                "top_logprobs": [{t: lp} for t, lp in pieces] if top else None,
                "text_offset": offsets}

    def whole(self, delta: Delta) -> dict:
        choice = {"index": 0, "logprobs": self.logprobs(delta.tokens),
                  "finish_reason": delta.finish_reason}
        if self.run.ask.chat:
            choice["message"] = {"role": "assistant", "content": delta.text}
            return {**self.base, "object": "chat.completion", "choices": [choice],
                    "usage": self.run.usage()}
        return {**self.base, "object": "text_completion", "choices": [{"text": delta.text, **choice}],
                "usage": self.run.usage()}

    def chunk(self, delta: Delta | None, role: bool = False) -> dict:
        """A stream chunk of `delta`; None: the last, usage-only chunk."""
        kind = "chat.completion.chunk" if self.run.ask.chat else "text_completion"
        if delta is None:
            return {**self.base, "object": kind, "choices": [], "usage": self.run.usage()}
        choice = {"index": 0, "logprobs": self.logprobs(delta.tokens),
                  "finish_reason": delta.finish_reason}
        if self.run.ask.chat:
            content = {"role": "assistant", "content": delta.text} if role else {"content": delta.text}
            choice["delta"] = {} if delta.finish_reason and not delta.text else content
        else:
            choice["text"] = delta.text
        return {**self.base, "object": kind, "choices": [choice]}


def sse(data: object) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def event_stream(run: Run) -> AsyncIterator[str]:
    """The SSE body of a streamed request: chunks, [a usage chunk,] then `data: [DONE]`."""
    shape = Shape(run)
    if run.ask.chat:
        yield sse(shape.chunk(Delta("", []), role=True))
    try:
        async with contextlib.aclosing(run.deltas()) as deltas:
            async for delta in deltas:
                yield sse(shape.chunk(delta))
    except Exception:  # a bug, after the 200 went out: say so in the stream, log the rest
        logging.exception("request %s failed", run.id)
        yield sse(ApiError(500, "internal server error; the server's log has the details",
                           kind="server_error").response().body.decode())
        return
    if run.ask.include_usage:
        yield sse(shape.chunk(None))
    yield sse("[DONE]")


# --- The app ------------------------------------------------------------------------------------

class ServerState:
    """The engine and model behind the app, and counts of the requests it served."""

    def __init__(self, engine: Engine, served: Served) -> None:
        self.engine, self.served = engine, served
        self.counts = {"requests": 0, "active": 0, "rejected_queue_full": 0, "cancelled": 0}
        self._lock = threading.Lock()

    def submit(self, ask: Ask, listener: Callable[[object], None]):
        """The engine handle of `ask`, its events to `listener`; 429 when the engine's waiting
        queue is full."""
        try:
            handle = self.engine.submit(ask.prompt_ids, ask.max_tokens,
                                        temperature=ask.temperature, top_p=ask.top_p,
                                        seed=ask.seed, stop_ids=self.served.tokenizer.stop_ids,
                                        logprobs=ask.logprobs is not None, listener=listener)
        except QueueFull:
            with self._lock:
                self.counts["rejected_queue_full"] += 1
            raise ApiError(429, "the server is busy: its request queue is full; retry shortly",
                           None, "rate_limit_exceeded", kind="requests") from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", None, "unavailable",
                           kind="server_error") from None
        except UserError as e:  # what the checks above let through and the engine refuses
            raise ApiError(400, str(e), None, "invalid_value") from None
        with self._lock:
            self.counts["requests"] += 1
            self.counts["active"] += 1
        return handle

    def finished(self, run: Run) -> None:
        with self._lock:
            self.counts["active"] -= 1
            self.counts["cancelled"] += run.finish_reason == "cancelled"
        step = f" (cancelled at engine step {self.engine.stats()['steps']})" \
            if run.finish_reason == "cancelled" else ""
        logging.info("%s%s", run.log_line(), step)


async def read_body(request: Request, limit: int) -> object:
    """The request's JSON body, read up to `limit` bytes; ApiError 413 / 400 otherwise."""
    size, chunks = 0, []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than this server's limit of "
                                    f"{limit} bytes", None, "request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the end of the body") from None
    try:
        return json.loads(b"".join(chunks), parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the JSON body nests too deeply", None, "invalid_json") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def until_disconnect(request: Request, work: Callable[[], object]):
    """Awaits `work()`, cancelling it if the client disconnects first (then returns None)."""
    result = None
    async with anyio.create_task_group() as group:
        async def run() -> None:
            nonlocal result
            result = await work()
            group.cancel_scope.cancel()

        group.start_soon(run)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.cancel_scope.cancel()
    return result


class EventStreamResponse(StreamingResponse):
    """A text/event-stream whose `on_close` runs however it ends, also when the client left
    before its first event. Under uvicorn (ASGI spec 2.3) Starlette listens for the client's
    disconnect beside the stream and cancels the stream at once, not at its next write."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _completion_route(parse: Callable[[object, Served], Ask], route: str):
    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.serve
        ask = parse(await read_body(request, request.app.state.max_body_bytes), state.served)
        run = Run(state, ask, route)
        if ask.stream:
            return EventStreamResponse(event_stream(run), on_close=run.close)
        try:
            delta = await until_disconnect(request, run.collect)
        finally:
            run.close()
        return JSONResponse(Shape(run).whole(delta) if delta else {})
    return endpoint


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created,
            "owned_by": "llamahome", "max_model_len": served.max_seq_len}


async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.serve.served)]})


async def model(request: Request) -> JSONResponse:
    served = request.app.state.serve.served
    if request.path_params["model"] != served.name:
        raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this "
                            f"server serves {served.name!r}", "model", "model_not_found")
    return JSONResponse(_model_card(served))


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.serve
    return JSONResponse({"engine": state.engine.stats(), "requests": dict(state.counts)})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                    None, code).response()


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _server_error(request: Request, exc: Exception) -> Response:
    """Starlette re-raises `exc` after this response, so the traceback reaches the log."""
    return ApiError(500, "internal server error; the server's log has the details", None,
                    None, kind="server_error").response()


def authorized(headers: dict[str, str], api_key: str) -> bool:
    """Whether the Authorization header is `Bearer <api_key>` (constant-time comparison)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), api_key.encode("utf-8"))


class Gate:
    """Checks every HTTP request before a route sees it: Host, cross-site, body size, API key."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, loopback_only: bool,
                 max_body_bytes: int) -> None:
        self.app, self.api_key = app, api_key
        self.loopback_only, self.max_body_bytes = loopback_only, max_body_bytes

    def refusal(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        host = urlsplit(f"//{headers.get('host', '')}").hostname if "host" in headers else None
        if self.loopback_only and host not in LOOPBACK_HOSTS:
            return ApiError(403, "only loopback Host headers are served (serve.allow_public is "
                                 "off)", None, "forbidden")
        if headers.get("sec-fetch-site", "none").lower() not in ("same-origin", "none"):
            return ApiError(403, "cross-site browser requests are refused", None, "forbidden")
        length = headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            return ApiError(400, "malformed Content-Length header", None, "invalid_body")
        if int(length) > self.max_body_bytes:
            return ApiError(413, f"the request body is larger than this server's limit of "
                                 f"{self.max_body_bytes} bytes", None, "request_too_large")
        if self.api_key and scope["path"] != "/health" and not authorized(headers, self.api_key):
            return ApiError(401, "missing or wrong API key: send the header Authorization: "
                                 "Bearer <the server's LLAMAHOME_API_KEY>", None, "invalid_api_key")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if (error := self.refusal(scope, headers)) is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str,
              api_key: str | None = None, loopback_only: bool = True,
              max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The OpenAI-compatible API (module docstring) over `engine`, serving `model_name`;
    requests fit the engine's max_seq_len."""
    routes = [
        Route("/health", health),
        Route("/stats", stats),
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model),
        Route("/v1/completions", _completion_route(parse_completion, "/v1/completions"),
              methods=["POST"]),
        Route("/v1/chat/completions", _completion_route(parse_chat, "/v1/chat/completions"),
              methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.add_middleware(Gate, api_key=api_key or None, loopback_only=loopback_only,
                       max_body_bytes=max_body_bytes)
    app.state.serve = ServerState(engine, Served(model_name, tokenizer, engine.max_seq_len))
    app.state.max_body_bytes = max_body_bytes
    return app



# --- Listening ------------------------------------------------------------------------------------

def listen(host: str, port: int, allow_public: bool = False) -> socket.socket:
    """The serve job's socket: ConfigError for a non-loopback host unless `allow_public`."""
    return net.listen(host, port, allow_public=allow_public, setting="serve", public_hint=(
        "to serve other machines set serve.allow_public=True (and an API key in "
        "LLAMAHOME_API_KEY), or keep serve.host='127.0.0.1' and reach it through an SSH tunnel"))


def usage_hint(url: str, model_name: str, with_key: bool) -> str:
    """What the serve job prints: the API's URL and a curl and an openai-client call that work."""
    payload = json.dumps({"model": model_name, "prompt": "Once upon a time", "max_tokens": 32})
    auth = ' -H "Authorization: Bearer $LLAMAHOME_API_KEY"' if with_key else ""
    key = "os.environ['LLAMAHOME_API_KEY']" if with_key else "'none'"
    client = (f"import os; from openai import OpenAI; c = OpenAI(base_url={url + '/v1'!r}, "
              f"api_key={key}); print(c.completions.create(model={model_name!r}, "
              "prompt='Once upon a time', max_tokens=32).choices[0].text)")
    lines = [f"serving {model_name!r} with an OpenAI-compatible API on {url}/v1 (Ctrl-C stops it)",
             f"  curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} "
             f"-d {shlex.quote(payload)}",
             f"  python -c {shlex.quote(client)}"]
    if with_key:
        lines.append("  (LLAMAHOME_API_KEY must be set in the shell that runs these)")
    return "\n".join(lines)
