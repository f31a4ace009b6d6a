"""The Grain pipeline: end to end on a folder of text files, checked against direct tokenization;
packing (every pair exactly once); data shards (stacking, padding exhausted ones); rewinding."""

from __future__ import annotations

import collections
import functools
import json
import pickle

import grain
import numpy as np
import pytest

from llamahome.cache import CacheManager
from llamahome.config import gin_config
from llamahome.data import augment
from llamahome.data.pipeline import (
    PACKERS,
    DocumentWindows,
    PackIterDataset,
    PipelineConfig,
    ShardedIterator,
    _ReadWindow,
    cache_name_for,
    data_pipeline,
    local_shards,
    make_data_iterator,
    open_cache,
    open_shards,
    split_documents,
    to_example,
)
from llamahome.data.sources import TextFiles
from llamahome.data.token_cache import TokenCache
from llamahome.data.tokenizer import load_tokenizer
from llamahome.errors import ConfigError
from tests.unit.data.conftest import WORDS


def settings(folder, tokenizer, tmp_path, **cfg) -> dict:
    """The config, tokenizer and cache manager a job builds once and passes."""
    return dict(config=PipelineConfig(sources=[TextFiles(paths=str(folder), split="paragraph")], **cfg),
                tokenizer=tokenizer, cache_manager=CacheManager(root=str(tmp_path / "c")))


def make(split, folder, tokenizer, tmp_path, *, batch=4, seq_len=48, seed=0, index=0, count=1, **cfg):
    return make_data_iterator(split, global_batch_size=batch, seq_len=seq_len, seed=seed,
                              process_index=index, process_count=count,
                              **settings(folder, tokenizer, tmp_path, **cfg))


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


def first_pairs(it, count: int) -> collections.Counter:
    """The first `count` (input, target) pairs a batch-1 iterator yields, padding skipped.

    concat_split keeps read order (documents, or windows of one), so the first epoch of the
    train split is a prefix of this stream."""
    stream = []
    while len(stream) < count:
        b = next(it)
        keep = b["segment_ids"][0] > 0
        stream += zip(b["inputs"][0][keep].tolist(), b["targets"][0][keep].tolist())
    return collections.Counter(stream[:count])


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
    assert first_pairs(it, sum(pairs.values())) == pairs


def test_shakespeare_gin_file(tmp_path, text_corpus, sp_model_path):
    folder, _ = text_corpus
    gin_config.parse_config(["gin/data/shakespeare.gin"], gin_params=[
        f"DATA_DIR='{folder}'", f"TOKENIZER='{sp_model_path}'", f"CacheManager.root='{tmp_path}'"])
    batch = next(make_data_iterator("train", global_batch_size=2, seq_len=16, seed=0,
                                    process_index=0, process_count=1, config=data_pipeline(),
                                    tokenizer=load_tokenizer(), cache_manager=CacheManager()))
    assert batch["inputs"].shape == (2, 16) and batch["inputs"][0, 0] == 1  # starts with BOS


@pytest.mark.parametrize("cap_copies, workers_in_memory", [(2.5, False), (3, True)])
def test_read_workers_hold_the_cache_in_memory_only_when_every_copy_fits(
        tmp_path, text_corpus, sp_tokenizer, cap_copies, workers_in_memory):
    """read_workers=2: this process and 2 workers would hold 3 copies; all 3 must fit the budget."""
    config = PipelineConfig(sources=[TextFiles(paths=str(text_corpus[0]), split="paragraph")],
                            read_workers=2)
    cache = open_cache(config.sources, config, sp_tokenizer, CacheManager(root=str(tmp_path)), "t")
    nbytes = cache.tokens.nbytes
    gin_config.parse_config(gin_params=[f"MemoryLimits.host_ram_bytes = {int(cap_copies * nbytes)}"])
    manager = CacheManager(root=str(tmp_path))  # its memory budget capped by host_ram_bytes
    cache = open_cache(config.sources, config, sp_tokenizer, manager, "t")
    assert cache.in_memory  # one copy fits
    window = _ReadWindow(cache, config.read_workers, manager.memory.budget)
    state = window.__getstate__()
    assert state["budget"] == (manager.memory.budget // 3 if workers_in_memory else 0)
    worker = pickle.loads(pickle.dumps(window))  # what each grain read worker gets
    assert worker._cache.in_memory is workers_in_memory
    assert worker((0, 0, 5))["tokens"].tolist() == window((0, 0, 5))["tokens"].tolist()


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
    config = PipelineConfig(sources=[TextFiles(paths=str(folder), split="paragraph")], packing=packing)
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
    assert first_pairs(it, sum(pairs.values())) == pairs
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
        PipelineConfig(sources=[], max_record_chars=0)
    with pytest.raises(ConfigError, match="data_pipeline.read_prefetch=-1"):
        PipelineConfig(sources=[], read_prefetch=-1)
    with pytest.raises(ConfigError, match="packing='zigzag'; use one of"):
        PipelineConfig(sources=[], packing="zigzag")
    with pytest.raises(ConfigError, match="no data sources: bind data_pipeline.sources"):
        PipelineConfig()


def test_data_pipeline_is_pipeline_config_bound_in_gin():
    gin_config.parse_config(gin_params=["data_pipeline.sources = ['s']", "data_pipeline.window_rows = 3",
                                        "data_pipeline.add_bos = False"])
    config = data_pipeline()
    assert config == PipelineConfig(sources=("s",), window_rows=3, add_bos=False)
    assert config.options.add_bos is False and config.options.add_eos is True
    assert data_pipeline(window_rows=5).window_rows == 5  # an argument wins over the binding


def train_document_order(folder, tokenizer, tmp_path, seed, num_docs, epochs=2):
    """The documents of the first `epochs` train epochs in read order, each as its input tokens.

    concat_split keeps read order, and each document starts with BOS (id 1, never inside a text),
    so splitting the input stream at BOS gives the documents back in the order they were read."""
    it = make("train", folder, tokenizer, tmp_path, batch=8, seq_len=128, seed=seed,
              validation_fraction=0.0)
    inputs = []
    while inputs.count(1) <= epochs * num_docs:
        b = next(it)
        inputs += b["inputs"][b["segment_ids"] > 0].tolist()  # row-major: the stream's order
    starts = [i for i, token in enumerate(inputs) if token == 1]
    docs = [tuple(inputs[a:b]) for a, b in zip(starts, starts[1:])]
    return [docs[e * num_docs:(e + 1) * num_docs] for e in range(epochs)]


def test_train_epochs_are_seeded_permutations_of_the_documents(tmp_path, text_corpus, sp_tokenizer):
    """Each epoch reads every document once, in an order the seed alone decides, not cache order."""
    folder, paragraphs = text_corpus
    cache_order = [tuple(sp_tokenizer.encode(p, add_eos=True)[:-1]) for p in paragraphs]
    first, second = train_document_order(folder, sp_tokenizer, tmp_path, 0, len(paragraphs))
    assert collections.Counter(first) == collections.Counter(cache_order)
    assert collections.Counter(second) == collections.Counter(cache_order)
    assert first != cache_order  # shuffled ...
    assert second != first  # ... again each epoch
    assert train_document_order(folder, sp_tokenizer, tmp_path, 0, len(paragraphs), 1)[0] == first
    assert train_document_order(folder, sp_tokenizer, tmp_path, 1, len(paragraphs), 1)[0] != first


# --- packing -------------------------------------------------------------------------------------

def random_docs(rng, n=40, max_len=90) -> list[np.ndarray]:
    return [rng.integers(3, 1000, size=rng.integers(2, max_len)).astype(np.int32) for _ in range(n)]


def doc_dict(tokens):
    return {"tokens": tokens, "loss_mask": np.ones(len(tokens), np.float32)}


def check_rows(rows, docs, seq_len):
    """Re-derives the pairs of each segment and compares them with the documents (numpy only)."""
    reference = collections.Counter((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))
    seen = collections.Counter()
    doc_strings = ["," + ",".join(map(str, d)) + "," for d in docs]
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        assert np.all(rows["loss_mask"][r][seg == 0] == 0)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert np.array_equal(pos[where], np.arange(len(where)))
            inputs, targets = rows["inputs"][r][where], rows["targets"][r][where]
            assert np.array_equal(inputs[1:], targets[:-1])  # one document, no gap
            piece = ",".join(map(str, [",", *inputs, targets[-1], ","]))[1:-1]
            assert any(piece in d for d in doc_strings)  # a contiguous part of one document
            seen.update(zip(inputs.tolist(), targets.tolist()))
    assert seen == reference


@pytest.mark.parametrize("method", sorted(PACKERS))
def test_packers_keep_every_pair_exactly_once(method):
    rng = np.random.default_rng(0)
    docs = random_docs(rng)
    rows = PACKERS[method]([to_example(doc_dict(d)) for d in docs], 32, pad_id=0)
    assert rows["inputs"].shape[1] == 32
    check_rows(rows, docs, 32)


def test_concat_split_has_no_padding_but_the_tail():
    docs = [np.arange(1, 11), np.arange(20, 27), np.arange(40, 60)]  # 9 + 6 + 19 = 34 pairs
    rows = PACKERS["concat_split"]([to_example(doc_dict(d)) for d in docs], 8, pad_id=0)
    assert rows["segment_ids"].shape == (5, 8)
    assert (rows["segment_ids"] > 0).sum() == 34
    assert rows["segment_ids"][1].tolist() == [1, 2, 2, 2, 2, 2, 2, 3]
    assert rows["positions"][1].tolist() == [0, 0, 1, 2, 3, 4, 5, 0]


def test_fit_packers_use_fewer_rows_than_padded():
    rng = np.random.default_rng(1)
    examples = [to_example(doc_dict(d)) for d in random_docs(rng, n=60, max_len=20)]
    counts = {m: len(PACKERS[m](examples, 64, 0)["inputs"]) for m in PACKERS}
    assert counts["first_fit"] < counts["padded"] and counts["best_fit"] <= counts["first_fit"] + 1


@pytest.mark.parametrize("method", ["concat_split", "first_fit"])
def test_pack_iterator_state_restores_mid_window(method):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, n=100)
    ds = PackIterDataset(grain.MapDataset.source(docs).map(doc_dict).to_iter_dataset(),
                         seq_len=16, pad_id=0, method=method, window_rows=4)
    it = iter(ds)
    rows = [next(it) for _ in range(7)]
    state = it.get_state()
    after = [next(it) for _ in range(30)]
    restored = iter(ds)
    restored.set_state(state)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(after, [next(restored) for _ in range(30)])
               for k in a)
    all_rows = rows + after + list(it)
    check_rows({k: np.stack([r[k] for r in all_rows]) for k in all_rows[0]}, docs, 16)


# --- data shards ---------------------------------------------------------------------------------

def test_local_shards_split_evenly_and_cover_all():
    assert [list(local_shards(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
    assert [list(local_shards(2, p, 2)) for p in range(2)] == [[0], [1]]
    assert list(local_shards(2, 0, 1)) == [0, 1]
    with pytest.raises(ConfigError, match="multiple of the process count"):
        local_shards(3, 0, 2)


class Numbers:
    """Shard k of K: batches [rows, 2] of the numbers n with n % K == k; `config` is
    {shard: how many batches}, in place of a PipelineConfig."""

    def __init__(self, split, *, global_batch_size, seq_len, seed, config, tokenizer,
                 cache_manager, process_index, process_count):
        self.rows, self.k, self.count = global_batch_size // process_count, process_index, process_count
        self.position, self.batches = 0, config[process_index]


    def __next__(self):
        if self.position == self.batches:
            raise StopIteration
        first = self.position * self.rows
        self.position += 1
        n = (np.arange(first, first + self.rows) * self.count + self.k).astype(np.int32)
        return {"inputs": np.stack([n, n], 1), "loss_mask": np.ones((self.rows, 2), np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def numbers(split, *, global_batch_size, batches, **kwargs):
    return open_shards(Numbers, split, global_batch_size=global_batch_size, seq_len=2, seed=0,
                       config=batches, tokenizer=None, cache_manager=None, **kwargs)


def test_one_process_reading_two_shards_sees_what_two_processes_see():
    batches = {0: 3, 1: 3}
    both = numbers("train", global_batch_size=4, num_shards=2, process_index=0, process_count=1,
                   batches=batches)
    halves = [numbers("train", global_batch_size=4, process_index=p, process_count=2,
                      batches=batches) for p in range(2)]
    for _ in range(3):
        stacked = next(both)["inputs"][:, 0]
        assert stacked.tolist() == np.concatenate([next(h)["inputs"][:, 0] for h in halves]).tolist()
    assert both.get_state() == {0: {"position": 3}, 1: {"position": 3}}
    assert halves[1].get_state() == {1: {"position": 3}}


def test_exhausted_validation_shards_give_blank_rows_until_all_are_done():
    shards = numbers("validation", global_batch_size=4, num_shards=2, process_index=0,
                     process_count=1, batches={0: 2, 1: 1})
    first, second = next(shards), next(shards)
    assert first["loss_mask"].sum() == 8
    np.testing.assert_array_equal(second["loss_mask"], [[1, 1], [1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(second["inputs"][2:], 0)
    with pytest.raises(StopIteration):
        next(shards)


def test_state_round_trip_and_batch_divisibility():
    shards = ShardedIterator({0: Numbers("train", global_batch_size=2, seq_len=2, seed=0,
                                         config={0: 5}, tokenizer=None, cache_manager=None,
                                         process_index=0, process_count=1)}, 1)
    next(shards)
    state = shards.get_state()
    expected = next(shards)["inputs"]
    shards.set_state(state)
    np.testing.assert_array_equal(next(shards)["inputs"], expected)
    with pytest.raises(ConfigError, match="not divisible by train.data_shards=3"):
        numbers("train", global_batch_size=4, num_shards=3, batches={})


# --- rewinding the validation split --------------------------------------------------------------

def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_a_rewound_validation_iterator_yields_what_a_fresh_one_does(tmp_path, text_corpus,
                                                                    sp_tokenizer):
    """Built once, rewound per eval: after a partial and after a full pass, set_state of the
    state at creation gives exactly a freshly built iterator's batches."""
    folder, _ = text_corpus
    kwargs = dict(batch=3, seq_len=32, window_rows=2, validation_fraction=0.3)
    fresh = list(make("validation", folder, sp_tokenizer, tmp_path, **kwargs))
    it = make("validation", folder, sp_tokenizer, tmp_path, **kwargs)
    start = it.get_state()
    assert len(fresh) > 5  # several packing windows, a padded last batch
    for k in (1, 2, 5):  # stopped inside and at the end of a packing window
        assert_same_batches([next(it) for _ in range(k)], fresh[:k])
        it.set_state(start)
        assert_same_batches(list(it), fresh)
        it.set_state(start)  # after the pass ran out


def test_a_rewound_sharded_validation_opener_yields_what_a_fresh_one_does(tmp_path, text_corpus,
                                                                          sp_tokenizer):
    folder, _ = text_corpus
    shared = settings(folder, sp_tokenizer, tmp_path, window_rows=2, validation_fraction=0.3)
    open_validation = functools.partial(open_shards, make_data_iterator, "validation",
                                        global_batch_size=4, seq_len=32, seed=0, num_shards=2,
                                        process_index=0, process_count=1, **shared)
    fresh = list(open_validation())
    shards = open_validation()
    start = shards.get_state()
    assert sorted(start) == [0, 1] and len(fresh) > 2
    for k in (1, 2):
        assert_same_batches([next(shards) for _ in range(k)], fresh[:k])
        shards.set_state(start)
        assert_same_batches(list(shards), fresh)
        shards.set_state(start)  # after the pass ran out


def chat_records(rng, n=30) -> list[dict[str, np.ndarray]]:
    """Chat records as the token cache stores them: BOS, then turns; user tokens are ids < 500,
    assistant tokens (content and end of turn) ids >= 500, and the stored mask marks the latter."""
    records = []
    for _ in range(n):
        turns = [[1]]
        for _ in range(rng.integers(1, 4)):
            turns.append(rng.integers(3, 500, size=rng.integers(1, 12)))  # user
            turns.append(rng.integers(500, 1000, size=rng.integers(1, 12)))  # assistant
        tokens = np.concatenate(turns).astype(np.int32)
        records.append({"tokens": tokens, "loss_mask": (tokens >= 500).astype(np.uint8)})
    return records


@pytest.mark.parametrize("method", sorted(PACKERS))
def test_chat_loss_is_on_exactly_the_pairs_whose_target_is_an_assistant_token(method):
    """The model is trained to predict assistant tokens: a pair counts when its target (the next
    token) is an assistant token, as transformers' assistant_masks shifted with the labels."""
    records = chat_records(np.random.default_rng(3))
    rows = PACKERS[method]([to_example(r) for r in records], 16, pad_id=0)
    assistant_targets = (rows["targets"] >= 500) & (rows["segment_ids"] > 0)
    np.testing.assert_array_equal(rows["loss_mask"], assistant_targets.astype(np.float32))
    assert assistant_targets.sum() == sum(int((r["tokens"][1:] >= 500).sum()) for r in records)
