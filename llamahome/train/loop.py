"""The `train` job: `python -m llamahome.launch --gin_file=gin/train/tiny_cpu.gin`.

`train` reads top to bottom: settings, mesh, data, model and optimizer, state (restored or
fresh), the steps compiled once, reporting, then `run_loop`: step, report, eval, save. The
pure steps and their compilation are in llamahome/train/step.py, next to this file.

Settings are passed, not pulled: the model, data, mesh, axis rules, optimizer, checkpoint and
cache are arguments of the job, bound in gin at the top (`train.model =
@LlamaConfig()` and so on). Left unbound, each is its gin-configured constructor called here,
once (`LlamaConfig.hidden_size = ...` in a gin file keeps working); nothing below this file
reads gin. `optimizer` is a function like `build_optimizer` (the default) returning (optax
optimizer, schedule) from (learning_rate, steps, decay_mask=..., horizons=...).

Other settings: `data_shards` is how many readers split the data (default: the process count);
keep it fixed to get the same batches, and resume the same checkpoints, on any number of
hosts. `loss_chunk_length` is the positions per block of the output head + loss (0: the whole
sequence); a divisor of `seq_len` bounds the live logits to [batch, block, vocab].
`downstream_eval_every` runs the lm-eval `downstream_tasks` (up to
`downstream_limit` docs each) on the live params every that many steps, logged as
"downstream" lines and checkpoint metrics (train/downstream.py; DownstreamConfig for the rest).
`resume_with_changed_config` resumes a checkpoint whose gin config differs from this one in
more than run-length settings (llamahome/train/checkpoint.py RESUMABLE_CHANGES).

LoRA (`train.lora = @LoraConfig()`, gin/train/lora.gin): the run trains adapters on the frozen
base named by `init_from` (required), which `base_quant` ('int8' | 'nf4') holds quantized and
`base_dtype` (e.g. 'bfloat16') in a smaller dtype (llamahome/train/frozen.py). The state, the
optimizer and the checkpoints hold only the adapters; every step also records the base's
digest (adapter.json), and a resume on other base weights is refused.

Resuming: the run dir's newest checkpoint that verifies is restored (auto-resume; corrupt
newer steps are named, set aside, and the resume falls back past them); else the run starts
fresh, or from the weights of `init_from`. SIGTERM or SIGINT mid-run saves a checkpoint and
returns normally (status "preempted"); running the same command again continues from it. A run
dir may be a `gs://` / `s3://` URI: its checkpoints are then written and restored in the bucket
(train/checkpoint.py), where only sealed steps are resumed.

Multi-process (one process per host, llamahome/parallel/distributed.py): every process runs
this same function. Each reads its data shards, takes part in every step, eval and checkpoint
save, and agrees with the others after each step on whether a signal asked any of them to
stop; only process 0 writes metrics and status. A `Watchdog` ends a process whose peers
stopped answering.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from llamahome import store
from llamahome.cache import CacheManager
from llamahome.data.pipeline import PipelineConfig, data_pipeline, make_data_iterator, open_shards
from llamahome.data.tokenizer import load_tokenizer, save_run_tokenizer
from llamahome.errors import CheckpointError, ConfigError, UserError
from llamahome.files import RunDir, write_text_atomic
from llamahome.hub.registry import resolve_model_path
from llamahome.jobs import job
from llamahome.model import lora as lora_lib
from llamahome.model.checkpoints import load_params_for
from llamahome.model.llama import (
    Llama, LlamaConfig, adapter_logical_axes, adapter_shapes, checkpoint_vocab, fit_vocab,
    init_adapters, init_params, param_logical_axes, param_shapes,
)
from llamahome.model.lora import LoraConfig
from llamahome.monitor import Heartbeat, MetricsWriter, Profiler, mfu, peak_flops
from llamahome.parallel import distributed
from llamahome.parallel.distributed import Watchdog
from llamahome.parallel.mesh import Rules, axis_rules, batch_sharding, build_mesh, global_batch, init_sharded
from llamahome.train import step as step_lib
from llamahome.train.checkpoint import NO_MANIFEST, CheckpointConfig, Checkpointer, abstract_like
from llamahome.train.downstream import DownstreamEval, build_downstream
from llamahome.train.frozen import FrozenBase, load_base
from llamahome.train.optim import build_optimizer, decay_mask, schedule_horizons
from llamahome.train.step import TrainState, init_train_state

NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(UserError):
    """The loss or gradient norm became NaN/Inf (train.nan_policy = "stop")."""


@job
def train(run_dir: str, *, steps: int = 1000, batch_size: int = 8, seq_len: int = 256,
          learning_rate: float = 3e-4, gradient_accumulation_steps: int = 1, seed: int = 0,
          eval_every: int = 500, eval_batches: int | None = 20, log_every: int = 1,
          z_loss: float = 0.0, init_from: str | None = None, nan_policy: str = "stop",
          progress_bar: bool = True, data_shards: int | None = None,
          loss_chunk_length: int = 0, resume_with_changed_config: bool = False,
          downstream_eval_every: int = 0, downstream_tasks: Sequence[str] = (),
          downstream_limit: int | float | None = None,
          lora: LoraConfig | None = None, base_quant: Literal["int8", "nf4"] | None = None,
          base_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
          model: LlamaConfig | None = None, data: PipelineConfig | None = None,
          mesh: Mesh | None = None, rules: Rules | None = None,
          optimizer: Callable[..., tuple] | None = None, checkpoint: CheckpointConfig | None = None,
          cache: CacheManager | None = None) -> dict:
    """Trains `model` on the train split of `data` for `steps` optimizer steps (see module doc)."""
    _check_settings(seq_len, loss_chunk_length, nan_policy, lora, init_from, base_quant or base_dtype)
    # --- Settings: bound in gin at the top; each unbound one is its gin-configured default.
    mesh, rules, data = mesh or build_mesh(), rules or axis_rules(), data or data_pipeline()
    tokenizer, cache = load_tokenizer(), cache or CacheManager()  # tokenizer: load_tokenizer.path
    checkpoint, optimizer = checkpoint or CheckpointConfig(), optimizer or build_optimizer
    run, is_writer = RunDir(run_dir), distributed.is_coordinator()

    # --- Mesh and data: the validation split is opened once and rewound for every eval.
    batches = batch_sharding(mesh, rules)
    step_lib.check_batch_divisible(batch_size, gradient_accumulation_steps, batches)
    train_iter, validation = _open_splits(
        functools.partial(open_shards, make_data_iterator, global_batch_size=batch_size,
                          num_shards=data_shards, seq_len=seq_len, seed=seed, config=data,
                          tokenizer=tokenizer, cache_manager=cache), eval_every, eval_batches)

    # --- Model and optimizer: the vocabulary and the schedule follow the checkpoint resumed.
    ckpt = Checkpointer(run.checkpoints, checkpoint)
    saved_config = _saved_config(ckpt, resume_step := newest_trusted_step(ckpt))
    config = fit_vocab(model or LlamaConfig(), tokenizer.vocab_size, checkpoint_vocab(saved_config))
    if is_writer:
        save_run_tokenizer(run.path, tokenizer)  # the run dir alone is enough to evaluate it
    apply_fn, param_specs, shapes, init_fn = _trained(config, lora)
    tx, schedule = optimizer(learning_rate, steps, decay_mask=decay_mask(param_specs),
                             horizons=schedule_horizons(steps, resume_step, saved_config))

    # --- State: restored, loaded from init_from, or fresh; born sharded. A LoRA run loads its
    # frozen base from init_from instead; its steps record (and resumes check) the base's hash.
    abstract_state, shardings = step_lib.state_shardings(shapes, param_specs, tx, mesh, rules)
    logging.info("%s: %s, %d params, mesh %s", store.show(run), describe_restore(ckpt, init_from, lora),
                 config.num_params(), dict(mesh.shape))
    resolved = init_from and resolve_model_path(init_from, run_dir)
    base = lora and _frozen_base(ckpt, abstract_state, config, lora, init_from, resolved, mesh,
                                 rules, base_quant, base_dtype)
    # --- Downstream evals: lm-eval tasks on the live params (train/downstream.py), checked here.
    downstream = build_downstream(downstream_eval_every, downstream_tasks, downstream_limit, config,
                                  tokenizer, mesh, rules, best_metric=checkpoint.best_metric,
                                  lora=lora, base_params=base and base.params)
    state = _restore(ckpt, abstract_state, shardings, train_iter, init_fn, tx, seed, config,
                     None if base else resolved, resume_with_changed_config, base)
    train_step, eval_step = step_lib.compile_steps(
        abstract_state, shardings, step_lib.abstract_batch(batch_size, seq_len, batches), mesh,
        rules, apply_fn=apply_fn, frozen=base and base.params, optimizer=tx, schedule=schedule,
        z_loss=z_loss, accum_steps=gradient_accumulation_steps, loss_chunk_length=loss_chunk_length)

    # --- Reporting, then the loop.
    reporter = _reporter(run, config, steps, int(state.step), batch_size, seq_len, progress_bar,
                         nan_policy, log_every, ckpt, lora is not None)
    loop = Loop(train_step, eval_step, train_iter, validation, batches, ckpt, checkpoint, reporter,
                Profiler(_profile_dir(run)),
                Watchdog(f"process {jax.process_index()} of {jax.process_count()}"),
                step_lib.blank_batch(batch_size // jax.process_count(), seq_len), steps, eval_every,
                downstream)
    return _finish(run, is_writer, cache, reporter, *run_loop(loop, state))


def _restore(ckpt: Checkpointer, abstract_state: TrainState, shardings: Any, train_iter: Any,
             init_fn: Callable, tx: optax.GradientTransformation, seed: int, config: LlamaConfig,
             init_from: str | None, resume_with_changed_config: bool,
             base: FrozenBase | None) -> TrainState:
    """The newest trusted step, else `init_from`'s params, else fresh ones (restore_or_init)."""
    return restore_or_init(ckpt, abstract_state, shardings, train_iter, init_params=init_fn,
                           optimizer=tx, seed=seed, init_from=init_from,
                           load_params=lambda path, s: load_params_for(path, config, s),
                           resume_with_changed_config=resume_with_changed_config,
                           check_step=base and base.check_step)


def _open_splits(open_split: Callable[[str], Any], eval_every: int,
                 eval_batches: int | None) -> tuple[Any, Validation | None]:
    """The train iterator, and the validation split opened once (rewound for every eval)."""
    train_iter = open_split("train")
    return train_iter, Validation(open_split("validation"), eval_batches) if eval_every else None


def _finish(run: RunDir, is_writer: bool, cache: CacheManager, reporter: StepReporter,
            state: TrainState, status: str, eval_loss: float | None) -> dict:
    """Writes the cache statistics and returns the job's summary."""
    if is_writer:
        write_text_atomic(run.cache_stats, json.dumps(cache.stats()))
    logging.info("%s at step %d; checkpoints in %s", status, int(state.step), run.checkpoints)
    return {"step": int(state.step), "status": status, "loss": reporter.last_loss,
            "eval_loss": eval_loss if eval_loss is not None else float("nan")}


def _reporter(run: RunDir, config: LlamaConfig, steps: int, start: int, batch_size: int,
              seq_len: int, progress_bar: bool, nan_policy: str, log_every: int,
              ckpt: Checkpointer, frozen_base: bool = False) -> StepReporter:
    """Process 0 writes metrics (with MFU against this host's peak) and heartbeats; the others check.

    A frozen base skips the weight-gradient matmul of each projection: 4, not 6, FLOPs per
    weight and token (the adapters' own are ~1% at rank 16 and left out).
    """
    peak, is_writer = peak_flops(str(config.dtype)), distributed.is_coordinator()
    flops = config.flops_per_token(seq_len) - (2.0 * config.num_matmul_params() if frozen_base else 0)
    return StepReporter(
        MetricsWriter(run.path, steps, start, progress_bar, str(peak)) if is_writer else None,
        Heartbeat(run.path, steps, config.name) if is_writer else None,
        batch_size * seq_len, flops, peak.flops, nan_policy, log_every, ckpt)


def _trained(config: LlamaConfig, lora: LoraConfig | None) -> tuple:
    """(apply_fn, logical axes, shapes, init fn) of what the run trains: the model, or its adapters."""
    model = Llama(config, lora)
    if lora is None:
        return (step_lib.hidden_apply_fn(model), param_logical_axes(config), param_shapes(config),
                functools.partial(init_params, config))
    lora_lib.check_fits(lora, config)
    return (step_lib.lora_apply_fn(model), adapter_logical_axes(config, lora),
            adapter_shapes(config, lora), functools.partial(init_adapters, config, lora))


def _frozen_base(ckpt: Checkpointer, abstract_state: TrainState, config: LlamaConfig,
                 lora: LoraConfig, ref: str, path: str, mesh: Mesh, rules: Rules,
                 base_quant: str | None, base_dtype: str | None) -> FrozenBase:
    """A LoRA run's base, loaded and held; its hash goes into every step's adapter.json."""
    base = load_base(ref, path, config, mesh, rules, base_quant, base_dtype)
    ckpt.on_commit = base.meta_writer(lora, config)
    trainable = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    state_bytes = (lora_lib.adapter_bytes(abstract_state.params)
                   + lora_lib.adapter_bytes(abstract_state.opt_state))
    logging.info("LoRA: %d trainable params (%.3f%% of %d); adapters + optimizer state %.2f MB; "
                 "frozen base %.1f MB (%s)", trainable, 100 * trainable / config.num_params(),
                 config.num_params(), state_bytes / 1e6, base.nbytes() / 1e6,
                 base_quant or base_dtype or config.param_dtype)
    return base


def _check_lora(lora: LoraConfig | None, init_from: str | None, base_held: str | None) -> None:
    if lora is None and base_held:
        raise ConfigError("train.base_quant and train.base_dtype set how a LoRA run holds its "
                          "frozen base: set train.lora = @LoraConfig() (include "
                          "'train/lora.gin'), or unset them")
    if lora is not None and not init_from:
        raise ConfigError("train.lora trains adapters on a frozen base: set train.init_from to "
                          "it (a run dir, a step dir, an import_hf dir, a Hugging Face dir or "
                          "model:name@N)")


def _check_settings(seq_len: int, loss_chunk_length: int, nan_policy: str,
                    lora: LoraConfig | None = None, init_from: str | None = None,
                    base_held: str | None = None) -> None:
    _check_lora(lora, init_from, base_held)
    if loss_chunk_length and seq_len % loss_chunk_length:
        raise ConfigError(f"train.loss_chunk_length={loss_chunk_length} does not divide "
                          f"train.seq_len={seq_len}; use a divisor of it, or 0 for no blocks")
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"train.nan_policy={nan_policy!r}; use one of {NAN_POLICIES}")


# --- The loop -------------------------------------------------------------------------------

class Validation:
    """The validation split, opened once: each eval rewinds it to its first batch."""

    def __init__(self, batches: Any, max_batches: int | None):
        self.batches, self.max_batches = batches, max_batches
        self._start = batches.get_state()

    def rewound(self) -> Iterator[dict]:
        self.batches.set_state(self._start)
        return self.batches


@dataclasses.dataclass
class Loop:
    """What `run_loop` needs, built by `train`."""

    train_step: Callable
    eval_step: Callable
    train_iter: Any
    validation: Validation | None
    batch_sharding: NamedSharding
    ckpt: Checkpointer
    checkpoint: CheckpointConfig
    reporter: StepReporter
    profiler: Profiler
    watchdog: Watchdog
    blank: dict
    steps: int
    eval_every: int
    downstream: DownstreamEval | None = None


def run_loop(loop: Loop, state: TrainState) -> tuple[TrainState, str, float | None]:
    """Steps from `state` to `loop.steps`: step, report (one step behind), eval, save.

    Returns (the last state, "finished" or "preempted", the last eval loss or None).
    """
    start, reporter, ckpt = int(state.step), loop.reporter, loop.ckpt
    if jax.process_count() > 1:
        loop.watchdog.start()  # stays on through the cleanup after an error: that may block on peers too
    eval_loss, pending, stopped = None, None, False
    try:
        with PreemptionSignal() as preempted:
            for step in range(start + 1, loop.steps + 1):
                loop.profiler.before_step(step)
                state, metrics = loop.train_step(state, global_batch(next(loop.train_iter),
                                                                     loop.batch_sharding))
                ckpt.poll()  # seals the last save, or stops here if it failed in the background
                loop.profiler.after_step(step, metrics)
                if pending:
                    reporter.report(*pending)  # the previous step: the host never waits on this one
                pending = (step, metrics)
                stopped = distributed.any_process(preempted.received is not None)
                eval_loss = _evaluate(loop, state, step) if loop.eval_every and step % loop.eval_every == 0 else None
                scores = _downstream(loop, state, step)
                if (step % loop.checkpoint.save_steps == 0 or step == loop.steps or stopped
                        or ((eval_loss is not None or scores) and loop.checkpoint.save_best)):
                    ckpt.save(step, state, loop.train_iter, eval_loss, scores)
                reporter.beat(step)
                loop.watchdog.kick(f"step {step}")
                if stopped:
                    break
            if pending:
                reporter.report(*pending)
    except BaseException:
        reporter.beat(int(pending[0]) if pending else start, "failed")
        raise
    finally:
        loop.profiler.close()
        ckpt.close()
        reporter.close()
    loop.watchdog.stop()
    status = "preempted" if stopped else "finished"
    reporter.beat(int(state.step), status)
    return state, status, eval_loss


def _evaluate(loop: Loop, state: TrainState, step: int) -> float:
    """Mean validation loss of `state` at `step`, recorded by the reporter."""
    validation = loop.validation
    loss = step_lib.mean_eval_loss(
        loop.eval_step, state.params, validation.rewound(), loop.batch_sharding, loop.blank,
        validation.max_batches, on_batch=lambda i, _: loop.watchdog.kick(f"eval batch {i}"))
    loop.reporter.eval(step, loss)
    return loss


def _downstream(loop: Loop, state: TrainState, step: int) -> dict[str, float]:
    """lm-eval task metrics of `state` when due at `step` (recorded by the reporter), else {}.

    Due by step number alone, so a resumed run evaluates exactly the steps the uninterrupted
    run would: each step's state is restored or recomputed, never skipped.
    """
    if loop.downstream is None or not loop.downstream.due(step):
        return {}
    scores = loop.downstream(state.params)
    loop.reporter.downstream(step, scores)
    return scores


class StepReporter:
    """Times steps and writes their metrics and heartbeats; raises NonFiniteLossError under "stop"."""

    def __init__(self, writer: MetricsWriter | None, heartbeat: Heartbeat | None,
                 tokens_per_step: int, flops_per_token: float, peak_flops: float, nan_policy: str,
                 log_every: int, ckpt: Checkpointer):
        self.writer, self.heartbeat, self.tokens_per_step = writer, heartbeat, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.nan_policy, self.log_every, self.ckpt = nan_policy, log_every, ckpt
        self.last_time = time.perf_counter()
        self.last_loss = float("nan")

    def report(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Blocks until step `step` is done, then records it."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        step_time, self.last_time = now - self.last_time, now
        if not values["finite"]:
            if self.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"loss {values['loss']} / grad norm {values['grad_norm']} at step {step} is not "
                    f"finite; the update was not applied. {self._last_checkpoint()} Lower "
                    "train.learning_rate, or set train.nan_policy='skip' to skip such updates")
            logging.warning("step %d: non-finite loss %s, update skipped", step, values["loss"])
        self.last_loss = values["loss"]
        if self.writer is None or step % self.log_every:
            return
        tokens_per_sec = self.tokens_per_step / step_time
        self.writer.train(step, {
            "loss": values["loss"], "grad_norm": values["grad_norm"],
            "learning_rate": values["learning_rate"], "tokens_per_sec": tokens_per_sec,
            "step_time": step_time, "mfu": mfu(self.flops_per_token, tokens_per_sec, self.peak_flops),
            "tokens_seen": step * self.tokens_per_step,
            **{k: values[k] for k in ("router_aux_loss",) if k in values}})  # experts (step.py)

    def eval(self, step: int, loss: float) -> None:
        if self.writer:
            self.writer.eval(step, loss)

    def downstream(self, step: int, scores: dict[str, float]) -> None:
        if self.writer:
            self.writer.downstream(step, scores)

    def beat(self, step: int, status: str | None = None) -> None:
        """The heartbeat of `step`; a final `status` ("finished", "failed", ...) is always written."""
        if self.heartbeat:
            if status is None:
                self.heartbeat.beat(step)
            else:
                self.heartbeat.beat(step, status, force=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def _last_checkpoint(self) -> str:
        step = self.ckpt.latest_step()
        if step is None:
            return "No checkpoint has been saved yet."
        return f"The last checkpoint is step {step} in {store.show(self.ckpt.directory)}."


class PreemptionSignal:
    """Within `with`, SIGTERM and SIGINT set `received` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signum
        logging.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionSignal:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# --- Restoring ------------------------------------------------------------------------------

def restore_or_init(ckpt: Checkpointer, abstract_state: Any, shardings: Any, data_iter: Any,
                    init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                    seed: int, init_from: str | None, load_params: Callable[..., Any] | None,
                    resume_with_changed_config: bool = False,
                    check_step: Callable[[Path], str | None] | None = None) -> TrainState:
    """The newest good checkpoint of this run if there is one, else a fresh state (params maybe loaded).

    `check_step(step_dir)`: another reason a step is not usable (or raises to refuse it outright).
    """
    if ckpt.all_steps():
        state = restore_newest_good(ckpt, abstract_like(abstract_state, shardings), data_iter,
                                    resume_with_changed_config, check_step)
        if state is not None:
            return state
    if init_from:
        params = load_params(init_from, shardings.params)
        make = lambda p: init_train_state(p, optimizer, seed)  # noqa: E731
        return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)
    fresh = lambda key: init_train_state(init_params(key), optimizer, seed)  # noqa: E731
    return init_sharded(fresh, shardings, jax.random.key(seed))


def restore_newest_good(ckpt: Checkpointer, abstract_state: Any, data_iter: Any,
                        resume_with_changed_config: bool,
                        check_step: Callable[[Path], str | None] | None = None) -> TrainState | None:
    """Restores the newest step that verifies and reads; names each newer one and why it was skipped.

    A step without a manifest in a local dir is trusted (with a warning) only when no older step
    has one: it predates checksums. After a sealed step, it is a step the run died before
    sealing. On object storage (`ckpt.strict`) an unsealed step is never trusted; when no step
    there is sealed, they are set aside and None says "start fresh", as after a save killed
    before its commit marker.
    """
    problems: dict[int, str] = {}
    for step in reversed(ckpt.all_steps()):
        problem = step_problem(ckpt, step)
        if problem is None and check_step is not None:
            problem = check_step(ckpt.step_dir(step))
        if problem is None and not ckpt.is_sealed(step):
            logging.warning("checkpoint step %d is unverified: written before checksums (or the run "
                            "stopped right after writing it); restoring it anyway", step)
        if problem is None:
            _check_config(ckpt, step, resume_with_changed_config)
            try:
                state = ckpt.restore(step, abstract_state, data_iter)
            except CheckpointError as e:
                problem = str(e)
        if problem is not None:
            problems[step] = problem
            logging.warning("checkpoint step %d is not usable: %s", step, problem)
            continue
        if problems:
            rejected = ckpt.set_aside(sorted(problems))
            logging.warning("falling back to checkpoint step %d, the newest that verifies (set aside "
                            "step %s in %s)", step, ", ".join(map(str, sorted(problems))),
                            store.show(rejected))
        return state
    if ckpt.strict and all(p.startswith(NO_MANIFEST) for p in problems.values()):
        rejected = ckpt.set_aside(sorted(problems))
        logging.warning("no checkpoint in %s was sealed (set aside step %s in %s): starting fresh",
                        store.show(ckpt.directory), ", ".join(map(str, sorted(problems))),
                        store.show(rejected))
        return None
    listed = "; ".join(f"step {s}: {p}" for s, p in problems.items())
    raise CheckpointError(f"no checkpoint in {store.show(ckpt.directory)} verifies ({listed}). Move the corrupt "
                          "steps away to start over, or use a new run dir")


def step_problem(ckpt: Checkpointer, step: int) -> str | None:
    """What makes `step` untrustworthy, or None; an unsealed local step is trusted only before
    any sealed one, an unsealed step on object storage never."""
    problem = ckpt.verify(step)
    if problem != NO_MANIFEST:
        return problem
    if ckpt.strict:
        return f"{NO_MANIFEST}: its save did not finish (on object storage a step counts once sealed)"
    if any(ckpt.is_sealed(s) for s in ckpt.all_steps() if s < step):
        return f"{NO_MANIFEST}: the run stopped before checking it"
    return None  # written before checksums: restored with a warning


def newest_trusted_step(ckpt: Checkpointer) -> int | None:
    """The step a resume will start from if it reads: the newest whose files verify."""
    return next((s for s in reversed(ckpt.all_steps()) if step_problem(ckpt, s) is None), None)


def _check_config(ckpt: Checkpointer, step: int, resume_with_changed_config: bool) -> None:
    """A resume under a different config (run-length settings aside) needs an explicit yes."""
    changes = ckpt.config_changes(step)
    if not changes:
        return
    listed = "; ".join(changes)
    if not resume_with_changed_config:
        raise ConfigError(f"the gin config differs from the one checkpoint step {step} in "
                          f"{store.show(ckpt.directory)} was saved with: {listed}. Use a new run dir, or set "
                          "train.resume_with_changed_config=True to resume with the new settings")
    logging.warning("resuming step %d with a changed config: %s", step, listed)


def _saved_config(ckpt: Checkpointer, step: int | None) -> str | None:
    """The gin config saved with `step`, or None (no step, or unreadable: the restore says why)."""
    if step is None:
        return None
    try:
        return ckpt.saved_config(step)
    except Exception as e:  # noqa: BLE001  (a corrupt step is the restore's to report)
        logging.warning("could not read the config saved with step %d: %s", step, e)
        return None


def describe_restore(ckpt: Checkpointer, init_from: str | None = None,
                     lora: LoraConfig | None = None) -> str:
    """How the run starts, for its first log line: resuming, loading `init_from`, or from scratch."""
    latest = ckpt.latest_step()
    if latest is not None:
        return f"resuming from the newest checkpoint that verifies (latest: step {latest})"
    if lora is not None:
        return f"training new LoRA adapters (rank {lora.rank}) on the frozen base {init_from}"
    if init_from:
        return f"starting from the weights of {init_from} (fresh optimizer state)"
    return "starting from scratch (random weights)"


def _profile_dir(run: RunDir) -> Path:
    """Process 0 traces into profile/, the others into profile/process_<i>/."""
    return run.profile if distributed.is_coordinator() else run.profile / f"process_{jax.process_index()}"
