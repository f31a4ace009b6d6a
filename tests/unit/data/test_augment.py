"""Augmenters re-derived with numpy: FIM rearranges the body, crop keeps a window, noise hits inputs only."""

from __future__ import annotations

import numpy as np
import pytest

from llamahome.data import augment

PRE, MID, SUF = 900, 901, 902


def doc(n=30):
    tokens = np.concatenate([[1], np.arange(10, 10 + n), [2]]).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones(len(tokens), np.float32)}


@pytest.mark.parametrize("spm_rate,order", [(0.0, "psm"), (1.0, "spm")])
def test_fim_layouts(spm_rate, order):
    out = augment.fim(doc(), np.random.default_rng(3), prefix_id=PRE, middle_id=MID, suffix_id=SUF,
                      rate=1.0, spm_rate=spm_rate)["tokens"].tolist()
    assert out[0] == 1 and out[-1] == 2 and len(out) == 32 + 3
    body = out[1:-1]
    if order == "psm":
        p, s, m = body.index(PRE), body.index(SUF), body.index(MID)
        assert p == 0 and p < s < m
        prefix, suffix, middle = body[1:s], body[s + 1:m], body[m + 1:]
    else:
        assert body[:2] == [PRE, SUF]
        m = body.index(MID)
        suffix, rest = body[2:m], body[m + 1:]
        prefix, middle = rest, []  # prefix + middle is one contiguous run in SPM
    assert prefix + middle + suffix == list(range(10, 40))


def test_fim_rate_zero_is_identity_and_seeded():
    d = doc()
    assert augment.fim(d, np.random.default_rng(0), prefix_id=PRE, middle_id=MID, suffix_id=SUF,
                       rate=0.0) is d
    a, b = (augment.fim(d, np.random.default_rng(7), prefix_id=PRE, middle_id=MID, suffix_id=SUF,
                        rate=1.0) for _ in range(2))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_random_crop_keeps_a_contiguous_window():
    d = doc(100)
    out = augment.random_crop(d, np.random.default_rng(0), max_tokens=16)["tokens"]
    start = int(np.flatnonzero(d["tokens"] == out[0])[0])
    np.testing.assert_array_equal(out, d["tokens"][start:start + 16])
    assert augment.random_crop(doc(5), np.random.default_rng(0), max_tokens=16)["tokens"].size == 7


def test_token_noise_changes_inputs_at_rate_p_and_keeps_targets():
    d = doc(20000)
    out = augment.token_noise(d, np.random.default_rng(0), vocab_size=32000, p=0.1)
    np.testing.assert_array_equal(out["tokens"], d["tokens"])
    changed = (out["input_tokens"] != d["tokens"]).mean()
    assert 0.09 < changed < 0.11 and out["input_tokens"][0] == 1
