"""train_step / eval_step on a hand-made bigram model, against numpy re-derivations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llamahome.train import step as step_lib
from llamahome.train.step import init_train_state

V, D, B, T = 11, 6, 8, 5


def apply_fn(params, inputs, positions, segment_ids):
    """(hidden [B, T, D], head [D, V]) of a bigram model: what a Llama returns with return_hidden."""
    del positions, segment_ids
    return params["embed"][inputs], params["out"]


def make_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"embed": jax.random.normal(k1, (V, D)), "out": jax.random.normal(k2, (D, V))}


def make_batch(seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32)}


def numpy_loss(params, batch, z_loss=0.0):
    logits = np.asarray(params["embed"], np.float64)[batch["inputs"]] @ np.asarray(params["out"], np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    ce = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    return (ce * m).sum() / m.sum(), ((ce + z_loss * log_z**2) * m).sum() / m.sum()


def test_cross_entropy_matches_numpy():
    params, batch = make_params(), make_batch()
    hidden, head = apply_fn(params, batch["inputs"], None, None)
    ce, z, count = step_lib.cross_entropy_sums(hidden @ head, batch["targets"], batch["loss_mask"])
    ref, _ = numpy_loss(params, batch)
    assert count == batch["loss_mask"].sum()
    np.testing.assert_allclose(ce / count, ref, rtol=1e-5)


def sgd_step(z_loss=0.0, accum=1):
    tx = optax.sgd(0.1)
    fn = functools.partial(step_lib.train_step, apply_fn=apply_fn, optimizer=tx,
                           schedule=optax.constant_schedule(0.1), z_loss=z_loss, accum_steps=accum)
    return jax.jit(fn), tx


def test_sgd_update_equals_numerical_gradient_of_masked_mean():
    params, batch = make_params(), make_batch()
    step, tx = sgd_step(z_loss=1e-2)
    state, metrics = step(init_train_state(params, tx, 0), batch)
    ce_ref, total_ref = numpy_loss(params, batch, z_loss=1e-2)
    np.testing.assert_allclose(metrics["loss"], ce_ref, rtol=1e-5)
    # central differences of the numpy loss for a few coordinates of `out`
    eps = 1e-4
    for i, j in [(0, 0), (3, 7), (5, 10)]:
        plus = {k: np.array(v, np.float64) for k, v in params.items()}
        minus = {k: np.array(v, np.float64) for k, v in params.items()}
        plus["out"][i, j] += eps
        minus["out"][i, j] -= eps
        grad = (numpy_loss(plus, batch, 1e-2)[1] - numpy_loss(minus, batch, 1e-2)[1]) / (2 * eps)
        np.testing.assert_allclose(float(state.params["out"][i, j]),
                                   float(params["out"][i, j]) - 0.1 * grad, rtol=1e-4, atol=1e-6)
    assert int(state.step) == 1


def test_gradient_accumulation_equals_full_batch():
    params, batch = make_params(), make_batch()
    (full, m_full), (acc, m_acc) = [sgd_step(accum=a)[0](init_train_state(params, optax.sgd(0.1), 0), batch)
                                    for a in (1, 4)]
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_finite_step_leaves_state_unchanged():
    params = make_params()
    params["out"] = params["out"].at[0, 0].set(jnp.inf)
    step, tx = sgd_step()
    state, metrics = step(init_train_state(params, tx, 0), make_batch())
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_eval_step_sums():
    params, batch = make_params(), make_batch()
    out = jax.jit(functools.partial(step_lib.eval_step, apply_fn=apply_fn))(params, batch)
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], numpy_loss(params, batch)[0], rtol=1e-5)
