"""Helpers of the train job (llamahome/train/job.py), each doing one thing.

- `state_shardings`: where every leaf of the TrainState lives, from the model's logical names.
- `restore_or_init`: a TrainState born sharded, from scratch, from a params checkpoint
  (`init_from`), or from the run dir's newest checkpoint that verifies (auto-resume; corrupt
  newer steps are named, set aside, and the resume falls back past them).
- `compile_train_step` / `compile_eval_step`: the pure steps jit-compiled once, with shardings.
- `evaluate`: mean loss over (a prefix of) the validation split, the same number of eval
  steps on every process.
- `StepReporter`: turns one step's metrics into the JSONL/TensorBoard/progress records,
  one step behind the step being dispatched so the host never stalls the device.
- `PreemptionSignal`: SIGTERM/SIGINT set a flag; the loop saves and leaves cleanly.
"""

from __future__ import annotations

import functools
import itertools
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from llamahome.errors import CheckpointError, ConfigError, UserError
from llamahome.monitor.mfu import mfu
from llamahome.monitor.writers import MetricsWriter
from llamahome.parallel import distributed, sharding
from llamahome.parallel.rules import Rules
from llamahome.train import step as step_lib
from llamahome.train.checkpoint import NO_MANIFEST, Checkpointer, abstract_like
from llamahome.train.state import TrainState, init_train_state

BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                "segment_ids": jnp.int32, "loss_mask": jnp.float32}


class NonFiniteLossError(UserError):
    """The loss or gradient norm became NaN/Inf (train.nan_policy = "stop")."""


def state_shardings(params_shape: Any, param_specs: Any, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """(abstract TrainState, its shardings): params by logical name, optimizer state following them."""
    param_shardings = sharding.logical_shardings(param_specs, mesh, rules)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), params_shape)
    shardings = TrainState(
        step=sharding.replicated(mesh), params=param_shardings,
        opt_state=sharding.follow_params(abstract.opt_state, params_shape, param_shardings, mesh),
        rng=sharding.replicated(mesh))
    return abstract, shardings


def restore_or_init(ckpt: Checkpointer, abstract_state: Any, shardings: Any, data_iter: Any,
                    init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                    seed: int, init_from: str | None, load_params: Callable[..., Any] | None,
                    resume_with_changed_config: bool = False) -> TrainState:
    """The newest good checkpoint of this run if there is one, else a fresh state (params maybe loaded)."""
    if ckpt.all_steps():
        return restore_newest_good(ckpt, abstract_like(abstract_state, shardings), data_iter,
                                   resume_with_changed_config)
    if init_from:
        params = load_params(init_from, shardings.params)
        make = functools.partial(init_train_state, optimizer=optimizer, seed=seed)
        return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)
    fresh = lambda key: init_train_state(init_params(key), optimizer, seed)  # noqa: E731
    return sharding.init_sharded(fresh, shardings, jax.random.key(seed))


def restore_newest_good(ckpt: Checkpointer, abstract_state: Any, data_iter: Any,
                        resume_with_changed_config: bool) -> TrainState:
    """Restores the newest step that verifies and reads; names each newer one and why it was skipped.

    A step without a manifest is trusted (with a warning) only when no older step has one: it
    predates checksums. After a sealed step, it is a step the run died before sealing.
    """
    steps = ckpt.all_steps()
    problems: dict[int, str] = {}
    for step in reversed(steps):
        problem = step_problem(ckpt, step)
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
                            "step %s in %s)", step, ", ".join(map(str, sorted(problems))), rejected)
        return state
    listed = "; ".join(f"step {s}: {p}" for s, p in problems.items())
    raise CheckpointError(f"no checkpoint in {ckpt.directory} verifies ({listed}). Move the corrupt "
                          "steps away to start over, or use a new run dir")


def step_problem(ckpt: Checkpointer, step: int) -> str | None:
    """What makes `step` untrustworthy, or None; an unsealed step is trusted only before any sealed one."""
    problem = ckpt.verify(step)
    if problem != NO_MANIFEST:
        return problem
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
                          f"{ckpt.directory} was saved with: {listed}. Use a new run dir, or set "
                          "train.resume_with_changed_config=True to resume with the new settings")
    logging.warning("resuming step %d with a changed config: %s", step, listed)


def abstract_batch(batch_size: int, seq_len: int, batch_sharding: NamedSharding) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), d, sharding=batch_sharding)
            for k, d in BATCH_DTYPES.items()}


def compile_train_step(abstract_state: Any, shardings: Any, batch: dict, mesh: Mesh, rules: Rules,
                       **step_kwargs: Any) -> jax.stages.Compiled:
    """train_step bound to model/optimizer and compiled once; the state argument is donated."""
    fn = functools.partial(step_lib.train_step, **step_kwargs)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    return step_lib.compile_step(fn, (abstract_like(abstract_state, shardings), batch),
                                 (shardings, batch_shardings), (shardings, sharding.replicated(mesh)),
                                 mesh, rules, donate_argnums=(0,))


def compile_eval_step(abstract_params: Any, param_shardings: Any, batch: dict, mesh: Mesh,
                      rules: Rules, apply_fn: step_lib.ApplyFn) -> jax.stages.Compiled:
    fn = functools.partial(step_lib.eval_step, apply_fn=apply_fn)
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    return step_lib.compile_step(fn, (abstract_like(abstract_params, param_shardings), batch),
                                 (param_shardings, batch_shardings), sharding.replicated(mesh),
                                 mesh, rules)


def blank_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """[rows, seq_len] of padding (segment 0, loss_mask 0): adds nothing to a loss."""
    return {k: np.zeros((rows, seq_len), d) for k, d in BATCH_DTYPES.items()}


def evaluate(eval_step: Callable, params: Any, batches: Iterator[dict], batch_sharding: NamedSharding,
             max_batches: int | None, blank: dict[str, np.ndarray],
             on_batch: Callable[[int], None] = lambda i: None) -> float:
    """Mean loss over every token with loss_mask > 0 in up to `max_batches` validation batches.

    Processes can hold different numbers of validation batches: every eval step is a
    collective, so all go on while any has a batch left, the others feeding `blank` rows.
    """
    loss_sum, tokens = jnp.float32(0), jnp.float32(0)
    for i in itertools.count():
        if max_batches is not None and i >= max_batches:
            break
        local = next(batches, None)
        if not distributed.any_process(local is not None):
            break
        out = eval_step(params, sharding.global_batch(blank if local is None else local, batch_sharding))
        loss_sum, tokens = loss_sum + out["loss_sum"], tokens + out["tokens"]
        on_batch(i)
    tokens = float(tokens)
    if tokens == 0:
        raise UserError("the validation split gave no tokens to evaluate; add validation data or "
                        "set train.eval_every=0")
    return float(loss_sum) / tokens


class StepReporter:
    """Times steps and writes their metrics; raises NonFiniteLossError under nan_policy "stop"."""

    def __init__(self, writer: MetricsWriter | None, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, nan_policy: str, log_every: int, ckpt: Checkpointer):
        self.writer, self.tokens_per_step = writer, tokens_per_step
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
            "tokens_seen": step * self.tokens_per_step})

    def _last_checkpoint(self) -> str:
        step = self.ckpt.latest_step()
        if step is None:
            return "No checkpoint has been saved yet."
        return f"The last checkpoint is step {step} in {self.ckpt.directory}."


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


def check_batch_divisible(batch_size: int, accum_steps: int, batch_sharding: NamedSharding) -> None:
    """Each microbatch must split evenly over the devices that share the batch."""
    spec = batch_sharding.spec[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
    if accum_steps < 1 or batch_size % accum_steps or (batch_size // accum_steps) % shards:
        raise UserError(f"train.batch_size={batch_size} with gradient_accumulation_steps={accum_steps} "
                        f"gives microbatches of {batch_size / max(accum_steps, 1):g} rows, which must be a "
                        f"whole multiple of the {shards} devices the batch is split over ({axes}); "
                        "change the batch size, the accumulation steps or the mesh")


def describe_restore(ckpt: Checkpointer, init_from: str | None = None) -> str:
    """How the run starts, for its first log line: resuming, loading `init_from`, or from scratch."""
    latest = ckpt.latest_step()
    if latest is not None:
        return f"resuming from the newest checkpoint that verifies (latest: step {latest})"
    if init_from:
        return f"starting from the weights of {init_from} (fresh optimizer state)"
    return "starting from scratch (random weights)"
