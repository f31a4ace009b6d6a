"""TrainState: everything that changes during training, in one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: model pytree; opt_state: optax state; rng: uint32 [2] key data."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0; jit it with out_shardings to create it directly sharded."""
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))
