"""Schedules against their formulas, the weight-decay mask, and AdamW against a numpy AdamW."""

import functools
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


# Extending a run (a larger train.steps on resume) never raises the learning rate. Each case:
# the schedule, its first length, the resume step, the new length.
EXTENSIONS = [
    (optim.warmup_cosine, 600, 600, 2000),   # the quickstart, finished: stays at the end value
    (optim.warmup_cosine, 600, 300, 2000),   # mid-decay: cosine from the current value
    (optim.warmup_cosine, 600, 10, 2000),    # mid-warmup: the ramp continues as planned
    (optim.warmup_linear, 600, 400, 1000),
    (optim.warmup_stable_decay, 1000, 500, 3000),  # in the plateau: the plateau goes on
    (optim.warmup_stable_decay, 1000, 900, 3000),  # mid-decay: a plateau at the current value
    (optim.constant, 600, 600, 2000),
    (optim.warmup_cosine, 4, 4, 8),           # a warmup clipped by a tiny run
]


@pytest.mark.parametrize("schedule,first,resume,total", EXTENSIONS)
def test_an_extension_follows_the_old_plan_then_never_rises(schedule, first, resume, total):
    schedule = functools.partial(schedule, warmup_steps=40)
    old = schedule(1.0, total_steps=first)
    _, lr = optim.build_optimizer(1.0, total, schedule=schedule, horizons=[(0, first), (resume, total)])
    counts = np.arange(total + 1)
    before, after = counts[counts < resume], counts[counts >= resume]
    np.testing.assert_allclose([lr(c) for c in before], [old(c) for c in before], rtol=1e-6)
    values = np.array([float(lr(c)) for c in after])
    at_resume = float(old(resume))
    np.testing.assert_allclose(values[0], at_resume, rtol=1e-5)  # no jump at the resume step
    warming = resume < 40 and first > 40
    if not warming:
        assert values.max() <= at_resume * (1 + 1e-5)
        assert np.all(np.diff(values) <= 1e-7)  # and never rises afterwards


def test_cosine_extension_against_its_formula():
    """Resumed at 300 of 600 and extended to 1200: a cosine from lr(300) to 0.1 over 900 steps."""
    _, lr = optim.build_optimizer(1.0, 1200, schedule=optim.warmup_cosine,
                                  horizons=[(0, 600), (300, 1200)])
    warmup = 100  # warmup_cosine's default
    v = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (300 - warmup) / (600 - warmup)))
    for count in (300, 750, 1200):
        expected = 0.1 + (v - 0.1) * 0.5 * (1 + math.cos(math.pi * (count - 300) / 900))
        np.testing.assert_allclose(lr(count), expected, rtol=1e-5)


def test_wsd_extension_keeps_its_plateau_then_decays_at_the_new_end():
    _, lr = optim.build_optimizer(1.0, 3000, schedule=optim.warmup_stable_decay,
                                  horizons=[(0, 1000), (500, 3000)])
    np.testing.assert_allclose([lr(500), lr(2000), lr(2400), lr(2700), lr(3000)],
                               [1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_schedule_horizons_from_the_saved_config():
    fresh = optim.schedule_horizons(600, None, None)
    assert fresh == ((0, 600),)
    saved = "train.steps = 600\n"
    assert optim.schedule_horizons(600, 400, saved) == ((0, 600),)  # a plain resume
    extended = optim.schedule_horizons(2000, 600, saved)
    assert extended == ((0, 600), (600, 2000))
    # ... recorded in the gin config, so a checkpoint of the extended run rebuilds the same plan:
    import gin  # noqa: PLC0415

    recorded = gin.config_str()
    assert "build_optimizer.horizons" in recorded
    assert optim.schedule_horizons(2000, 800, recorded) == ((0, 600), (600, 2000))
    assert optim.schedule_horizons(3000, 800, recorded) == ((0, 600), (600, 2000), (800, 3000))
    # resumed at the extension's own step with another length: that extension is re-decided
    assert optim.schedule_horizons(1000, 600, recorded) == ((0, 600), (600, 1000))
