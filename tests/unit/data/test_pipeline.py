"""The Grain pipeline end to end on a folder of text files, checked against direct tokenization."""

from __future__ import annotations

import collections
import json

import grain
import numpy as np
import pytest

from llamahome.cache import CacheManager
from llamahome.config import gin_config
from llamahome.data.packing import PackIterDataset
from llamahome.data.pipeline import (
    DocumentWindows,
    cache_name_for,
    data_pipeline,
    make_data_iterator,
    open_cache,
    split_documents,
)
from llamahome.data.sources import TextFiles
from llamahome.data.token_cache import TokenCache
from llamahome.errors import ConfigError
from tests.unit.data.conftest import WORDS


def make(split, folder, tokenizer, tmp_path, *, batch=4, seq_len=48, seed=0, index=0, count=1, **cfg):
    config = data_pipeline(sources=[TextFiles(paths=str(folder), split="paragraph")], **cfg)
    return make_data_iterator(split, global_batch_size=batch, seq_len=seq_len, seed=seed,
                              process_index=index, process_count=count, config=config,
                              tokenizer=tokenizer, cache_manager=CacheManager(root=str(tmp_path / "c")))


def documents_of(batches) -> list[tuple[int, ...]]:
    """With 'padded' packing each row is one document: rebuild it from inputs and the last target."""
    docs = []
    for b in batches:
        for row in range(len(b["inputs"])):
            keep = b["segment_ids"][row] > 0
            if keep.any():
                assert set(b["segment_ids"][row][keep]) == {1}
                docs.append((*b["inputs"][row][keep].tolist(), int(b["targets"][row][keep][-1])))
    return docs


def test_batches_follow_the_contract(tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    batch = next(make("train", folder, sp_tokenizer, tmp_path, batch=8, count=2))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in batch.items():
        assert value.shape == (4, 48)
        assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)


def test_validation_is_held_out_deterministic_and_disjoint(tmp_path, text_corpus, sp_tokenizer):
    folder, paragraphs = text_corpus
    kwargs = dict(seq_len=128, packing="padded", validation_fraction=0.25)
    val = documents_of(make("validation", folder, sp_tokenizer, tmp_path, **kwargs))
    assert val == documents_of(make("validation", folder, sp_tokenizer, tmp_path, **kwargs))
    everything = collections.Counter(tuple(sp_tokenizer.encode(p, add_eos=True)) for p in paragraphs)
    assert collections.Counter(val) <= everything and 0.1 < len(val) / len(paragraphs) < 0.4
    train = make("train", folder, sp_tokenizer, tmp_path, **kwargs)
    train_docs = documents_of(next(train) for _ in range(60))
    assert not set(train_docs) & set(val)
    assert set(train_docs) | set(val) == set(everything)


def test_validation_last_batch_is_padded_with_zero_loss(tmp_path, text_corpus, sp_tokenizer):
    folder, _ = text_corpus
    batches = list(make("validation", folder, sp_tokenizer, tmp_path, batch=5, seq_len=128,
                        packing="padded", validation_fraction=0.3))
    assert all(b["inputs"].shape == (5, 128) for b in batches)
    assert batches[-1]["loss_mask"][-1].sum() == 0 or len(documents_of(batches)) % 5 == 0


def test_two_processes_read_every_document_once(tmp_path, text_corpus, sp_tokenizer):
    folder, paragraphs = text_corpus
    kwargs = dict(batch=4, seq_len=128, packing="padded", validation_sources=[
        TextFiles(paths=str(folder), split="paragraph")])
    shards = [documents_of(make("validation", folder, sp_tokenizer, tmp_path, index=i, count=2, **kwargs))
              for i in (0, 1)]
    reference = collections.Counter(tuple(sp_tokenizer.encode(p, add_eos=True)) for p in paragraphs)
    assert collections.Counter(shards[0]) + collections.Counter(shards[1]) == reference
    assert abs(len(shards[0]) - len(shards[1])) <= 1


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
def test_checkpoint_restore_gives_the_same_next_50_batches(tmp_path, text_corpus, sp_tokenizer, packing):
    folder, _ = text_corpus
    from llamahome.data import augment  # noqa: PLC0415
    import functools  # noqa: PLC0415

    noise = functools.partial(augment.token_noise, vocab_size=32000, p=0.1)
    it = make("train", folder, sp_tokenizer, tmp_path, seq_len=32, packing=packing, augmenters=[noise])
    for _ in range(13):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # a small JSON-able dict
    expected = [next(it) for _ in range(50)]
    fresh = make("train", folder, sp_tokenizer, tmp_path, seq_len=32, packing=packing, augmenters=[noise])
    fresh.set_state(state)
    for a, b in zip(expected, (next(fresh) for _ in range(50)), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any((b["inputs"][:, 1:] != b["targets"][:, :-1]).any() for b in expected)  # noise applied


def test_train_epoch_packs_every_token_once(tmp_path, text_corpus, sp_tokenizer):
    """One epoch of concat_split rows holds each (input, target) pair of the train split once."""
    folder, paragraphs = text_corpus
    it = make("train", folder, sp_tokenizer, tmp_path, batch=1, seq_len=64, validation_fraction=0.2)
    val = set(documents_of(make("validation", folder, sp_tokenizer, tmp_path, seq_len=128,
                                packing="padded", validation_fraction=0.2)))
    train_docs = [d for p in paragraphs if (d := tuple(sp_tokenizer.encode(p, add_eos=True))) not in val]
    pairs = collections.Counter(pair for d in train_docs for pair in zip(d[:-1], d[1:]))
    stream = []  # concat_split keeps document order, so the first epoch is a prefix of the stream
    while len(stream) < sum(pairs.values()):
        b = next(it)
        keep = b["segment_ids"][0] > 0
        stream += zip(b["inputs"][0][keep].tolist(), b["targets"][0][keep].tolist())
    assert collections.Counter(stream[:sum(pairs.values())]) == pairs


def test_shakespeare_gin_file(tmp_path, text_corpus, sp_model_path):
    folder, _ = text_corpus
    gin_config.parse_config(["gin/data/shakespeare.gin"], gin_params=[
        f"DATA_DIR='{folder}'", f"TOKENIZER='{sp_model_path}'", f"CacheManager.root='{tmp_path}'"])
    batch = next(make_data_iterator("train", global_batch_size=2, seq_len=16, seed=0,
                                    process_index=0, process_count=1))
    assert batch["inputs"].shape == (2, 16) and batch["inputs"][0, 0] == 1  # starts with BOS


def test_bad_batch_size_names_the_fix(tmp_path, text_corpus, sp_tokenizer):
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        make("train", text_corpus[0], sp_tokenizer, tmp_path, batch=4, count=3)


def test_document_windows_hold_every_pair_once():
    lengths = np.random.default_rng(0).integers(0, 60, 200)
    lengths[[3, 50, 51]] = [1000, 257, 18]
    docs = np.flatnonzero(lengths >= 2)
    windows = DocumentWindows(docs, lengths, pairs=16)
    read = [windows[i] for i in range(len(windows))]
    assert all(2 <= stop - start <= 17 for _, start, stop in read)  # at most 16 pairs each
    pairs = collections.Counter((d, p) for d, start, stop in read for p in range(start, stop - 1))
    assert pairs == collections.Counter((d, p) for d in docs for p in range(lengths[d] - 1))
    short = [(d, 0, lengths[d]) for d in docs if lengths[d] <= 17]  # one window: the whole document
    assert [w for w in read if w[0] in {d for d, _, _ in short}] == short
    assert [d for d, _, _ in read] == sorted(d for d, _, _ in read)  # in document order


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
def test_documents_within_one_window_read_as_whole_documents(tmp_path, text_corpus, sp_tokenizer,
                                                             packing):
    """Against the pipeline before windowed reads: shuffled document indices, each read whole."""
    folder, _ = text_corpus
    config = data_pipeline(sources=[TextFiles(paths=str(folder), split="paragraph")], packing=packing)
    manager = CacheManager(root=str(tmp_path / "c"))
    cache = open_cache(config.sources, config, sp_tokenizer, manager, cache_name_for(config.sources, None))
    docs = split_documents(cache, "train", config.validation_fraction, config.split_seed)
    assert cache.lengths[docs].max() - 1 <= config.window_rows * 48

    def whole(d):
        tokens, _ = cache.document(int(d))
        return {"tokens": tokens, "loss_mask": np.ones(len(tokens), np.float32)}

    ds = grain.MapDataset.source(docs).shuffle(seed=5).repeat().map(whole).to_iter_dataset()
    reference = iter(PackIterDataset(ds, seq_len=48, pad_id=sp_tokenizer.pad_id, method=packing)
                     .batch(4, drop_remainder=True))
    windowed = make("train", folder, sp_tokenizer, tmp_path, seed=5, packing=packing)
    for _ in range(40):
        a, b = next(reference), next(windowed)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def long_corpus(text_corpus):
    """text_corpus plus a file of one ~3,000-word paragraph (no blank line): a long document."""
    folder, paragraphs = text_corpus
    long = " ".join(np.random.default_rng(7).choice(WORDS, 3000))
    (folder / "z_long.txt").write_text(long + "\n")
    return folder, [*paragraphs, long]


def test_long_documents_are_read_in_windows_holding_every_pair_once(tmp_path, long_corpus,
                                                                   sp_tokenizer, monkeypatch):
    folder, paragraphs = long_corpus
    reads = []
    document = TokenCache.document

    def recording(self, d, start=0, stop=None):
        tokens, mask = document(self, d, start, stop)
        reads.append(len(tokens))
        return tokens, mask

    monkeypatch.setattr(TokenCache, "document", recording)
    it = make("train", folder, sp_tokenizer, tmp_path, batch=1, seq_len=16, window_rows=4,
              validation_fraction=0.0)
    docs = [sp_tokenizer.encode(p, add_eos=True) for p in paragraphs]
    assert max(len(d) for d in docs) > 3000
    pairs = collections.Counter(pair for d in docs for pair in zip(d[:-1], d[1:]))
    stream = []  # concat_split keeps window order, so the first epoch is a prefix of the stream
    while len(stream) < sum(pairs.values()):
        b = next(it)
        keep = b["segment_ids"][0] > 0
        stream += zip(b["inputs"][0][keep].tolist(), b["targets"][0][keep].tolist())
    assert collections.Counter(stream[:sum(pairs.values())]) == pairs
    assert max(reads) == 4 * 16 + 1  # never more than one packing window of the long document


@pytest.mark.parametrize("packing", ["concat_split", "padded"])
def test_restore_inside_a_long_document_gives_the_same_next_batches(tmp_path, long_corpus,
                                                                    sp_tokenizer, packing):
    folder, _ = long_corpus
    kwargs = dict(batch=2, seq_len=16, window_rows=2, packing=packing)
    it = make("train", folder, sp_tokenizer, tmp_path, **kwargs)
    for _ in range(101):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(60)]
    fresh = make("train", folder, sp_tokenizer, tmp_path, **kwargs)
    fresh.set_state(state)
    for a, b in zip(expected, (next(fresh) for _ in range(60)), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bad_read_settings_name_the_fix():
    with pytest.raises(ConfigError, match="data_pipeline.max_record_chars=0; use an integer >= 1"):
        data_pipeline(sources=[], max_record_chars=0)
    with pytest.raises(ConfigError, match="data_pipeline.read_prefetch=-1"):
        data_pipeline(sources=[], read_prefetch=-1)
