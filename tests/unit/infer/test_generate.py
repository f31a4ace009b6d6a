"""Generation against transformers' generate and against full recomputation without a cache."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from llamahome.errors import UserError
from llamahome.infer.generate import generate, stream_generate
from llamahome.infer.samplers import SamplerConfig
from llamahome.model import hf
from llamahome.model.llama import Llama, param_logical_axes
from llamahome.parallel.mesh import FSDP_TENSOR, build_mesh, logical_shardings
from tests.unit.model.hf_reference import LLAMA3_ROPE, random_hf_llama

PROMPT_LENGTHS = (5, 13, 9)
NEW_TOKENS = 32
PAD = 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny HF Llama (GQA, Llama 3 RoPE), saved as safetensors and imported."""
    model = random_hf_llama(num_kv_heads=2, rope_scaling=LLAMA3_ROPE, seed=5)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    config, params = hf.load_hf_checkpoint(path)
    return model, config, jax.device_put(params, jax.devices()[0])


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 128, n).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, prompts, new_tokens, eos=None) -> np.ndarray:
    """transformers' greedy generate on the left-padded batch: new ids [B, new_tokens]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=eos)
    return out[:, width:].numpy()


def test_greedy_equals_transformers_generate(reference, prompts):
    model, config, params = reference
    expected = hf_greedy(model, prompts, NEW_TOKENS)
    out = generate(params, config, prompts, max_new_tokens=NEW_TOKENS, pad_id=PAD)
    np.testing.assert_array_equal(np.array(out.tokens), expected)
    assert out.finish_reasons == ["length"] * 3


def test_per_sequence_eos_stop_equals_transformers(reference, prompts):
    model, config, params = reference
    free = hf_greedy(model, prompts, NEW_TOKENS)
    eos = int(free[1, 6])  # row 1 stops at step 6 at the latest; the others when they meet it
    expected = hf_greedy(model, prompts, NEW_TOKENS, eos=eos)
    out = generate(params, config, prompts, max_new_tokens=NEW_TOKENS, stop_ids=(eos,),
                   pad_id=PAD)
    for row in range(3):
        stop = list(free[row]).index(eos) + 1 if eos in free[row] else NEW_TOKENS
        assert out.tokens[row] == free[row, :stop].tolist()
        assert out.finish_reasons[row] == ("stop" if eos in free[row] else "length")
        # transformers pads a finished row; it may stop the whole batch before NEW_TOKENS.
        np.testing.assert_array_equal(expected[row, :stop], free[row, :stop])
        assert (expected[row, stop:] == PAD).all()


def test_kv_cache_decoding_equals_full_recomputation(reference, prompts):
    _, config, params = reference
    out = generate(params, config, prompts, max_new_tokens=12, keep_logits=True, pad_id=PAD,
                   sampler=SamplerConfig(temperature=1.0), seed=3)
    for row, prompt in enumerate(prompts):
        sequence = np.array(prompt + out.tokens[row])[None]  # [1, prompt + new]
        full = np.asarray(Llama(config).apply({"params": params}, sequence))[0]
        # The logits that produced new token i are the full model's at position len(prompt)-1+i.
        expected = full[len(prompt) - 1:len(prompt) - 1 + len(out.tokens[row])]
        np.testing.assert_allclose(out.logits[row], expected, atol=1e-4, rtol=0)


def test_stream_yields_the_same_ids_as_generate(reference, prompts):
    _, config, params = reference
    sampler = SamplerConfig(temperature=0.9, top_p=0.9)
    whole = generate(params, config, prompts, max_new_tokens=10, sampler=sampler, seed=7,
                     pad_id=PAD)
    chunks = list(stream_generate(params, config, prompts, max_new_tokens=10, sampler=sampler,
                                  seed=7, chunk=3, pad_id=PAD))
    assert [c.shape[1] for c in chunks] == [1, 3, 3, 3]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.array(whole.tokens))


def test_sharded_generation_equals_single_device(reference, prompts, eight_devices):
    _, config, params = reference
    sampler = SamplerConfig(temperature=1.0, top_k=20)
    single = generate(params, config, prompts, max_new_tokens=8, sampler=sampler, seed=1,
                      pad_id=PAD)
    mesh = build_mesh(data=1, fsdp=4, tensor=2, devices=eight_devices)
    sharded = jax.device_put(params, logical_shardings(param_logical_axes(config), mesh,
                                                       FSDP_TENSOR))
    out = generate(sharded, config, prompts, max_new_tokens=8, sampler=sampler, seed=1,
                   pad_id=PAD, mesh=mesh, rules=FSDP_TENSOR)
    assert out.tokens == single.tokens


def test_too_long_request_is_refused(reference, prompts):
    _, config, params = reference
    with pytest.raises(UserError, match="max_seq_len"):
        generate(params, config, prompts, max_new_tokens=config.max_seq_len, pad_id=PAD)
