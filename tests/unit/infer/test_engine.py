"""The continuous-batching engine: batch independence, buckets, cancel, queue, stops, seeds, mesh."""

from __future__ import annotations

import functools
import threading
import time
import unittest.mock

import flax.linen as nn
import jax
import numpy as np
import pytest

from llamahome.errors import UserError
from llamahome.infer import engine as engine_lib
from llamahome.infer.engine import Engine, QueueFull
from llamahome.infer.generate import generate
from llamahome.model import lora as lora_lib
from llamahome.model.llama import Llama, LlamaConfig, init_params, param_logical_axes
from llamahome.parallel.mesh import FSDP_TENSOR, build_mesh, logical_shardings

CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_seq_len=128)
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    # Weights 10x the init scale, so the logits are far from uniform and greedy ids vary.
    params = init_params(CONFIG, jax.random.key(0))
    return jax.tree.map(lambda w: w * 10 if w.ndim > 1 else w, params)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(1, CONFIG.vocab_size, n).tolist() for n in range(3, 51, 3)]  # 16


@pytest.fixture(scope="module")
def engine(params):
    with Engine(CONFIG, params, max_batch=8, max_seq_len=MAX_LEN) as engine:
        yield engine


def run_alone(engine: Engine, prompt, max_tokens, **kwargs) -> list[int]:
    return engine.submit(prompt, max_tokens, **kwargs).tokens()


def run_together(engine: Engine, requests: list[tuple[list[int], int, dict]]) -> list[list[int]]:
    """Submits every request from its own thread at once; each one's generated ids."""
    out: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def client(i):
        prompt, max_tokens, kwargs = requests[i]
        barrier.wait()
        out[i] = run_alone(engine, prompt, max_tokens, **kwargs)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def new_tokens(prompt) -> int:
    return 4 + len(prompt) % 7  # 4..10: requests finish at different steps, slots are refilled


def test_greedy_output_does_not_depend_on_the_batch(engine, params, prompts):
    alone = [run_alone(engine, p, new_tokens(p)) for p in prompts]
    together = run_together(engine, [(p, new_tokens(p), {}) for p in prompts])  # 16 > 8 slots
    assert together == alone
    assert len({tuple(t) for t in alone}) > 8  # the outputs differ from prompt to prompt
    batch = generate(params, CONFIG, prompts, max_new_tokens=10)  # one 16-slot core
    assert [t[:new_tokens(p)] for t, p in zip(batch.tokens, prompts)] == alone


def test_a_greedy_row_ignores_its_neighbours_sampling_settings(engine, prompts):
    greedy = run_alone(engine, prompts[5], 10)
    others = [(prompts[i], 10, dict(temperature=1.0, top_p=0.8, top_k=20, min_p=0.05,
                                    repetition_penalty=1.3, seed=i, logprobs=True))
              for i in range(6)]
    assert run_together(engine, [(prompts[5], 10, {})] + others)[0] == greedy


def test_seeded_sampling_is_reproducible_whatever_the_company(engine, prompts):
    kwargs = dict(temperature=1.0, top_p=0.9, seed=7)
    alone = run_alone(engine, prompts[2], 12, **kwargs)
    assert run_alone(engine, prompts[2], 12, **{**kwargs, "seed": 8}) != alone
    company = [(p, 12, dict(temperature=0.7, top_k=5, seed=i)) for i, p in enumerate(prompts[:7])]
    assert run_together(engine, [(prompts[2], 12, kwargs)] + company)[0] == alone


def test_stop_ids_max_tokens_and_finish_reasons(engine, prompts):
    free = run_alone(engine, prompts[4], 12)
    stop = free[5]
    events = list(engine.submit(prompts[4], 12, stop_ids=[stop]))
    cut = free.index(stop) + 1
    assert [e.token_id for e in events] == free[:cut]
    assert [e.finish_reason for e in events] == [None] * (cut - 1) + ["stop"]
    events = list(engine.submit(prompts[4], 3))
    assert [e.token_id for e in events] == free[:3] and events[-1].finish_reason == "length"


def test_logprobs_equal_full_recomputation(engine, params, prompts):
    prompt = prompts[6]
    events = list(engine.submit(prompt, 8, temperature=1.0, seed=3, logprobs=True))
    ids = [e.token_id for e in events]
    logits = Llama(CONFIG).apply({"params": params}, np.array([prompt + ids]))
    logprobs = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32)))
    expected = [logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(ids)]
    np.testing.assert_allclose([e.logprob for e in events], expected, atol=1e-4)


def test_bad_requests_are_refused(engine):
    with pytest.raises(UserError, match="max_seq_len"):
        engine.submit([1] * 60, 10)
    with pytest.raises(UserError, match="empty"):
        engine.submit([], 4)
    with pytest.raises(UserError, match="token ids"):
        engine.submit([CONFIG.vocab_size], 4)
    with pytest.raises(UserError, match="max_tokens"):
        engine.submit([1, 2], 0)


@pytest.fixture(scope="module")
def small_engine(params):
    with Engine(CONFIG, params, max_batch=2, max_seq_len=MAX_LEN, max_queue=2) as engine:
        yield engine


def test_a_new_prompt_length_in_a_bucket_does_not_recompile(small_engine):
    # The first test on small_engine: its slot shapes have no compiled prefill yet.
    rng = np.random.default_rng(1)
    run_alone(small_engine, rng.integers(1, 100, 17).tolist(), 2)  # bucket 32
    prefills, decodes = engine_lib._prefill._cache_size(), engine_lib._decode._cache_size()
    for length in (20, 29, 32):
        run_alone(small_engine, rng.integers(1, 100, length).tolist(), 2)
    assert engine_lib._prefill._cache_size() == prefills
    run_alone(small_engine, rng.integers(1, 100, 33).tolist(), 2)  # bucket 64: one more prefill
    assert engine_lib._prefill._cache_size() == prefills + 1
    assert engine_lib._decode._cache_size() == decodes
    assert [engine_lib.prefill_bucket(n, MAX_LEN) for n in (1, 16, 17, 33, 60)] == \
        [16, 16, 32, 64, 64]


def test_waiting_prompts_of_a_bucket_prefill_in_one_call(params, prompts):
    core = engine_lib.EngineCore(CONFIG, params, max_batch=4, max_seq_len=MAX_LEN)
    requests = [engine_lib.Request(tuple(p), 6) for p in prompts[6:9]]  # 21-27 tokens: bucket 32
    with unittest.mock.patch.object(core, "_prefill", wraps=core._prefill) as prefill:
        first = core.admit_many(requests)
        calls = prefill.call_count
    assert calls == 1 and [slot for slot, _ in first] == [0, 1, 2]
    tokens = {slot: [event.token_id] for slot, event in first}
    while core.active_slots():
        for slot, event in core.step():
            tokens[slot].append(event.token_id)
    assert [tokens[slot] for slot in range(3)] == [
        run_alone_core(params, r) for r in requests]


def run_alone_core(params, request) -> list[int]:
    return generate(params, CONFIG, [list(request.prompt)],
                    max_new_tokens=request.max_tokens).tokens[0]


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_decode_step_reads_the_cache_in_place():
    """The compiled step needs less scratch memory than one layer's keys: it copies no cache
    layer into attention's layout (the [B, S, kv, h] cache took 290 KiB here, 2.3 layers) and
    updates the donated cache in place."""
    config = CONFIG.replace(max_seq_len=256)
    core = engine_lib.EngineCore(config, init_params(config, jax.random.key(1)), max_batch=8,
                                 max_seq_len=256)
    step = engine_lib._decode.lower(core.params, core.adapters, core.slots, np.ones(8, bool),
                                    model=core.model, outputs=engine_lib._Outputs((), False))
    scratch = step.compile().memory_analysis().temp_size_in_bytes
    assert scratch < core.slots.cache.k[0].nbytes  # 8 rows x 2 heads x 8 x 256 slots x 4 B


def test_weights_are_laid_out_for_the_engine_once(params):
    """engine_params makes the engine's copy ([out, in] projections) once: an engine, or a
    Generator's every generate call, given that copy uses it as it is."""
    laid = engine_lib.engine_params(params)
    assert laid is not params and engine_lib.engine_params(laid) is laid
    assert engine_lib.EngineCore(CONFIG, laid, max_batch=1, max_seq_len=MAX_LEN).params is laid
    assert generate(laid, CONFIG, [[1, 2, 3]], max_new_tokens=4).tokens == generate(
        params, CONFIG, [[1, 2, 3]], max_new_tokens=4).tokens


def test_cancel_frees_the_slot_within_one_step(small_engine, prompts):
    handle = small_engine.submit(prompts[0], 60)
    events = iter(handle)
    next(events), next(events)
    handle.cancel()
    steps = small_engine.stats()["steps"]
    wait_until(lambda: small_engine.stats()["active"] == 0)
    stats = small_engine.stats()
    assert stats["steps"] <= steps + 1 and stats["free_slots"] == [0, 1]
    assert len(list(events)) <= 2  # the iterator ends; at most the in-flight step's token
    # the engine still serves, and the freed row holds nothing of the cancelled request
    assert run_alone(small_engine, prompts[3], 5) == generate(
        small_engine._core.params, CONFIG, [prompts[3]], max_new_tokens=5).tokens[0]


def test_a_full_queue_raises_queue_full(small_engine, prompts):
    running = [small_engine.submit(p, 40) for p in prompts[:2]]
    for handle in running:
        next(iter(handle))  # both slots are busy
    waiting = [small_engine.submit(p, 4) for p in prompts[2:4]]
    assert small_engine.stats()["waiting"] == 2
    with pytest.raises(QueueFull):
        small_engine.submit(prompts[5], 4)
    for handle in running:
        handle.cancel()
    assert [len(h.tokens()) for h in waiting] == [4, 4]  # admitted once the slots freed


def test_sharded_engine_equals_single_device(engine, params, prompts, eight_devices):
    requests = [(p, 6, dict(temperature=1.0, top_k=20, seed=i) if i % 2 else {})
                for i, p in enumerate(prompts[:6])]
    single = [run_alone(engine, p, n, **kw) for p, n, kw in requests]
    mesh = build_mesh(data=1, fsdp=4, tensor=2, devices=eight_devices)
    sharded = jax.device_put(params, logical_shardings(param_logical_axes(CONFIG), mesh,
                                                       FSDP_TENSOR))
    with Engine(CONFIG, sharded, max_batch=4, max_seq_len=MAX_LEN, mesh=mesh,
                rules=FSDP_TENSOR) as on_mesh:
        assert run_together(on_mesh, requests) == single


def test_lora_adapters_equal_their_merged_weights(params, prompts):
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    shapes = jax.eval_shape(Llama(CONFIG, lora=lora).init, jax.random.key(1),
                            np.zeros((1, 1), np.int32))  # the adapters' layout, no compile
    # B starts at zero (a no-op adapter): random A and B, so the adapter changes the outputs.
    adapters = jax.jit(lambda: jax.tree.map(
        lambda a: jax.random.normal(jax.random.key(2), a.shape) * 0.3,
        nn.meta.unbox(shapes["lora"])))()  # one compile, not one per leaf
    merged = lora_lib.merge(params, adapters, lora)
    run = functools.partial(generate, config=CONFIG, prompts=prompts[:8], max_new_tokens=8)
    with_adapter = run(params, lora=lora, adapters=adapters).tokens  # 8 slots of 64 as `engine`
    assert with_adapter == run(merged).tokens
    assert with_adapter != run(params).tokens
