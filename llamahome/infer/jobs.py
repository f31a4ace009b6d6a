"""The `generate`, `evaluate` and `serve` jobs (gin/jobs/generate.gin, evaluate.gin, serve.gin).

    python -m llamahome.launch --gin_file=gin/jobs/generate.gin \\
        --gin_param="generate.checkpoint='runs/<run>'" --gin_param="generate.prompts=['Once upon']"
streams the completions to the console and writes <run_dir>/generations.jsonl, one line per
prompt: {"index", "prompt" | "messages", "completion", "token_ids", "prompt_tokens",
"finish_reason", "seed"}.

    python -m llamahome.launch --gin_file=gin/jobs/evaluate.gin --gin_param="evaluate.checkpoint='runs/<run>'"
evaluates on the held-out split of the data the run trained on, with the run's tokenizer (add
--gin_file=gin/data/<set>.gin for another data set), and writes {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "batches"} to
<run_dir>/eval_results.json and an eval line to <run_dir>/metrics.jsonl.

`checkpoint` is a training run dir (latest step, or `step`), a step dir, an import_hf output,
a Hugging Face directory (see checkpoints.py), or `model:name@N`, a version in the model
registry (the run is recorded as one of its users). A LoRA checkpoint (a LoRA run, an
import_peft output or a LoRA export) runs as its adapters on its base, unmerged. Both jobs lay the params out on the mesh
and axis rules bound for training (build_mesh, axis_rules).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import gin
import jax
import uvicorn
from absl import logging

from llamahome import net, secrets
from llamahome.cache import CacheManager
from llamahome import store
from llamahome.config.gin_config import binding_statements, gin_bindings
from llamahome.data.pipeline import data_pipeline, make_data_iterator
from llamahome.data.tokenizer import Tokenizer, TokenizerSpec, load_tokenizer, tokenizer_from_spec
from llamahome.errors import ConfigError, DataError
from llamahome.files import RunDir, write_text_atomic
from llamahome.hub.registry import resolve_model_path
from llamahome.infer import evaluate as evaluate_lib
from llamahome.infer import serve as serve_lib
from llamahome.infer.engine import Engine
from llamahome.infer.generator import Completion, Generator, Prompt, generator_for
from llamahome.infer.samplers import SamplerConfig
from llamahome.jobs import job
from llamahome.model.checkpoints import LoadedModel, describe, load_model
from llamahome.model.llama import LlamaConfig
from llamahome.monitor import MetricsWriter
from llamahome.parallel import distributed
from llamahome.parallel.mesh import axis_rules, build_mesh

DEFAULT_SEQ_LEN = 256


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file: JSONL lines with "prompt" or "messages", or plain text, one per line."""
    path = store.as_path(path)
    if not path.is_file():
        raise DataError(f"prompts file {store.show(path)} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{store.show(path)}:{number}: not valid JSON ({e})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        else:
            raise DataError(f"{store.show(path)}:{number}: expected an object with a \"prompt\" string or a "
                            "\"messages\" list of {\"role\", \"content\"}")
    return prompts


def _as_chat(prompt: Prompt, system: str | None) -> Prompt:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _shown(prompt: Prompt) -> str:
    """How a prompt is echoed before its completion: the text itself, or the last chat turn."""
    return prompt if isinstance(prompt, str) else f"[{prompt[-1]['role']}] {prompt[-1]['content']}\n"


def _complete(generator: Generator, batch: Sequence[Prompt], max_new_tokens: int,
              sampler: SamplerConfig, seed: int, echo: bool) -> list[Completion]:
    """Completes a batch, printing its text as produced: inline for one prompt, else by row."""
    stream = generator.stream_batch(batch, max_new_tokens, sampler, seed,
                                    chunk=4 if echo else max_new_tokens)
    if echo and len(batch) == 1:
        sys.stdout.write(_shown(batch[0]))
    for pieces in stream:
        if echo and len(batch) == 1 and pieces[0]:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
    if echo:
        texts = [c.text for c in stream.completions]
        sys.stdout.write("\n" if len(batch) == 1 else "".join(
            f"--- [{row}]\n{_shown(prompt)}{text}\n" for row, (prompt, text) in enumerate(zip(batch, texts))))
        sys.stdout.flush()
    return stream.completions


@job
def generate(run_dir: str, *, checkpoint: str = gin.REQUIRED, step: int | None = None,
             tokenizer: str | None = None, prompts: Sequence[str] = (),
             prompts_file: str | None = None, chat: bool = False, system: str | None = None,
             max_new_tokens: int = 128, sampler: SamplerConfig | None = None, seed: int = 0,
             batch_size: int = 8, stream: bool = True, dtype: str | None = None,
             add_bos: bool | None = None, stop: Sequence[str] = ()) -> list[dict]:
    """Completes `prompts` (and those in `prompts_file`) with a checkpoint; see the module doc.

    Text prompts get BOS by the tokenizer's own rule unless `add_bos` says; generation also
    stops at any string in `stop` (cut from the completion).
    """
    all_prompts: list[Prompt] = list(prompts)
    if prompts_file:
        all_prompts += read_prompts(prompts_file)
    if not all_prompts:
        raise DataError("no prompts: bind generate.prompts=['...'] or generate.prompts_file")
    if chat:
        all_prompts = [_as_chat(p, system) for p in all_prompts]
    sampler = sampler or SamplerConfig()
    mesh, rules = build_mesh(), axis_rules()
    overrides = {"dtype": dtype} if dtype else {}
    model = load_model(resolve_model_path(checkpoint, run_dir), step=step, config=LlamaConfig(),
                       mesh=mesh, rules=rules, **overrides)
    logging.info("generating with %s", describe(model))
    generator = generator_for(model, tokenizer, mesh=mesh, rules=rules, add_bos=add_bos,
                              stop_strings=stop)
    echo = stream and distributed.is_coordinator()

    records, start = [], time.perf_counter()
    for first in range(0, len(all_prompts), batch_size):
        batch = all_prompts[first:first + batch_size]
        completions = _complete(generator, batch, max_new_tokens, sampler, seed + first, echo)
        for offset, (prompt, completion) in enumerate(zip(batch, completions)):
            if not echo and distributed.is_coordinator():
                logging.info("[%d] %s", first + offset, completion.text)
            records.append({"index": first + offset,
                            ("prompt" if isinstance(prompt, str) else "messages"): prompt,
                            "completion": completion.text, "token_ids": completion.token_ids,
                            "prompt_tokens": completion.prompt_tokens,
                            "finish_reason": completion.finish_reason,
                            "seed": seed + first + offset})  # prompt i samples with seed + i
    new_tokens = sum(len(r["token_ids"]) for r in records)
    logging.info("%d completions, %d new tokens in %.1f s", len(records), new_tokens,
                 time.perf_counter() - start)
    if distributed.is_coordinator():
        out = RunDir(run_dir)
        out.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out.generations, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _is_data_binding(name: str) -> bool:
    """A macro, or a binding of a configurable from llamahome.data other than the tokenizer."""
    if "." not in name:
        return True
    selector = name.rpartition("/")[2].rsplit(".", 1)[0]
    match = gin.config._REGISTRY.get_match(selector)
    module = getattr(match.wrapped, "__module__", "") if match else ""
    return module.startswith("llamahome.data.") and selector != "load_tokenizer"


def _data_bound() -> bool:
    try:
        gin.query_parameter("data_pipeline.sources")
        return True
    except ValueError:
        return False


def use_run_data(model: LoadedModel) -> str:
    """Binds the data set the model was trained on, unless one is bound; says which it is."""
    if _data_bound():
        return "the data set bound for this job"
    if not model.gin_config:
        raise ConfigError(f"{model.path} is not a training run, so it names no data set; pick one "
                          "with --gin_file=gin/data/<set>.gin (e.g. gin/data/shakespeare.gin)")
    kept = [statement for name, _, statement in binding_statements(model.gin_config)
            if _is_data_binding(name) and "<redacted>" not in statement]
    with gin.unlock_config():
        gin.parse_config("".join(kept))
    return f"the data set of the run ({model.path.parent.parent})"


def eval_tokenizer(model: LoadedModel, path: str | None) -> Tokenizer:
    """`path` if given, else the model's own tokenizer, else the one bound in gin."""
    if path:
        return tokenizer_from_spec(TokenizerSpec(str(path)))
    if model.tokenizer is not None:
        return tokenizer_from_spec(model.tokenizer)
    try:
        return load_tokenizer()
    except RuntimeError:  # gin: load_tokenizer.path unbound
        raise ConfigError(f"no tokenizer found for {model.path}; set evaluate.tokenizer='...' to "
                          "a tokenizer.json, a SentencePiece .model or a folder holding one") from None


@job
def evaluate(run_dir: str, *, checkpoint: str = gin.REQUIRED, step: int | None = None,
             split: str = "validation", batch_size: int = 8, seq_len: int | None = None,
             max_batches: int | None = None, seed: int = 0, bits_per_byte: bool = True,
             dtype: str | None = None, tokenizer: str | None = None) -> dict:
    """Mean loss, perplexity and bits per byte of a checkpoint over a data split.

    The data set is the one bound (a gin/data/<set>.gin), else the one the run was trained on;
    the tokenizer is `tokenizer`, else the model's own (its run's copy or its files);
    `seq_len` defaults to the run's train.seq_len (else 256).
    """
    mesh, rules = build_mesh(), axis_rules()
    overrides = {"dtype": dtype} if dtype else {}
    model = load_model(resolve_model_path(checkpoint, run_dir), step=step, config=LlamaConfig(),
                       mesh=mesh, rules=rules, **overrides)
    data = use_run_data(model)
    trained = gin_bindings(model.gin_config, "train").get("seq_len") if model.gin_config else None
    seq_len = seq_len or (trained if isinstance(trained, int) else DEFAULT_SEQ_LEN)
    text_tokenizer = eval_tokenizer(model, tokenizer)
    logging.info("evaluating %s on split %r of %s", describe(model), split, data)
    batches = make_data_iterator(split, global_batch_size=batch_size, seq_len=seq_len, seed=seed,
                                 config=data_pipeline(), tokenizer=text_tokenizer,
                                 cache_manager=CacheManager())
    result = evaluate_lib.evaluate_params(
        model.params, model.config, batches, mesh=mesh, rules=rules,
        tokenizer=text_tokenizer if bits_per_byte else None, max_batches=max_batches,
        lora=model.lora, adapters=model.adapters)  # a LoRA checkpoint: on its base, unmerged
    extent = (f"its first {result.batches} batches" if result.batches == max_batches
              else f"all {result.batches} batches")
    logging.info("loss %.4f, perplexity %.2f, bits per byte %s over %d tokens (split %r, %s of "
                 "%d x %d)", result.loss, result.perplexity,
                 "n/a" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}",
                 result.tokens, split, extent, batch_size, seq_len)
    if distributed.is_coordinator():
        out = RunDir(run_dir)
        out.path.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(model.path), "step": model.step, "split": split,
                  **result.as_dict()}
        write_text_atomic(out.eval_results, json.dumps(record, indent=2) + "\n")
        metrics = MetricsWriter(out.path, total_steps=0, progress_bar=False)
        metrics.eval(model.step or 0, result.loss, bits_per_byte=result.bits_per_byte)
        metrics.close()
    return result.as_dict()


# --- serve (gin/jobs/serve.gin): the OpenAI-compatible server ---

SERVE_MAX_SEQ_LEN = 2048  # serve.max_seq_len=None: the model's context, at most this


def _serve_tokenizer(model: LoadedModel, path: str | None) -> Tokenizer:
    spec = TokenizerSpec(str(path)) if path else model.tokenizer
    if spec is None:
        raise ConfigError(f"no tokenizer found for {model.path}; set serve.tokenizer='...' to a "
                          "tokenizer.json, a SentencePiece .model or a folder holding one")
    return tokenizer_from_spec(spec)


def served_name(checkpoint: str) -> str:
    """The default `model` name clients send: a registry ref's name@N, else the folder's name."""
    if checkpoint.startswith("model:"):
        return checkpoint[len("model:"):]
    return store.resolve(checkpoint).name


@job
def serve(run_dir: str, *, checkpoint: str = gin.REQUIRED, step: int | None = None,
          tokenizer: str | None = None, model_name: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, allow_public: bool = False, max_batch: int = 8,
          max_seq_len: int | None = None, max_queue: int = 64, dtype: str | None = None,
          max_body_bytes: int = serve_lib.MAX_BODY_BYTES) -> None:
    """Serves a checkpoint over an OpenAI-compatible HTTP API until interrupted (infer/serve.py).

    `checkpoint` is what generate takes (a run dir, step dir, HF dir, `model:name@N`, or a LoRA
    adapter on its base). The engine decodes `max_batch` requests at once in slots of
    `max_seq_len` tokens; `max_queue` more may wait, then 429. Only loopback hosts are served
    unless `allow_public`; LLAMAHOME_API_KEY (environment or .env), when set, is required.
    """
    if jax.process_count() > 1:
        raise ConfigError("serve runs in one process (its mesh spans that host's devices); "
                          "start it without LLAMAHOME_NUM_PROCESSES / a multi-host launcher")
    sock = serve_lib.listen(host, port, allow_public)  # refused before anything is loaded
    try:
        mesh, rules = build_mesh(), axis_rules()
        overrides = {"dtype": dtype} if dtype else {}
        model = load_model(resolve_model_path(checkpoint, run_dir), step=step,
                           config=LlamaConfig(), mesh=mesh, rules=rules, **overrides)
        text_tokenizer = _serve_tokenizer(model, tokenizer)
        seq_len = max_seq_len or min(model.config.max_seq_len, SERVE_MAX_SEQ_LEN)
        with Engine(model.config, model.params, text_tokenizer, max_batch=max_batch,
                    max_seq_len=seq_len, mesh=mesh, rules=rules, lora=model.lora,
                    adapters=model.adapters, max_queue=max_queue) as engine:
            name = model_name or served_name(checkpoint)
            api_key = secrets.api_key()
            app = serve_lib.build_app(engine, text_tokenizer, model_name=name, api_key=api_key,
                                      loopback_only=not allow_public, max_body_bytes=max_body_bytes)
            logging.info("serving %s as %r: %d slots of %d tokens, %d may wait; API key %s",
                         describe(model), name, max_batch, seq_len, max_queue,
                         "required" if api_key else "off")
            print(serve_lib.usage_hint(net.url_of(sock), name, api_key is not None), flush=True)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   timeout_graceful_shutdown=2))
            server.run(sockets=[sock])
    finally:
        sock.close()
