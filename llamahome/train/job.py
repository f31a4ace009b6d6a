"""The `train` job: `python -m llamahome.launch --gin_file=gin/train/tiny_cpu.gin`.

Its body reads top to bottom: mesh, data, model, optimizer, state shardings, checkpoints;
restore the run dir's latest checkpoint (auto-resume) or start fresh / from `init_from`;
compile the steps once; loop with periodic eval and checkpoints; save at the end. SIGTERM or
SIGINT mid-run saves a checkpoint and returns normally (exit status 0, status "preempted");
running the same command again continues from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import logging

from llamahome.cache import CacheManager
from llamahome.cli import OPERATIVE_CONFIG_FILE, save_config
from llamahome.errors import ConfigError
from llamahome.jobs import job
from llamahome.data.pipeline import make_data_iterator
from llamahome.model.config import LlamaConfig
from llamahome.model.llama import Llama, init_params, param_logical_axes, param_shapes
from llamahome.monitor.mfu import peak_flops
from llamahome.monitor.profile import Profiler
from llamahome.monitor.status import Heartbeat
from llamahome.monitor.writers import MetricsWriter
from llamahome.parallel import distributed, sharding
from llamahome.parallel.mesh import build_mesh
from llamahome.parallel.rules import axis_rules
from llamahome.train import loop
from llamahome.train.checkpoint import CheckpointConfig, Checkpointer
from llamahome.train.optim import build_optimizer, decay_mask

NAN_POLICIES = ("stop", "skip")


@job
def train(run_dir: str, *, steps: int = 1000, batch_size: int = 8, seq_len: int = 256,
          learning_rate: float = 3e-4, gradient_accumulation_steps: int = 1, seed: int = 0,
          eval_every: int = 500, eval_batches: int | None = 20, log_every: int = 1,
          z_loss: float = 0.0, init_from: str | None = None, nan_policy: str = "stop",
          progress_bar: bool = True) -> dict[str, float]:
    """Trains LlamaConfig() on make_data_iterator("train") for `steps` optimizer steps."""
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"train.nan_policy={nan_policy!r}; use one of {NAN_POLICIES}")
    run_dir, is_writer = Path(run_dir), distributed.is_coordinator()

    mesh, rules = build_mesh(), axis_rules()
    batch_sharding = sharding.batch_sharding(mesh, rules)
    loop.check_batch_divisible(batch_size, gradient_accumulation_steps, batch_sharding)

    cache_manager = CacheManager()
    train_iter = make_data_iterator("train", global_batch_size=batch_size, seq_len=seq_len, seed=seed,
                                    cache_manager=cache_manager)

    config = LlamaConfig()
    model = Llama(config)
    apply_fn = lambda params, inputs, positions, segment_ids: model.apply(  # noqa: E731
        {"params": params}, inputs, positions, segment_ids)
    param_specs = param_logical_axes(config)

    optimizer, schedule = build_optimizer(learning_rate, steps, decay_mask=decay_mask(param_specs))
    abstract_state, shardings = loop.state_shardings(param_shapes(config), param_specs, optimizer,
                                                     mesh, rules)

    ckpt_config = CheckpointConfig()
    ckpt = Checkpointer(run_dir / "checkpoints", ckpt_config)
    logging.info("%s: %s, %d params, mesh %s", run_dir, loop.describe_restore(ckpt),
                 config.num_params(), dict(mesh.shape))
    state = loop.restore_or_init(ckpt, abstract_state, shardings, train_iter,
                                 init_params=lambda key: init_params(config, key),
                                 optimizer=optimizer, seed=seed, init_from=init_from,
                                 load_params=lambda path, s: _load_params(path, config, s))

    batch = loop.abstract_batch(batch_size, seq_len, batch_sharding)
    train_step = loop.compile_train_step(abstract_state, shardings, batch, mesh, rules,
                                         apply_fn=apply_fn, optimizer=optimizer, schedule=schedule,
                                         z_loss=z_loss, accum_steps=gradient_accumulation_steps)
    eval_step = loop.compile_eval_step(abstract_state.params, shardings.params, batch, mesh, rules,
                                       apply_fn)
    if is_writer:
        save_config(run_dir, OPERATIVE_CONFIG_FILE, _operative_config())

    start = int(state.step)
    writer = MetricsWriter(run_dir, steps, start, progress_bar) if is_writer else None
    heartbeat = Heartbeat(run_dir, steps, config.name) if is_writer else None
    reporter = loop.StepReporter(writer, batch_size * seq_len, config.flops_per_token(seq_len),
                                 peak_flops(str(config.dtype)), nan_policy, log_every, ckpt)
    profiler = Profiler(run_dir / "profile")
    eval_loss, pending, saved_step = None, None, start
    try:
        with loop.PreemptionSignal() as preempted:
            for step in range(start + 1, steps + 1):
                if preempted.received:
                    break
                profiler.before_step(step)
                batch = sharding.global_batch(next(train_iter), batch_sharding)
                state, metrics = train_step(state, batch)
                profiler.after_step(step, metrics)
                if pending:
                    reporter.report(*pending)  # the previous step: the host never waits on this one
                pending = (step, metrics)
                eval_loss = None
                if eval_every and step % eval_every == 0:
                    eval_loss = loop.evaluate(eval_step, state.params, _validation(batch_size, seq_len, seed),
                                              batch_sharding, eval_batches)
                    if writer:
                        writer.eval(step, eval_loss)
                if (step % ckpt_config.save_steps == 0 or step == steps or preempted.received
                        or (eval_loss is not None and ckpt_config.save_best)):
                    ckpt.save(step, state, train_iter, eval_loss)
                    saved_step = step
                if heartbeat:
                    heartbeat.beat(step)
            if pending:
                reporter.report(*pending)
            if preempted.received and saved_step != int(state.step):
                ckpt.save(int(state.step), state, train_iter)
    except BaseException:
        if heartbeat:
            heartbeat.beat(int(pending[0]) if pending else start, "failed", force=True)
        raise
    finally:
        profiler.close()
        ckpt.close()
        if writer:
            writer.close()
    status = "preempted" if preempted.received else "finished"
    if heartbeat:
        heartbeat.beat(int(state.step), status, force=True)
    if is_writer:
        (run_dir / "cache_stats.json").write_text(json.dumps(cache_manager.stats()))
    logging.info("%s at step %d; checkpoints in %s", status, int(state.step), ckpt.directory)
    return {"step": int(state.step), "loss": reporter.last_loss,
            "eval_loss": eval_loss if eval_loss is not None else float("nan")}


def _validation(batch_size: int, seq_len: int, seed: int):
    return make_data_iterator("validation", global_batch_size=batch_size, seq_len=seq_len, seed=seed)


def _load_params(path: str, config: LlamaConfig, shardings):
    from llamahome.model.params_io import load_params  # noqa: PLC0415

    return load_params(path, config, shardings=shardings)


def _operative_config() -> str:
    import gin  # noqa: PLC0415

    return gin.operative_config_str()

