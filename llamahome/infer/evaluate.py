"""Mean loss, perplexity and bits per byte of a model over a data split, sharded as in training.

    result = evaluate_params(params, config, batches, mesh=mesh, rules=rules, tokenizer=tok)

`batches` are the data pipeline's dicts of [batch, length] numpy arrays (inputs, targets,
positions, segment_ids, loss_mask), e.g. `make_data_iterator("validation", ...)`, which reads
the token cache. The step is training's `eval_step` compiled with training's shardings
(llamahome/train/loop.py), so a model that trains on a mesh evaluates on it.

    loss           = sum of cross-entropy (nats) over targets with loss_mask > 0 / their count
    perplexity     = exp(loss)
    bits_per_byte  = sum of cross-entropy / ln 2 / UTF-8 bytes of those targets' text

The byte count decodes each run of consecutive masked targets (BOS/EOS/padding count 0
bytes), so bits per byte compares models with different tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from llamahome.data.tokenizer import Tokenizer
from llamahome.errors import UserError
from llamahome.model.config import LlamaConfig
from llamahome.model.llama import Llama, param_logical_axes
from llamahome.monitor.writers import perplexity
from llamahome.parallel import sharding
from llamahome.parallel.rules import Rules
from llamahome.train import loop


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Totals and means over every evaluated target token."""

    loss: float
    perplexity: float
    bits_per_byte: float | None  # None without a tokenizer
    tokens: int
    bytes: int | None
    batches: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def target_bytes(tokenizer: Tokenizer, targets: np.ndarray, loss_mask: np.ndarray) -> int:
    """UTF-8 bytes of the text spelled by the targets with loss_mask > 0 (see module doc)."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    total = 0
    for row, mask in zip(targets.tolist(), (loss_mask > 0).tolist()):
        run: list[int] = []
        for token, on in zip([*row, -1], [*mask, False]):  # a sentinel closes the last run
            if on:
                if token not in special:
                    run.append(token)
            elif run:
                total += len(tokenizer.decode(run).encode("utf-8"))
                run = []
    return total


def evaluate_params(params, config: LlamaConfig, batches: Iterable[dict], *, mesh: Mesh,
                    rules: Rules, tokenizer: Tokenizer | None = None,
                    max_batches: int | None = None) -> EvalResult:
    """Evaluates `params` (laid out by the rules on `mesh`) over up to `max_batches` batches."""
    model = Llama(config)
    apply_fn = lambda p, inputs, positions, segment_ids: model.apply(  # noqa: E731
        {"params": p}, inputs, positions, segment_ids, return_hidden=True)
    param_shardings = sharding.logical_shardings(param_logical_axes(config), mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step, loss_sum, tokens, nbytes, count = None, 0.0, 0, 0, 0
    for local in batches:
        if max_batches is not None and count >= max_batches:
            break
        local = {k: np.asarray(local[k], dtype=d) for k, d in loop.BATCH_DTYPES.items()}
        if step is None:
            batch_size, seq_len = local["inputs"].shape
            loop.check_batch_divisible(batch_size * jax.process_count(), 1, batch_sharding)
            step = loop.compile_eval_step(params, param_shardings,
                                          loop.abstract_batch(batch_size * jax.process_count(),
                                                              seq_len, batch_sharding),
                                          mesh, rules, apply_fn)
        out = jax.device_get(step(params, sharding.global_batch(local, batch_sharding)))
        loss_sum += float(out["loss_sum"])
        tokens += int(out["tokens"])
        if tokenizer is not None:
            nbytes += target_bytes(tokenizer, local["targets"], local["loss_mask"])
        count += 1
    if tokens == 0:
        raise UserError("the evaluated split gave no target tokens; check the data config and "
                        "the split name (e.g. evaluate.split='validation')")
    loss = loss_sum / tokens
    bits_per_byte = None
    if tokenizer is not None and nbytes:
        # Per-process byte counts; summed over processes like the device-side token count.
        nbytes = _sum_over_processes(nbytes)
        bits_per_byte = loss_sum / math.log(2) / nbytes
    return EvalResult(loss=loss, perplexity=perplexity(loss), bits_per_byte=bits_per_byte,
                      tokens=tokens, bytes=nbytes if tokenizer is not None else None,
                      batches=count)


def _sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))
