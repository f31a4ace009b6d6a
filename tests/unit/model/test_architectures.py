"""Qwen2, Qwen3, Mistral and Mixtral as variations of the one decoder (issue 24), each against
`transformers`' own classes with random weights or a numpy re-derivation: logits (also of
packed documents), the sliding-window ring cache, the experts' layer and its capacity, the
router's load-balancing loss, expert parallelism, the presets' parameter counts and the
refusal of what the decoder does not have. (Import -> generate and export through the jobs:
tests/integration/test_architectures.py.)"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llamahome.errors import CheckpointError, ConfigError
from llamahome.infer.engine import EngineCore
from llamahome.model import hf, lora as lora_lib
from llamahome.model.kv_cache import to_ring
from llamahome.model.llama import (
    ROUTER_LOSS, Llama, LlamaConfig, MoeMlp, init_adapters, init_cache, init_params,
    param_logical_axes, param_shapes,
)
from llamahome.parallel.mesh import axis_rules, batch_sharding, build_mesh, global_batch
from llamahome.train import optim, step as step_lib

WINDOW = 5
# family -> (transformers class, config class, options): 8 heads of 8 dims, 2 layers.
FAMILIES = {
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
              {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, {"head_dim": 16}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig,
                {"sliding_window": WINDOW}),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                {"num_local_experts": 8, "num_experts_per_tok": 2}),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))


def random_hf_model(family: str, seed: int = 0, vocab_size: int = 128, **options):
    """A random tiny transformers model of `family`; norms and biases random too, so a dropped
    or misplaced one shows in the logits."""
    model_class, config_class, defaults = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=256, rms_norm_eps=1e-5,
                          attn_implementation="eager", **{**defaults, **options})
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def torch_logits(model, tokens, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


@functools.cache
def imported(family: str, tmp_root: str):
    model = random_hf_model(family)
    model.save_pretrained(f"{tmp_root}/{family}")
    config, params = hf.load_hf_checkpoint(f"{tmp_root}/{family}")
    return model, config, params


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("architectures"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, root):
    model, config, params = imported(family, root)
    expected = {"qwen2": ("qkv_bias", True), "qwen3": ("qk_norm", True),
                "mistral": ("sliding_window", WINDOW), "mixtral": ("num_experts", 8)}[family]
    assert getattr(config, expected[0]) == expected[1]
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(ours, torch_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_packed_documents_match_transformers_on_each_alone(family, root):
    model, config, params = imported(family, root)
    first, second = TOKENS[0, :7], TOKENS[1, :9]  # 9 > WINDOW: the window acts inside a document
    packed = np.concatenate([first, second, [0, 0]])[None]
    segment_ids = np.array([[1] * 7 + [2] * 9 + [0] * 2])
    positions = np.array([list(range(7)) + list(range(9)) + [0, 0]])
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(packed),
                                          jnp.asarray(positions), jnp.asarray(segment_ids)))
    np.testing.assert_allclose(ours[0, :7], torch_logits(model, first[None])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[0, 7:16], torch_logits(model, second[None])[0], atol=1e-4,
                               rtol=0)


def test_rolling_cache_decodes_past_the_window_like_the_full_forward(root):
    """Prefill 7 tokens (> WINDOW) into a plain cache, move them into a ring of WINDOW slots,
    then decode 5 more one at a time: every step's logits equal transformers' full forward."""
    model, config, params = imported("mistral", root)
    prompt, total = 7, 12
    reference = torch_logits(model, TOKENS)  # [2, 12, V]
    apply = jax.jit(lambda p, tokens, positions, cache: Llama(config).apply(
        {"params": p}, tokens, positions, cache=cache))
    logits, cache = apply(params, jnp.asarray(TOKENS[:, :prompt]), None,
                          init_cache(config, 2, prompt))
    np.testing.assert_allclose(np.asarray(logits), reference[:, :prompt], atol=1e-4, rtol=0)
    ring = to_ring(cache, jnp.full((2,), prompt, jnp.int32), WINDOW)
    assert init_cache(config, 2, total, per_row=True, rolling=True).k[0].shape == ring.k[0].shape
    for t in range(prompt, total):
        logits, ring = apply(params, jnp.asarray(TOKENS[:, t:t + 1]),
                             jnp.full((2, 1), t, jnp.int32), ring)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], reference[:, t], atol=1e-4, rtol=0)
    # The serving engine (and so generate) holds the same ring: WINDOW slots per row, not 64.
    core = EngineCore(config, params, max_batch=2, max_seq_len=64)
    assert core.slots.cache.k[0].shape == (2, 2, 8, WINDOW)  # [B, kv_heads, head_dim, slots]


def test_every_variation_at_once_takes_lora_adapters():
    """The variations compose (one decoder): bias + q/k norm + window + experts, with LoRA on
    the attention projections; new adapters (B = 0) leave the logits unchanged."""
    config = MOE.replace(qkv_bias=True, qk_norm=True, sliding_window=3)
    lora = lora_lib.LoraConfig(rank=4, targets=lora_lib.ATTENTION_TARGETS)
    params = jax.jit(functools.partial(init_params, config))(jax.random.key(0))
    adapters = jax.jit(functools.partial(init_adapters, config, lora))(jax.random.key(1))
    assert set(adapters["layers"]["attention"]) == {f"{p}_{s}" for p in lora.targets
                                                    for s in "ab"}
    plain, adapted = jax.jit(lambda tokens: (
        Llama(config).apply({"params": params}, tokens),
        Llama(config, lora).apply({"params": params, "lora": adapters}, tokens)))(
            jnp.asarray(TOKENS[:, :8]))
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(plain), atol=1e-6, rtol=0)


def test_router_loss_matches_numpy_and_transformers(root):
    model, config, params = imported("mixtral", root)
    segment_ids = np.ones(TOKENS.shape, np.int32)
    segment_ids[1, -3:] = 0  # padding: left out of the loss, as HF's attention_mask leaves it
    (_, _), sown = Llama(config).apply({"params": params}, jnp.asarray(TOKENS),
                                       segment_ids=jnp.asarray(segment_ids), return_hidden=True,
                                       mutable=["losses"])
    ours = float(sown["losses"][ROUTER_LOSS][0]) / config.router_aux_loss_coef

    with torch.no_grad():
        out = model(torch.tensor(TOKENS), attention_mask=torch.tensor(segment_ids),
                    output_router_logits=True)
    # Switch Transformer eqs. 4-6 over all layers' valid tokens, re-derived in numpy.
    logits = np.concatenate([r.numpy() for r in out.router_logits])  # [layers * B * T, E]
    valid = np.tile(segment_ids.reshape(-1), len(out.router_logits)).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    counts = np.zeros(8)
    np.add.at(counts, top2.reshape(-1), np.repeat(valid, 2))
    share, mean_prob = counts / valid.sum(), (probs * valid[:, None]).sum(0) / valid.sum()
    numpy_loss = 8 * np.sum(share * mean_prob)
    assert ours == pytest.approx(numpy_loss, rel=1e-5)
    assert ours == pytest.approx(float(out.aux_loss), rel=1e-5)


def _numpy_moe(x, valid, params, k, capacity=None):
    """MoeMlp re-derived with loops: softmax router, top k renormalised, SwiGLU experts; with a
    capacity C, each sequence queues first choices then second choices in token order and an
    expert takes its first C. Returns (out [B, T, d], dropped assignments)."""
    x = x.astype(np.float64)
    logits = x @ params["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[..., :k]
    top = np.take_along_axis(probs, chosen, -1)
    top /= top.sum(-1, keepdims=True)
    out, dropped = np.zeros_like(x), 0
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    for b in range(x.shape[0]):
        taken = np.zeros(params["router"].shape[1], int)
        for j in range(k):
            for t in range(x.shape[1]):
                e = chosen[b, t, j]
                if not valid[b, t]:
                    continue
                if capacity is not None and taken[e] >= capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                h = silu(x[b, t] @ params["gate_proj"][e]) * (x[b, t] @ params["up_proj"][e])
                out[b, t] += top[b, t, j] * (h @ params["down_proj"][e])
    return out, dropped


@pytest.mark.parametrize("capacity", [None, 1.0, 0.5])
def test_moe_layer_and_its_capacity_match_a_numpy_loop(capacity):
    config = MOE.replace(num_experts=4, expert_capacity=capacity)
    x = jax.random.normal(jax.random.key(0), (2, 12, config.hidden_size))
    valid = np.ones((2, 12), bool)
    valid[1, -2:] = False  # padding takes no capacity
    layer = MoeMlp(config)
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(1), x, valid)["params"])
    out, stats = jax.jit(layer.apply)({"params": params}, x, jnp.asarray(valid))
    slots = None if capacity is None else int(np.ceil(capacity * 2 * 12 / 4))
    expected, dropped = _numpy_moe(np.asarray(x), valid, jax.tree.map(np.asarray, params), 2,
                                   slots)
    np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], atol=1e-5, rtol=0)
    assert float(jnp.sum(stats[2])) == dropped
    assert (dropped > 0) == (capacity is not None)  # this routing overflows 6 slots, and 3


MOE = LlamaConfig(name="moe", vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=1,
                  num_heads=4, num_kv_heads=2, max_seq_len=32, num_experts=8,
                  num_experts_per_token=2, router_aux_loss_coef=0.1)


@functools.cache
def _moe_params():
    return jax.device_get(jax.jit(functools.partial(init_params, MOE))(jax.random.key(0)))


def _moe_losses(mesh_shape, preset, devices, steps=3):
    mesh, rules = build_mesh(*mesh_shape, devices=devices), axis_rules(preset)
    specs = param_logical_axes(MOE)
    optimizer, schedule = optim.build_optimizer(1e-2, steps, decay_mask=optim.decay_mask(specs))
    abstract, shardings = step_lib.state_shardings(param_shapes(MOE), specs, optimizer, mesh, rules)
    state = jax.device_put(step_lib.init_train_state(_moe_params(), optimizer, 0), shardings)
    layout = batch_sharding(mesh, rules)
    step = step_lib.compile_train_step(
        abstract, shardings, step_lib.abstract_batch(8, 16, layout), mesh, rules,
        apply_fn=step_lib.hidden_apply_fn(Llama(MOE)), optimizer=optimizer, schedule=schedule)
    tokens = np.random.default_rng(1).integers(0, 128, (8, 17), dtype=np.int32)
    batch = global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                          "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
                          "segment_ids": np.ones((8, 16), np.int32),
                          "loss_mask": np.ones((8, 16), np.float32)}, layout)
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        out.append((float(metrics["loss"]), float(metrics["router_aux_loss"])))
    expert_sharding = shardings.params["layers"]["mlp"]["gate_proj"].spec
    return np.array(out), expert_sharding


def test_experts_shard_and_expert_parallel_gives_the_data_parallel_losses(eight_devices):
    reference, replicated = _moe_losses((-1, 1, 1), "data_parallel", eight_devices)
    losses, expert_sharded = _moe_losses((1, -1, 1), "fsdp", eight_devices)
    assert tuple(replicated) in ((), (None,) * len(replicated))
    assert expert_sharded[1] == "fsdp"  # [layers, expert, embed, mlp]: experts split 8 ways
    np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0)
    weighted = reference[:, 1]
    assert np.all(weighted > 0) and np.all(weighted < 1.0)  # 0.1 * ~k for a near-balanced router
    assert reference[-1, 0] < reference[0, 0]


# --- Presets and refusals ---

PUBLISHED = {"qwen2_5_0_5b": 494_032_768, "qwen2_5_1_5b": 1_543_714_304,
             "qwen2_5_7b": 7_615_616_512, "qwen3_0_6b": 596_049_920, "qwen3_8b": 8_190_735_360,
             "mistral_7b": 7_241_732_096, "mixtral_8x7b": 46_702_792_704}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_param_count_matches_published(name):
    gin.parse_config_file(f"gin/models/{name}.gin")
    config = LlamaConfig()
    shapes = param_shapes(config)  # jax.eval_shape: nothing allocated
    assert sum(x.size for x in jax.tree.leaves(shapes)) == PUBLISHED[name]
    assert config.num_params() == PUBLISHED[name] and config.name == name


def _config(family, **changes) -> dict:
    config = random_hf_model(family).config.to_dict()
    config.update(changes)
    return json.loads(json.dumps(config))


@pytest.mark.parametrize("family, changes, key", [
    ("qwen2", {"model_type": "gemma"}, "model_type 'gemma'"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mistral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type 'yarn'"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused_naming_the_key(family, changes, key):
    with pytest.raises(CheckpointError, match=key):
        hf.config_from_hf(_config(family, **changes))


def test_a_mix_no_family_holds_is_not_exported():
    with pytest.raises(CheckpointError, match="no Hugging Face family"):
        hf.config_to_hf(LlamaConfig(qkv_bias=True, sliding_window=8))


def test_lora_on_experts_is_refused_naming_the_targets():
    with pytest.raises(ConfigError, match="mixture of 8 experts"):
        lora_lib.check_fits(lora_lib.LoraConfig(rank=4), MOE)
    lora_lib.check_fits(lora_lib.LoraConfig(rank=4, targets=lora_lib.ATTENTION_TARGETS), MOE)
