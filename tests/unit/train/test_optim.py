"""Schedules against their formulas, the weight-decay mask, and AdamW against a numpy AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llamahome.train import optim


def test_warmup_cosine():
    s = optim.warmup_cosine(1.0, total_steps=110, warmup_steps=10, end_factor=0.1)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(s(5), 0.5)
    np.testing.assert_allclose(s(10), 1.0)
    np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-6)
    np.testing.assert_allclose(s(110), 0.1, rtol=1e-6)


def test_warmup_linear_and_constant():
    s = optim.warmup_linear(2.0, total_steps=20, warmup_steps=10, end_factor=0.0)
    np.testing.assert_allclose([s(5), s(10), s(15), s(20)], [1.0, 2.0, 1.0, 0.0], atol=1e-6)
    c = optim.constant(3.0, total_steps=20, warmup_steps=4)
    np.testing.assert_allclose([c(2), c(4), c(19)], [1.5, 3.0, 3.0], atol=1e-6)


def test_warmup_stable_decay():
    s = optim.warmup_stable_decay(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2)
    np.testing.assert_allclose([s(5), s(10), s(50), s(80), s(90), s(100)],
                               [0.5, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_decay_mask_from_logical_names():
    specs = {"wq": P("embed", "heads", "head_dim"), "norm": P("norm"), "bias": P("mlp"),
             "scanned_norm": P("layers", "norm"), "scanned_w": P("layers", "embed", "mlp")}
    assert optim.decay_mask(specs) == {"wq": True, "norm": False, "bias": False,
                                       "scanned_norm": False, "scanned_w": True}


def numpy_adamw(p, grads, lr, b1, b2, eps, wd, decay):
    m = v = 0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        p = p - lr * (update + (wd * p if decay else 0))
    return p


def test_adamw_with_mask_and_clipping_matches_numpy():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    tx, _ = optim.build_optimizer(0.1, total_steps=10, optimizer=optim.adamw,
                                  schedule=optim.constant, clip_norm=None)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads = [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))} for _ in range(3)]
    p = params
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    for name, decay in (("w", True), ("b", False)):
        ref = numpy_adamw(np.ones(params[name].shape), [g[name] for g in grads], 0.1, 0.9, 0.95, 1e-8, 0.1, decay)
        np.testing.assert_allclose(p[name], ref, rtol=1e-5)


def test_clipping_bounds_the_update():
    tx, _ = optim.build_optimizer(1.0, total_steps=10, optimizer=optim.sgd, schedule=optim.constant,
                                  clip_norm=0.5)
    params = {"w": jnp.zeros((4,))}
    updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.global_norm(updates), 0.5, rtol=1e-6)


@pytest.mark.parametrize("opt", [optim.adamw, optim.lion, optim.adafactor, optim.sgd])
def test_every_optimizer_descends_a_quadratic(opt):
    params = {"w": jnp.full((4, 4), 3.0)}
    tx, _ = optim.build_optimizer(0.05, total_steps=50, optimizer=opt, schedule=optim.constant)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    for _ in range(50):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(params) < 0.5 * 16 * 9
