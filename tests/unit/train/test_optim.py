"""Schedules against their formulas, the weight-decay mask, and AdamW against a numpy AdamW."""

import functools
import math

import gin
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
    recorded = gin.config_str()
    assert "build_optimizer.horizons" in recorded
    assert optim.schedule_horizons(2000, 800, recorded) == ((0, 600), (600, 2000))
    assert optim.schedule_horizons(3000, 800, recorded) == ((0, 600), (600, 2000), (800, 3000))
    # resumed at the extension's own step with another length: that extension is re-decided
    assert optim.schedule_horizons(1000, 600, recorded) == ((0, 600), (600, 1000))


# One or two steps of Lion, SGD and Adafactor as build_optimizer builds them (their gin defaults
# or gin bindings), against the papers' algorithms in numpy (float64). Parameters: a factorable
# matrix (both sides >= optax's 128), a small matrix (not factored) and a bias (never decayed).
SHAPES = {"w": (128, 160), "small": (3, 4), "b": (160,)}


def _params_and_grads(steps=2, scale=1.0):
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = [{k: scale * rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def _run(tx, params, grads):
    """Params (numpy float64) after `tx`'s steps on float32 copies."""
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = optax.apply_updates(p, updates)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), p)


def _clip(g, max_norm):
    """Clipping by global norm (Pascanu et al. 2013) over the whole tree."""
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    return {k: x * min(1.0, max_norm / norm) for k, x in g.items()}


def numpy_lion(params, grads, lr, b1, b2, wd, clip):
    """Lion (Chen et al. 2023, Algorithm 2), weight decay on matrices only."""
    p, m = dict(params), {k: np.zeros_like(v) for k, v in params.items()}
    for g in grads:
        g = _clip(g, clip)
        for k in p:
            c = b1 * m[k] + (1 - b1) * g[k]
            p[k] = p[k] - lr * (np.sign(c) + (wd * p[k] if p[k].ndim >= 2 else 0))
            m[k] = b2 * m[k] + (1 - b2) * g[k]
    return p


def numpy_sgd(params, grads, lr, momentum, nesterov, wd, clip):
    """torch.optim.SGD's documented algorithm (dampening 0), weight decay on matrices only."""
    p, buf = dict(params), {k: np.zeros_like(v) for k, v in params.items()}
    for g in grads:
        g = _clip(g, clip)
        for k in p:
            d = g[k] + (wd * p[k] if p[k].ndim >= 2 else 0)
            buf[k] = momentum * buf[k] + d
            p[k] = p[k] - lr * (d + momentum * buf[k] if nesterov else buf[k])
    return p


def numpy_adafactor(params, grads, lr, decay_rate, clipping_threshold, wd, clip):
    """Adafactor (Shazeer & Stern 2018, Algorithms 4 and 5) without momentum or relative step:
    beta2_t = 1 - t^-decay_rate; a matrix with both sides >= 128 keeps row and column sums R, C of
    G^2 + 1e-30 and divides G by sqrt(R C^T / sum(R)); others keep the full V; each update is
    clipped to RMS <= clipping_threshold; weight decay (optax's: not scaled by lr) on matrices."""
    p = dict(params)
    r = {k: 0.0 for k in p}
    c = {k: 0.0 for k in p}
    v = {k: 0.0 for k in p}
    for t, g in enumerate(grads, start=1):
        g = _clip(g, clip)
        beta = 1.0 - t ** -decay_rate
        for k in p:
            g2 = g[k] ** 2 + 1e-30
            if g[k].ndim == 2 and min(g[k].shape) >= 128:
                r[k] = beta * r[k] + (1 - beta) * g2.sum(axis=1)  # [rows]
                c[k] = beta * c[k] + (1 - beta) * g2.sum(axis=0)  # [columns]
                u = g[k] / np.sqrt(np.outer(r[k], c[k]) / r[k].sum())
            else:
                v[k] = beta * v[k] + (1 - beta) * g2
                u = g[k] / np.sqrt(v[k])
            u = u / max(1.0, math.sqrt(np.mean(u * u)) / clipping_threshold)
            p[k] = p[k] - lr * u - (wd * p[k] if p[k].ndim >= 2 else 0)
    return p


def _assert_params_close(got, expected):
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("scale", [0.01, 10.0])  # global clipping off, then on
def test_lion_defaults_match_numpy_lion(scale):
    params, grads = _params_and_grads(scale=scale)
    tx, _ = optim.build_optimizer(0.01, total_steps=10, optimizer=optim.lion,
                                  schedule=optim.constant)
    expected = numpy_lion(params, grads, 0.01, b1=0.9, b2=0.99, wd=0.1, clip=1.0)
    _assert_params_close(_run(tx, params, grads), expected)


@pytest.mark.parametrize("bindings,settings", [
    ([], dict(momentum=0.9, nesterov=False, wd=0.0)),  # the defaults
    (["sgd.nesterov = True", "sgd.momentum = 0.8", "sgd.weight_decay = 0.05"],
     dict(momentum=0.8, nesterov=True, wd=0.05)),
])
def test_sgd_from_gin_matches_torch_sgd_algorithm(bindings, settings):
    gin.parse_config(["build_optimizer.optimizer = @sgd",
                      "build_optimizer.schedule = @optim.constant",
                      "build_optimizer.clip_norm = None", *bindings])
    params, grads = _params_and_grads(steps=3)
    tx, _ = optim.build_optimizer(0.1, total_steps=10)
    expected = numpy_sgd(params, grads, 0.1, clip=math.inf, **settings)
    _assert_params_close(_run(tx, params, grads), expected)


@pytest.mark.parametrize("bindings,settings", [
    ([], dict(decay_rate=0.8, clipping_threshold=1.0, wd=0.0)),  # the defaults
    (["adafactor.decay_rate = 0.5", "adafactor.clipping_threshold = 0.3",
      "adafactor.weight_decay = 0.01"], dict(decay_rate=0.5, clipping_threshold=0.3, wd=0.01)),
])
def test_adafactor_from_gin_matches_numpy_adafactor(bindings, settings):
    gin.parse_config(["build_optimizer.optimizer = @adafactor",
                      "build_optimizer.schedule = @optim.constant", *bindings])
    params, grads = _params_and_grads(steps=2, scale=0.05)
    tx, _ = optim.build_optimizer(0.02, total_steps=10)
    expected = numpy_adafactor(params, grads, 0.02, clip=1.0, **settings)
    _assert_params_close(_run(tx, params, grads), expected)
