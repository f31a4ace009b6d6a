"""Augmenters: seeded per-document transforms applied before packing.

An augmenter is a function `fn(doc, rng) -> doc` where doc is {"tokens": int32[n],
"loss_mask": float32[n]} (and, after token noise, "input_tokens": int32[n], the corrupted
inputs while targets stay clean). The pipeline runs them through Grain's `random_map`, whose
generator is seeded by (pipeline seed, element index), so a resumed run augments exactly as
the uninterrupted one. Select them in gin:
    data_pipeline.augmenters = [@fim, @token_noise]
    fim.prefix_id = 32001 ...
Adding one is writing such a function and decorating it with `@gin.configurable`.
"""

from __future__ import annotations

import gin
import numpy as np

Doc = dict[str, np.ndarray]


@gin.configurable
def fim(doc: Doc, rng: np.random.Generator, *, prefix_id: int = gin.REQUIRED,
        middle_id: int = gin.REQUIRED, suffix_id: int = gin.REQUIRED, rate: float = 0.5,
        spm_rate: float = 0.5, keep_first: int = 1, keep_last: int = 1) -> Doc:
    """Fill-in-the-middle (Bavarian et al. 2022, arXiv:2207.14255) in PSM or SPM order.

    The body (between `keep_first` BOS-like and `keep_last` EOS-like tokens) is cut at two
    random points into prefix, middle, suffix; PSM: <PRE> prefix <SUF> suffix <MID> middle,
    SPM: <PRE> <SUF> suffix <MID> prefix middle.
    """
    tokens, mask = doc["tokens"], doc["loss_mask"]
    n = len(tokens)
    if n - keep_first - keep_last < 2 or rng.random() >= rate:
        return doc
    head, body, tail = np.split(tokens, [keep_first, n - keep_last])
    mhead, mbody, mtail = np.split(mask, [keep_first, n - keep_last])
    a, b = np.sort(rng.integers(0, len(body) + 1, size=2))
    pre, mid, suf = body[:a], body[a:b], body[b:]
    mpre, mmid, msuf = mbody[:a], mbody[a:b], mbody[b:]
    sentinel = lambda i: np.array([i], tokens.dtype)  # noqa: E731
    one = np.ones(1, mask.dtype)
    if rng.random() < spm_rate:
        parts = [head, sentinel(prefix_id), sentinel(suffix_id), suf, sentinel(middle_id), pre, mid, tail]
        masks = [mhead, one, one, msuf, one, mpre, mmid, mtail]
    else:
        parts = [head, sentinel(prefix_id), pre, sentinel(suffix_id), suf, sentinel(middle_id), mid, tail]
        masks = [mhead, one, mpre, one, msuf, one, mmid, mtail]
    return {"tokens": np.concatenate(parts), "loss_mask": np.concatenate(masks)}


@gin.configurable
def random_crop(doc: Doc, rng: np.random.Generator, *, max_tokens: int = gin.REQUIRED) -> Doc:
    """Keeps a random window of `max_tokens` tokens of documents longer than that."""
    n = len(doc["tokens"])
    if n <= max_tokens:
        return doc
    start = int(rng.integers(0, n - max_tokens + 1))
    return {k: v[start:start + max_tokens] for k, v in doc.items()}


@gin.configurable
def token_noise(doc: Doc, rng: np.random.Generator, *, vocab_size: int = gin.REQUIRED,
                p: float = 0.05) -> Doc:
    """Replaces each input token (not the first) by a uniform random id with probability p."""
    tokens = doc["tokens"]
    noisy = doc.get("input_tokens", tokens).copy()
    hit = rng.random(len(tokens)) < p
    hit[:1] = False
    noisy[hit] = rng.integers(0, vocab_size, size=int(hit.sum()), dtype=noisy.dtype)
    return {**doc, "input_tokens": noisy}


def apply_all(augmenters, doc: Doc, rng: np.random.Generator) -> Doc:
    """Runs `augmenters` in order, each drawing from the same per-document generator."""
    for fn in augmenters:
        doc = fn(doc, rng)
    return doc
