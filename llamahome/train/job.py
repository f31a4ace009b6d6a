"""The `train` job: `python -m llamahome.launch --gin_file=gin/train/tiny_cpu.gin`.

Its body reads top to bottom: mesh, data, model, optimizer, state shardings, checkpoints;
restore the run dir's latest checkpoint (auto-resume) or start fresh / from `init_from`;
compile the steps once; loop with periodic eval and checkpoints; save at the end. SIGTERM or
SIGINT mid-run saves a checkpoint and returns normally (exit status 0, status "preempted");
running the same command again continues from it.

Multi-process (one process per host, llamahome/parallel/distributed.py): every process runs
this same function. Each reads its data shards (llamahome/parallel/data_shards.py), takes part
in every step, eval and checkpoint save, and agrees with the others after each step on
whether a signal asked any of them to stop; only process 0 writes metrics, status and the
operative config. A `Watchdog` ends a process whose peers stopped answering.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import logging

from llamahome.cache import CacheManager
from llamahome.cli import OPERATIVE_CONFIG_FILE, save_config
from llamahome.errors import ConfigError
from llamahome.hub.registry import resolve_model_path
from llamahome.jobs import job
from llamahome.data.pipeline import make_data_iterator
from llamahome.data.tokenizer import load_tokenizer
from llamahome.model.config import LlamaConfig
from llamahome.model.llama import Llama, init_params, param_logical_axes, param_shapes
from llamahome.monitor.mfu import peak_flops
from llamahome.monitor.profile import Profiler
from llamahome.monitor.status import Heartbeat
from llamahome.monitor.writers import MetricsWriter
from llamahome.parallel import distributed, sharding
from llamahome.parallel.data_shards import open_shards
from llamahome.parallel.mesh import build_mesh
from llamahome.parallel.rules import axis_rules
from llamahome.parallel.watchdog import Watchdog
from llamahome.train import loop
from llamahome.train.checkpoint import CheckpointConfig, Checkpointer
from llamahome.train.optim import build_optimizer, decay_mask, schedule_horizons
from llamahome.train.run_tokenizer import checkpoint_vocab, fit_vocab, save_run_tokenizer

NAN_POLICIES = ("stop", "skip")


@job
def train(run_dir: str, *, steps: int = 1000, batch_size: int = 8, seq_len: int = 256,
          learning_rate: float = 3e-4, gradient_accumulation_steps: int = 1, seed: int = 0,
          eval_every: int = 500, eval_batches: int | None = 20, log_every: int = 1,
          z_loss: float = 0.0, init_from: str | None = None, nan_policy: str = "stop",
          progress_bar: bool = True, data_shards: int | None = None,
          loss_chunk_length: int = 0, resume_with_changed_config: bool = False) -> dict:
    """Trains LlamaConfig() on make_data_iterator("train") for `steps` optimizer steps.

    `data_shards`: how many readers split the data (default: the process count); keep it
    fixed to get the same batches, and resume the same checkpoints, on any number of hosts.
    `loss_chunk_length`: positions per block of the output head + loss (0: the whole
    sequence); a divisor of `seq_len` bounds the live logits to [batch, block, vocab]
    (llamahome/train/loss.py).
    `resume_with_changed_config`: resume a checkpoint whose gin config differs from this one in
    more than run-length settings (llamahome/train/checkpoint.py RESUMABLE_CHANGES).
    """
    if loss_chunk_length and seq_len % loss_chunk_length:
        raise ConfigError(f"train.loss_chunk_length={loss_chunk_length} does not divide "
                          f"train.seq_len={seq_len}; use a divisor of it, or 0 for no blocks")
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"train.nan_policy={nan_policy!r}; use one of {NAN_POLICIES}")
    run_dir, is_writer = Path(run_dir), distributed.is_coordinator()

    mesh, rules = build_mesh(), axis_rules()
    batch_sharding = sharding.batch_sharding(mesh, rules)
    loop.check_batch_divisible(batch_size, gradient_accumulation_steps, batch_sharding)

    cache_manager = CacheManager()
    open_split = lambda split: open_shards(  # noqa: E731
        make_data_iterator, split, global_batch_size=batch_size, num_shards=data_shards,
        seq_len=seq_len, seed=seed, cache_manager=cache_manager)
    train_iter = open_split("train")

    ckpt_config = CheckpointConfig()
    ckpt = Checkpointer(run_dir / "checkpoints", ckpt_config)
    resume_step = loop.newest_trusted_step(ckpt)  # the vocab and schedule come from that step
    saved_config = _saved_config(ckpt, resume_step)

    tokenizer = load_tokenizer()
    config = fit_vocab(LlamaConfig(), tokenizer.vocab_size, checkpoint_vocab(saved_config))
    if is_writer:
        save_run_tokenizer(run_dir, tokenizer)  # the run dir alone is enough to evaluate it
    model = Llama(config)
    apply_fn = lambda params, inputs, positions, segment_ids: model.apply(  # noqa: E731
        {"params": params}, inputs, positions, segment_ids, return_hidden=True)
    param_specs = param_logical_axes(config)

    optimizer, schedule = build_optimizer(learning_rate, steps, decay_mask=decay_mask(param_specs),
                                          horizons=schedule_horizons(steps, resume_step, saved_config))
    abstract_state, shardings = loop.state_shardings(param_shapes(config), param_specs, optimizer,
                                                     mesh, rules)

    logging.info("%s: %s, %d params, mesh %s", run_dir, loop.describe_restore(ckpt, init_from),
                 config.num_params(), dict(mesh.shape))
    state = loop.restore_or_init(ckpt, abstract_state, shardings, train_iter,
                                 init_params=lambda key: init_params(config, key),
                                 optimizer=optimizer, seed=seed,
                                 init_from=init_from and resolve_model_path(init_from, str(run_dir)),
                                 load_params=lambda path, s: _load_params(path, config, s),
                                 resume_with_changed_config=resume_with_changed_config)

    batch = loop.abstract_batch(batch_size, seq_len, batch_sharding)
    train_step = loop.compile_train_step(abstract_state, shardings, batch, mesh, rules,
                                         apply_fn=apply_fn, optimizer=optimizer, schedule=schedule,
                                         z_loss=z_loss, accum_steps=gradient_accumulation_steps,
                                         loss_chunk_length=loss_chunk_length)
    eval_step = loop.compile_eval_step(abstract_state.params, shardings.params, batch, mesh, rules,
                                       apply_fn)
    if is_writer:
        save_config(run_dir, OPERATIVE_CONFIG_FILE, _operative_config())

    start = int(state.step)
    peak = peak_flops(str(config.dtype))
    writer = MetricsWriter(run_dir, steps, start, progress_bar, str(peak)) if is_writer else None
    heartbeat = Heartbeat(run_dir, steps, config.name) if is_writer else None
    reporter = loop.StepReporter(writer, batch_size * seq_len, config.flops_per_token(seq_len),
                                 peak.flops, nan_policy, log_every, ckpt)
    profiler = Profiler(_profile_dir(run_dir))
    watchdog = Watchdog(f"process {jax.process_index()} of {jax.process_count()}")
    if jax.process_count() > 1:
        watchdog.start()  # stays on through the cleanup after an error: that may block on peers too
    blank = loop.blank_batch(batch_size // jax.process_count(), seq_len)
    eval_loss, pending, stopped = None, None, False
    try:
        with loop.PreemptionSignal() as preempted:
            for step in range(start + 1, steps + 1):
                profiler.before_step(step)
                batch = sharding.global_batch(next(train_iter), batch_sharding)
                state, metrics = train_step(state, batch)
                ckpt.poll()  # seals the last save, or stops here if it failed in the background
                profiler.after_step(step, metrics)
                if pending:
                    reporter.report(*pending)  # the previous step: the host never waits on this one
                pending = (step, metrics)
                stopped = distributed.any_process(preempted.received is not None)
                eval_loss = None
                if eval_every and step % eval_every == 0:
                    eval_loss = loop.evaluate(eval_step, state.params, open_split("validation"),
                                              batch_sharding, eval_batches, blank,
                                              on_batch=lambda i: watchdog.kick(f"eval batch {i}"))
                    if writer:
                        writer.eval(step, eval_loss)
                if (step % ckpt_config.save_steps == 0 or step == steps or stopped
                        or (eval_loss is not None and ckpt_config.save_best)):
                    ckpt.save(step, state, train_iter, eval_loss)
                if heartbeat:
                    heartbeat.beat(step)
                watchdog.kick(f"step {step}")
                if stopped:
                    break
            if pending:
                reporter.report(*pending)
    except BaseException:
        if heartbeat:
            heartbeat.beat(int(pending[0]) if pending else start, "failed", force=True)
        raise
    finally:
        profiler.close()
        ckpt.close()
        if writer:
            writer.close()
    watchdog.stop()
    status = "preempted" if stopped else "finished"
    if heartbeat:
        heartbeat.beat(int(state.step), status, force=True)
    if is_writer:
        (run_dir / "cache_stats.json").write_text(json.dumps(cache_manager.stats()))
    logging.info("%s at step %d; checkpoints in %s", status, int(state.step), ckpt.directory)
    return {"step": int(state.step), "status": status, "loss": reporter.last_loss,
            "eval_loss": eval_loss if eval_loss is not None else float("nan")}


def _saved_config(ckpt: Checkpointer, step: int | None) -> str | None:
    """The gin config saved with `step`, or None (no step, or unreadable: the restore says why)."""
    if step is None:
        return None
    try:
        return ckpt.saved_config(step)
    except Exception as e:  # noqa: BLE001  (a corrupt step is the restore's to report)
        logging.warning("could not read the config saved with step %d: %s", step, e)
        return None


def _profile_dir(run_dir: Path) -> Path:
    """Process 0 traces into profile/, the others into profile/process_<i>/."""
    profile = run_dir / "profile"
    return profile if distributed.is_coordinator() else profile / f"process_{jax.process_index()}"


def _load_params(path: str, config: LlamaConfig, shardings):
    from llamahome.infer.checkpoints import load_params_for  # noqa: PLC0415

    return load_params_for(path, config, shardings)


def _operative_config() -> str:
    import gin  # noqa: PLC0415

    return gin.operative_config_str()

