"""Mean loss, perplexity and bits per byte of a model over a data split, sharded as in training.

    result = evaluate_params(params, config, batches, mesh=mesh, rules=rules, tokenizer=tok)

`batches` are the data pipeline's dicts of [batch, length] numpy arrays (inputs, targets,
positions, segment_ids, loss_mask), e.g. `make_data_iterator("validation", ...)`, which reads
the token cache. The step is training's `eval_step` compiled with training's shardings
and the one eval loop of training (llamahome/train/step.py), so a model that trains on a mesh
evaluates on it, and processes holding different numbers of batches stay in step.

    loss           = sum of cross-entropy (nats) over targets with loss_mask > 0 / their count
    perplexity     = exp(loss)
    bits_per_byte  = sum of cross-entropy / ln 2 / UTF-8 bytes of those targets' text

The byte count decodes each run of consecutive masked targets (BOS/EOS/padding count 0
bytes), so bits per byte compares models with different tokenizers. A LoRA adapter
(`lora`, `adapters`; model/lora.py) is evaluated on its base unmerged, by the step a LoRA
training run evaluates with (the base a frozen argument).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from llamahome.data.tokenizer import Tokenizer
from llamahome.errors import UserError
from llamahome.model.llama import Llama, LlamaConfig, adapter_logical_axes, param_logical_axes
from llamahome.model.lora import LoraConfig
from llamahome.monitor import perplexity
from llamahome.parallel.mesh import Rules, batch_sharding, logical_shardings
from llamahome.train import step as step_lib
from llamahome.train.checkpoint import abstract_like


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
                    max_batches: int | None = None, lora: LoraConfig | None = None,
                    adapters: dict | None = None) -> EvalResult:
    """Evaluates `params` (laid out by the rules on `mesh`), with `adapters` on them if given,
    over up to `max_batches` batches."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError("the evaluated split gave no batches; check the data config and the split "
                        "name (e.g. evaluate.split='validation')")
    local_rows, seq_len = np.shape(first["inputs"])
    global_rows = local_rows * jax.process_count()
    batch_layout = batch_sharding(mesh, rules)
    step_lib.check_batch_divisible(global_rows, 1, batch_layout)
    param_shardings = logical_shardings(param_logical_axes(config), mesh, rules)
    abstract_batch = step_lib.abstract_batch(global_rows, seq_len, batch_layout)
    if lora is None:
        eval_step = step_lib.compile_eval_step(params, param_shardings, abstract_batch, mesh,
                                               rules, step_lib.hidden_apply_fn(Llama(config)))
    else:
        compiled = step_lib.compile_eval_step(
            adapters, logical_shardings(adapter_logical_axes(config, lora), mesh, rules),
            abstract_batch, mesh, rules, step_lib.lora_apply_fn(Llama(config, lora)),
            abstract_like(params, param_shardings))
        base, params = params, adapters  # the step's trained argument is the adapters

        def eval_step(adapters, batch):
            return compiled(adapters, batch, base)
    nbytes = 0

    def count_bytes(i: int, local: dict | None) -> None:
        nonlocal nbytes
        if tokenizer is not None and local is not None:
            nbytes += target_bytes(tokenizer, np.asarray(local["targets"]), np.asarray(local["loss_mask"]))

    as_arrays = ({k: np.asarray(b[k], dtype=d) for k, d in step_lib.BATCH_DTYPES.items()}
                 for b in itertools.chain([first], batches))
    loss_sum, tokens, count = step_lib.evaluate_batches(
        eval_step, params, as_arrays, batch_layout, step_lib.blank_batch(local_rows, seq_len),
        max_batches, on_batch=count_bytes)
    if tokens == 0:
        raise UserError("the evaluated split gave no target tokens; check the data config and "
                        "the split name (e.g. evaluate.split='validation')")
    loss = loss_sum / tokens
    bits_per_byte = None
    if tokenizer is not None:
        # Per-process byte counts; summed over processes like the device-side token count.
        nbytes = _sum_over_processes(nbytes)
        bits_per_byte = loss_sum / math.log(2) / nbytes if nbytes else None
    return EvalResult(loss=loss, perplexity=perplexity(loss), bits_per_byte=bits_per_byte,
                      tokens=tokens, bytes=nbytes if tokenizer is not None else None,
                      batches=count)


def _sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))
