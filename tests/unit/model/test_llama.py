"""The Llama module on its own (parameter tree, causality, packing, padding, attention impls),
LlamaConfig and the gin presets (parameter counts against the published figures), and the
vocabulary that follows the tokenizer."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamahome.config.gin_config import REPO_GIN_DIR
from llamahome.errors import ConfigError
from llamahome.model.attention import attention_mask
from llamahome.model.hf import load_hf_checkpoint
from llamahome.model.llama import (DECODE_ROWS, Llama, LlamaConfig, OutMajor, checkpoint_vocab,
                                   decode_layout, fit_vocab, init_cache, init_params,
                                   param_logical_axes, param_shapes)
from tests.unit.model.hf_reference import LLAMA3_ROPE, hf_logits, random_hf_llama

CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0))


def _logits(config, params, tokens, positions=None, segment_ids=None):
    apply = jax.jit(Llama(config).apply)
    return np.asarray(apply({"params": params}, tokens, positions, segment_ids))


def test_params_count_dtype_and_axes_match(params):
    leaves = jax.tree.leaves(params)
    assert sum(x.size for x in leaves) == CONFIG.num_params()
    assert all(x.dtype == jnp.float32 for x in leaves)
    axes = param_logical_axes(CONFIG)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
        == jax.tree.structure(params)
    flat = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for spec, x in zip(flat, leaves, strict=True):
        assert len(spec) == x.ndim
    assert axes["layers"]["attention"]["k_proj"] == jax.sharding.PartitionSpec(
        "layers", "embed", "kv_heads", "head_dim")


def test_future_tokens_do_not_change_past_logits(params):
    tokens = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 97
    a, b = _logits(CONFIG, params, tokens), _logits(CONFIG, params, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


def test_packed_documents_equal_each_alone(params):
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 97, 9), rng.integers(0, 97, 6)
    packed = np.concatenate([doc_a, doc_b, [0]])[None].astype(np.int32)  # one padding slot
    segments = np.array([[1] * 9 + [2] * 6 + [0]], np.int32)
    positions = np.array([list(range(9)) + list(range(6)) + [0]], np.int32)
    got = _logits(CONFIG, params, packed, positions, segments)[0]
    alone_a = _logits(CONFIG, params, doc_a[None].astype(np.int32))[0]
    alone_b = _logits(CONFIG, params, doc_b[None].astype(np.int32))[0]
    np.testing.assert_allclose(got[:9], alone_a, atol=1e-5)
    np.testing.assert_allclose(got[9:15], alone_b, atol=1e-5)
    assert np.isfinite(got).all()


def test_dot_product_attention_matches_xla(params):
    tokens = np.random.default_rng(2).integers(0, 97, (2, 10)).astype(np.int32)
    segments = np.array([[1] * 6 + [2] * 4, [0] * 3 + [1] * 7], np.int32)
    xla = _logits(CONFIG, params, tokens, segment_ids=segments)
    dot = _logits(CONFIG.replace(attention_impl="dot_product"), params, tokens,
                  segment_ids=segments)
    np.testing.assert_allclose(dot, xla, atol=1e-5)


@pytest.mark.parametrize("tie,rows", [(True, 3), (False, DECODE_ROWS + 8)])  # both forms of
def test_decode_layout_gives_the_same_logits(tie, rows):  # an [out, in] matmul, both heads
    """The engine's copy of the weights ([out, in], layers unstacked; read with a KV cache)
    computes what the stored params do, for few and for many token rows."""
    config = CONFIG.replace(tie_embeddings=tie)
    weights = jax.jit(init_params, static_argnums=0)(config, jax.random.key(1))
    layout = jax.jit(decode_layout)(weights)
    layer = layout["layers"][0]
    assert isinstance(layer["attention"]["o_proj"], OutMajor)
    assert layer["attention"]["o_proj"].values.shape == (32, 4, 8)  # [embed, heads, head_dim]
    assert isinstance(layer["mlp"]["down_proj"], OutMajor)
    assert tie == ("lm_head" not in layout) and (tie or isinstance(layout["lm_head"], OutMajor))
    assert jax.tree.structure(decode_layout(layout)) == jax.tree.structure(layout)  # idempotent
    tokens = np.random.default_rng(4).integers(0, 97, (1, rows)).astype(np.int32)
    apply = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t,
                                                     cache=init_cache(config, 1, rows)))
    np.testing.assert_allclose(np.asarray(apply(layout, tokens)[0]),
                               np.asarray(apply(weights, tokens)[0]), atol=1e-5, rtol=1e-5)


def test_decode_layout_leaves_experts_and_the_router_as_they_are():
    config = CONFIG.replace(num_experts=4, num_experts_per_token=2)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(2)))  # shapes suffice
    mlp = jax.eval_shape(decode_layout, params)["layers"][1]["mlp"]
    assert not any(isinstance(w, OutMajor) for w in mlp.values())
    assert mlp["gate_proj"].shape == params["layers"]["mlp"]["gate_proj"].shape[1:]


def _loss_grads_and_logits(config, params):
    tokens = np.random.default_rng(3).integers(0, 97, (2, 10)).astype(np.int32)

    def loss(params):
        logits = Llama(config).apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.fixture(scope="module")
def plain_grads_and_logits(params):
    return _loss_grads_and_logits(CONFIG, params)


@pytest.mark.parametrize("policy,scan", [("none", True), ("full", False), ("save_dots", True),
                                         ("save_qkv_proj", False)])
def test_remat_and_scan_give_the_plain_logits_and_grads(params, plain_grads_and_logits,
                                                        policy, scan):
    plain_grads, plain_logits = plain_grads_and_logits
    config = CONFIG.replace(remat_policy=policy, scan_layers=scan)
    grads, logits = _loss_grads_and_logits(config, params)
    np.testing.assert_allclose(logits, plain_logits, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, plain_grads)


def test_unknown_remat_policy_names_the_choices(params):
    with pytest.raises(ConfigError, match="remat_policy 'ful'.*Did you mean 'full'"):
        Llama(CONFIG.replace(remat_policy="ful")).apply({"params": params},
                                                         np.zeros((1, 2), np.int32))


def test_bf16_compute_stays_close_to_hf_float32(tmp_path):
    """bf16 compute (f32 or bf16 params) vs HF float32 logits; measured max |diff| ~0.004."""
    model = random_hf_llama(num_kv_heads=2, rope_scaling=LLAMA3_ROPE, seed=7)
    model.save_pretrained(tmp_path)
    tokens = np.random.default_rng(4).integers(0, 128, (2, 160))
    expected = hf_logits(model, tokens)
    for param_dtype in ("float32", "bfloat16"):
        config, params = load_hf_checkpoint(tmp_path, dtype="bfloat16", param_dtype=param_dtype)
        logits = Llama(config).apply({"params": params}, tokens)
        assert logits.dtype == jnp.bfloat16
        diff = np.abs(np.asarray(logits, np.float32) - expected).max()
        assert diff <= 0.02 * np.abs(expected).max(), (param_dtype, diff)


def test_attention_mask_against_a_loop():
    q_seg = np.array([[0, 1, 1, 2]])
    kv_seg = np.array([[0, 1, 1, 2, 2, 0]])
    got = np.asarray(attention_mask(q_seg, kv_seg, q_offset=1))[0, 0]
    expected = np.zeros((4, 6), bool)
    for t in range(4):
        for s in range(6):
            if q_seg[0, t] == 0:
                expected[t, s] = s == t + 1
            else:
                expected[t, s] = s <= t + 1 and kv_seg[0, s] == q_seg[0, t]
    np.testing.assert_array_equal(got, expected)


# --- LlamaConfig and the presets ---

PUBLISHED = {  # from the model cards / HF safetensors metadata
    "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192,
    "llama3_1_8b": 8_030_261_248, "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800, "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824, "tinyllama_1_1b": 1_100_048_384,
    "smollm2_135m": 134_515_008, "smollm2_360m": 361_821_120,
}


def _preset(name: str) -> LlamaConfig:
    gin.parse_config_file(str(REPO_GIN_DIR / "models" / f"{name}.gin"))
    return LlamaConfig()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count_matches_published(name):
    config = _preset(name)
    assert config.name == name
    shapes = param_shapes(config)  # jax.eval_shape: no memory
    assert sum(x.size for x in jax.tree.leaves(shapes)) == PUBLISHED[name]
    assert config.num_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_test_presets_parse(name):
    config = _preset(name)
    assert config.name == name and config.num_params() < 50_000_000


def test_quickstart_preset_takes_the_tokenizers_vocabulary():
    """gin/models/shakespeare_11m.gin: the quickstart's model, kept under its old name."""
    config = _preset("shakespeare_11m")
    assert config.name == "shakespeare-11m" and config.vocab_size is None
    assert config.replace(vocab_size=4096).num_params() == 11_014_272


def test_flops_per_token_llama2_7b():
    config = _preset("llama2_7b")
    # Matmul weights: all parameters but the embedding table and the 65 RMSNorm scales.
    matmul = PUBLISHED["llama2_7b"] - 32000 * 4096 - 65 * 4096
    assert config.flops_per_token(4096) == 6 * matmul + 12 * 32 * 4096 * 4096


def test_config_is_hashable_and_validated():
    scaled = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert hash(scaled) == hash(LlamaConfig(rope_scaling={"factor": 8.0, "rope_type": "llama3"}))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        LlamaConfig(dtype="float64")


# --- The vocabulary ---


def test_unset_vocab_is_the_tokenizer_size_rounded_up_and_recorded():
    config = fit_vocab(LlamaConfig(vocab_size=None), 4000)
    assert config.vocab_size == 4096
    assert gin.query_parameter("LlamaConfig.vocab_size") == 4096  # checkpoints record it
    assert fit_vocab(LlamaConfig(vocab_size=None), 4096).vocab_size == 4096
    assert fit_vocab(LlamaConfig(vocab_size=None), 130).vocab_size == 256


def test_a_bound_vocab_is_kept_and_a_larger_tokenizer_refused():
    assert fit_vocab(LlamaConfig(vocab_size=32000), 31000).vocab_size == 32000
    with pytest.raises(ConfigError, match=r"the tokenizer has 4096 tokens but the model's "
                                          r"vocabulary is 256 \(bound\).*vocab_size=None"):
        fit_vocab(LlamaConfig(vocab_size=256), 4096)


def test_a_resumed_run_keeps_its_checkpoints_vocab():
    saved = "LlamaConfig.vocab_size = 32000\nLlamaConfig.hidden_size = 64\n"
    vocab = checkpoint_vocab(saved)
    assert vocab == 32000
    assert fit_vocab(LlamaConfig(vocab_size=None), 4096, vocab).vocab_size == 32000
    with pytest.raises(ConfigError, match=r"vocabulary is 32000 \(the checkpoint's\)"):
        fit_vocab(LlamaConfig(vocab_size=None), 50000, vocab)
