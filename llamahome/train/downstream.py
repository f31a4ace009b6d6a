"""Downstream tasks through lm-evaluation-harness: a scoring model over live params, and the
task loading and running that the `lm_eval` job and training's downstream evals share.

    lm = ParamsLM(config, params, tokenizer, mesh=mesh, rules=rules, batch_size=8)
    tasks = load_tasks(["hellaswag"], num_fewshot=0)          # lm-eval Task objects, checked
    results = run_tasks(lm, tasks, limit=100)                 # lm-eval's results dict
    flat_metrics(results) -> {"hellaswag/acc": 0.31, ...}

`ParamsLM` is an lm-eval `TemplateLM`: it tokenizes as lm-eval's `hf` backend (HFLM) does
(context + continuation encoded whole, then split; BOS by the tokenizer's own rule, not added
again to text that starts with it; empty contexts conditioned on BOS, else EOS), groups requests
as HFLM does (sorted by length, one forward pass for continuations that share everything but
their last token), and scores each batch with one jitted forward pass over [batch_size,
bucketed length] (lengths rounded up to a power of two, so new lengths rarely recompile).
It answers `loglikelihood` and `loglikelihood_rolling`; generation lives in the inference
layer (llamahome/infer/lm_eval.py's `LlamaHomeLM` adds `generate_until`), which training does
not import, so training evaluates loglikelihood tasks only (as Levanter's lm-eval callback).

Datasets come from the Hugging Face datasets cache: unless `allow_download`, loading runs with
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, and a task whose data is not cached is one DataError.
lm-eval is the optional `eval` extra; without it these raise a ConfigError saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamahome.data.chat_template import render_chat
from llamahome.data.tokenizer import Tokenizer
from llamahome.errors import ConfigError, DataError, UserError, did_you_mean
from llamahome.model.llama import Llama, LlamaConfig
from llamahome.model.lora import LoraConfig, merge
from llamahome.parallel.mesh import Rules, batch_sharding

try:  # the optional `eval` extra: without it, ParamsLM says how to install it
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only where lm-eval is absent
    TemplateLM = object

FEWSHOT_SEED = 1234  # lm-eval's default fewshot, numpy and torch seeds
MIN_BUCKET = 16
NO_LM_EVAL = ("lm-eval is not installed; install the eval extra (pip install 'llamahome[eval]' "
              "or pip install 'lm-eval>=0.4.8,<0.5')")


def require_lm_eval() -> None:
    """Raises a ConfigError naming the extra to install when lm-eval is missing."""
    if TemplateLM is object:
        raise ConfigError(NO_LM_EVAL)


def bucket(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row is `length`: a power of two (>= 16)."""
    return min(max_length, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


@functools.partial(jax.jit, static_argnums=0)
def score_batch(model: Llama, params: Any, tokens: jax.Array, last: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(next token) [B, T], greedy ids [B, T], log-softmax at row b's `last[b]` [B, V]).

    tokens [B, T] are right-padded: causal attention keeps padding out of every real position,
    as in HFLM's unmasked forward, so no segment ids are needed.
    """
    hidden, head = model.apply({"params": params}, tokens, return_hidden=True)
    logits = jnp.einsum("btd,dv->btv", hidden, head).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    rows = jnp.arange(tokens.shape[0])
    return target_logp, jnp.argmax(logits, axis=-1), logp[rows, last]


class ParamsLM(TemplateLM):
    """An lm-eval model over a LlamaHome model's params (see the module docstring)."""

    def __init__(self, config: LlamaConfig, params: Any, tokenizer: Tokenizer, *,
                 mesh: Mesh | None = None, rules: Rules | None = None, batch_size: int = 8,
                 max_length: int | None = None, add_bos: bool | None = None, name: str = "llamahome"):
        require_lm_eval()
        super().__init__()
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model "
                            f"{config.name!r} only {config.vocab_size}; use the model's tokenizer")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: score at least 1 request per batch")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.mesh, self.rules, self.add_bos, self.name = mesh, rules, add_bos, name
        self._max_length = max_length or config.max_seq_len
        shards = 1
        if mesh is not None:
            self._rows = batch_sharding(mesh, rules)  # [B, T]; and [B] split the same way:
            self._row = NamedSharding(mesh, PartitionSpec(self._rows.spec[0]))
            shards = math.prod(mesh.shape[a] for a in _axes(self._rows))
        self._batch_size = -(-batch_size // shards) * shards  # whole shards of the batch
        self._model = Llama(config)  # static: every ParamsLM of one config shares the compiled code
        self._bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None \
            else None
        self._bos_text = getattr(tokenizer, "special_tokens", {}).get("bos_token", self._bos_text)

    def set_params(self, params: Any) -> None:
        """Scores with `params` from now on (same shapes: nothing recompiles)."""
        self.params = params

    # --- What lm-eval asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return self.tokenizer.eos_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.spec.path).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.config.num_params(), "model_dtype": self.config.dtype,
                "model_name": self.name}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Ids of `string` as HFLM encodes it: the tokenizer's BOS/EOS rule, none when
        `add_special_tokens` is False, and no second BOS on text that starts with one."""
        del kwargs
        special = self.add_bos if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            special = False
        if special is False:
            ids = self.tokenizer.encode(string, add_bos=False, add_eos=False)
        else:
            ids = self.tokenizer.encode(string, add_bos=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat rendered with the model's template (data/chat_template.py), as HFLM asks
        transformers: with the assistant header, or else continuing the final message."""
        special = getattr(self.tokenizer, "special_tokens", {})
        text = render_chat(self.tokenizer.chat_template, chat_history,
                           add_generation_prompt=add_generation_prompt, **special)
        return text if add_generation_prompt else continue_final_message(text, chat_history)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tasks = sorted({r.task_name for r in requests if getattr(r, "task_name", None)})
        raise ConfigError(f"task(s) {tasks} generate text; downstream evals in training score "
                          "loglikelihood tasks only. Run generative tasks with the lm_eval job on "
                          "a checkpoint (gin/jobs/lm_eval.gin)")

    # --- Scoring ----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum log p(continuation), continuation is greedy) per (strings, context, continuation)."""
        from lm_eval.models.utils import Collator  # noqa: PLC0415

        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            target_logp, greedy, last_logp = self._forward(inputs)
            for row, ((strings, ctx, cont), inp) in enumerate(zip(chunk, inputs)):
                for member_strings, member_cont, _ in order.get_cache(
                        req_str=strings, cxt_toks=ctx, cont_toks=cont, logits=_Rows(1)):
                    answer = _answer(member_cont, len(inp), target_logp[row], greedy[row],
                                     last_logp[row])
                    results.append(answer)
                    if member_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", member_strings, answer)
        return order.get_original(results)

    def _forward(self, inputs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One jitted forward pass over `inputs`, padded to [batch_size, bucketed length]."""
        width = bucket(max(len(i) for i in inputs), self.max_length)
        tokens = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
        last = np.zeros(self.batch_size, np.int32)
        for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = ids
            last[row] = len(ids) - 1
        with self._sharded():
            if self.mesh is not None:
                tokens, last = jax.device_put(tokens, self._rows), jax.device_put(last, self._row)
            out = score_batch(self._model, self.params, tokens, last)
        return tuple(np.asarray(x) for x in jax.device_get(out))

    def _sharded(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.sharding.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum log p of each whole string, in windows of max_length as HFLM cuts them."""
        from lm_eval import utils  # noqa: PLC0415

        windows, owners = [], []
        for index, (string,) in enumerate(r.args for r in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals


class _Rows:
    """Stands in for HFLM's logits tensor in Collator.get_cache, which only expands and chunks
    it per cached request; the scores are read from the batch's arrays instead."""

    def __init__(self, n: int):
        self.n = n

    def expand(self, n: int, *_):
        return _Rows(n)

    def chunk(self, n: int):
        return [_Rows(1)] * n


def _answer(cont: list[int], inplen: int, target_logp: np.ndarray, greedy: np.ndarray,
            last_logp: np.ndarray) -> tuple[float, bool]:
    """HFLM's (log prob, is greedy) of `cont`, the continuation ending at input position inplen-1.

    Requests grouped with this row share its input, so only their last token differs: it is
    read from the full log-softmax of the last position.
    """
    start = inplen - len(cont)
    logprob = float(np.sum(target_logp[start:inplen - 1], dtype=np.float64) + last_logp[cont[-1]])
    return logprob, bool(np.array_equal(greedy[start:inplen], cont))


def _axes(sharding) -> tuple[str, ...]:
    spec = sharding.spec[0] if sharding.spec else None
    return spec if isinstance(spec, tuple) else (spec,) if spec else ()


def continue_final_message(text: str, messages: Sequence[dict]) -> str:
    """`text` cut right after the last message's content (transformers' continue_final_message)."""
    final = str(messages[-1]["content"]) if messages else ""
    if not final.strip() or final.strip() not in text:
        raise DataError("the chat template does not render the final message's text, so it "
                        "cannot be continued; use a task without gen_prefix or another template")
    at = text.rindex(final.strip())
    if text[at:at + len(final.lstrip())] == final.lstrip():
        return text[:at + len(final.lstrip())]
    return text[:at + len(final.strip())]


# --- Tasks ----------------------------------------------------------------------------------

@contextlib.contextmanager
def datasets_offline(offline: bool) -> Iterator[None]:
    """Within, `datasets` and `huggingface_hub` read only their caches when `offline`."""
    if not offline:
        yield
        return
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "1" for n in names})
    modules = _offline_flags()
    before = [(m, a, getattr(m, a)) for m, a in modules]
    for module, attr in modules:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in before:
            setattr(module, attr, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _offline_flags() -> list[tuple[Any, str]]:
    """The module-level switches `datasets` and `huggingface_hub` read their env vars into."""
    import datasets.config  # noqa: PLC0415
    import huggingface_hub.constants  # noqa: PLC0415

    return [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
            (huggingface_hub.constants, "HF_HUB_OFFLINE")]


def task_manager(include_path: str | Sequence[str] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager over its built-in tasks (unless not `include_defaults`) and
    the user's YAML tasks under `include_path`."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    paths = [include_path] if isinstance(include_path, str) else list(include_path or ())
    for path in paths:
        if not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"include_path {path} does not exist; point it at a folder of "
                              "lm-eval task YAML files")
    return TaskManager(include_path=[os.path.expanduser(p) for p in paths] or None,
                       include_defaults=include_defaults)


def load_tasks(names: Sequence[str], *, manager=None, num_fewshot: int | None = None,
               allow_download: bool = False, where: str = "lm_eval.tasks",
               fewshot_name: str = "lm_eval.num_fewshot") -> dict:
    """lm-eval's task dict {"tasks", "groups", "group_map"} for `names`, checked up front:
    an unknown name, a dataset not in the cache, a num_fewshot larger than the fewshot docs
    each raise one clear UserError naming the task."""
    if isinstance(names, str) or not names:
        raise ConfigError(f"{where}={names!r}: give a list of lm-eval task names, e.g. "
                          f"{where}=['hellaswag']")
    manager = manager or task_manager()
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    known = [*manager.all_tasks, *manager.all_groups, *manager.all_tags]
    for name in names:
        if name not in known and not manager.match_tasks([name]):
            raise ConfigError(f"{where}: unknown lm-eval task {name!r}.{did_you_mean(name, known)}"
                              " Put your own task YAML under include_path")
        with datasets_offline(not allow_download):
            try:
                one = manager.load(manager.match_tasks([name]) or [name])
            except Exception as e:  # noqa: BLE001  (datasets raises many kinds for a cache miss)
                raise _dataset_error(name, e, allow_download) from None
        for key in loaded:
            loaded[key].update(one[key])
    for task in loaded["tasks"].values():
        _set_fewshot(task, num_fewshot, fewshot_name)
    return loaded


def _dataset_error(task: str, e: Exception, allow_download: bool) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if allow_download:
        return DataError(f"task {task!r}: its dataset did not load: {first}")
    return DataError(f"task {task!r}: its dataset is not in the Hugging Face datasets cache and "
                     f"downloads are off ({type(e).__name__}: {first}); set allow_download=True "
                     "to fetch it once, or point the task at local files")


def _set_fewshot(task: Any, num_fewshot: int | None, fewshot_name: str) -> None:
    """Applies num_fewshot as lm-eval's simple_evaluate does, then checks the docs suffice."""
    configured = task.get_config("num_fewshot")
    if num_fewshot is not None and configured != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif configured is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    shots = task.get_config("num_fewshot") or 0
    if shots == 0:
        return
    docs = task.fewshot_docs()
    available = len(docs) if docs is not None else 0
    fewshot_split = task.get_config("fewshot_split") or task.get_config("training_split") or \
        task.get_config("validation_split")
    eval_split = task.get_config("test_split") or task.get_config("validation_split")
    if fewshot_split == eval_split:
        available -= 1  # lm-eval leaves the evaluated doc out of its own fewshot examples
    if shots > available:
        raise ConfigError(f"{fewshot_name}={shots} but task "
                          f"{task.get_config('task')!r} has only {max(available, 0)} fewshot "
                          f"examples (split {fewshot_split!r}); lower num_fewshot")


def run_tasks(lm: Any, tasks: dict, *, limit: int | float | None = None,
              log_samples: bool = False, apply_chat_template: bool = False,
              fewshot_as_multiturn: bool = False, system_instruction: str | None = None,
              bootstrap_iters: int = 100000) -> dict:
    """lm-eval's results dict of `tasks` (from load_tasks) scored by `lm`, seeded as
    lm-eval's simple_evaluate seeds (minus its git and environment probes)."""
    from lm_eval import evaluator  # noqa: PLC0415

    random.seed(0)
    np.random.seed(FEWSHOT_SEED)
    return evaluator.evaluate(lm=lm, task_dict=tasks, limit=limit, log_samples=log_samples,
                              apply_chat_template=apply_chat_template,
                              fewshot_as_multiturn=fewshot_as_multiturn,
                              system_instruction=system_instruction,
                              bootstrap_iters=bootstrap_iters)


def flat_metrics(results: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} of every numeric metric (filter "none" dropped from the name,
    others kept as <metric>_<filter>), stderrs left out."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or \
                    isinstance(value, bool) or not filt:
                continue
            flat[f"{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    return flat


# --- Downstream evals in training ------------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """How training's downstream evals run (what and when: train.downstream_*)."""

    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 8
    include_path: str | None = None  # a folder of the user's own lm-eval task YAML files
    include_defaults: bool = True  # also index lm-eval's ~15k built-in tasks (a few seconds)
    allow_download: bool = False  # else datasets come from the HF datasets cache only


class DownstreamEval:
    """Runs lm-eval tasks on the live params every `every` steps; built before the first step,
    so a bad task name or a dataset missing from the cache stops the run before it trains.
    `full_params(params)` turns the trained params into the model's (a LoRA run's adapters
    merged into its frozen base)."""

    def __init__(self, every: int, tasks: Sequence[str], limit: int | float | None,
                 config: LlamaConfig, tokenizer: Tokenizer, mesh: Mesh, rules: Rules,
                 full_params: Callable[[Any], Any] = lambda p: p,
                 settings: DownstreamConfig | None = None):
        settings = settings or DownstreamConfig()
        self.every, self.limit, self.full_params = every, limit, full_params
        manager = task_manager(settings.include_path, settings.include_defaults)
        self.tasks = load_tasks(tasks, manager=manager, num_fewshot=settings.num_fewshot,
                                allow_download=settings.allow_download,
                                where="train.downstream_tasks",
                                fewshot_name="DownstreamConfig.num_fewshot")
        generative = sorted(n for n, t in self.tasks["tasks"].items()
                            if t.get_config("output_type") == "generate_until")
        if generative:
            raise ConfigError(f"train.downstream_tasks: {generative} generate text; training "
                              "scores loglikelihood tasks only. Evaluate them with the lm_eval job")
        self.lm = ParamsLM(config, None, tokenizer, mesh=mesh, rules=rules,
                           batch_size=settings.batch_size)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, params: Any) -> dict[str, float]:
        """{"<task>/<metric>": value} of `params`."""
        self.lm.set_params(self.full_params(params))
        return flat_metrics(run_tasks(self.lm, self.tasks, limit=self.limit, bootstrap_iters=0))


def build_downstream(every: int, tasks: Sequence[str], limit: int | float | None,
                     config: LlamaConfig, tokenizer: Tokenizer, mesh: Mesh, rules: Rules, *,
                     best_metric: str = "eval_loss", lora: LoraConfig | None = None,
                     base_params: Any = None) -> DownstreamEval | None:
    """The downstream evals of a training run, or None when train.downstream_eval_every is 0."""
    if every < 0:
        raise ConfigError(f"train.downstream_eval_every={every}: use a positive step count, or 0 "
                          "for no downstream evals")
    if best_metric.startswith("downstream/") and not every:
        raise ConfigError(f"CheckpointConfig.best_metric={best_metric!r} needs downstream evals: "
                          "set train.downstream_eval_every and train.downstream_tasks")
    if not every:
        return None
    full = (lambda p: merge(base_params, p, lora)) if lora is not None else (lambda p: p)
    evals = DownstreamEval(every, tasks, limit, config, tokenizer, mesh, rules, full)
    task = best_metric.removeprefix("downstream/").rpartition("/")[0]
    if best_metric.startswith("downstream/") and task not in evals.tasks["tasks"]:
        raise ConfigError(f"CheckpointConfig.best_metric={best_metric!r} names task {task!r}, "
                          f"which train.downstream_tasks does not run ({sorted(evals.tasks['tasks'])})")
    return evals
