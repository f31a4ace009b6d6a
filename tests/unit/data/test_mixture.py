"""Weighted mixtures of sources (data_pipeline.mixture_weights): proportions, determinism,
exact resume, validation over every component, bad weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamahome.cache import CacheManager
from llamahome.cli import import_configurables
from llamahome.config import gin_config
from llamahome.data.pipeline import PipelineConfig, data_pipeline, make_data_iterator
from llamahome.data.sources import JsonlFiles, TextFiles
from llamahome.data.tokenizer import load_tokenizer
from llamahome.errors import ConfigError

WORDS = {"a": "the king queen lord shall thou art sweet prince".split(),
         "b": "1 22 333 4444 55 6 77 888 9 0".split()}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, sp_tokenizer):
    """Two folders of paragraphs with disjoint vocabularies, and the token ids only each has."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    ids = {}
    for name, words in WORDS.items():
        paragraphs = [" ".join(rng.choice(words, rng.integers(3, 30))) for _ in range(150)]
        (root / name).mkdir()
        (root / name / "t.txt").write_text("\n\n".join(paragraphs) + "\n")
        ids[name] = set(sp_tokenizer.encode(" ".join(words)))
    only = {"a": ids["a"] - ids["b"], "b": ids["b"] - ids["a"]}
    return root, only


def make(split, corpora, tokenizer, *, weights=(3, 1), seed=0, batch=4):
    root, _ = corpora
    config = PipelineConfig(sources=[TextFiles(paths=str(root / n), split="paragraph")
                                     for n in ("a", "b")], mixture_weights=weights,
                            validation_fraction=0.1)
    return make_data_iterator(split, global_batch_size=batch, seq_len=32, seed=seed,
                              config=config, tokenizer=tokenizer, process_index=0,
                              process_count=1,
                              cache_manager=CacheManager(root=str(root / "cache")))


def sources_of(batches, only, per_segment=False) -> list[str]:
    """Which corpus each row (or each segment of a row) came from: its tokens are of one."""
    found = []
    for b in batches:
        for row, segments in zip(b["inputs"], b["segment_ids"]):
            parts = [s for s in np.unique(segments) if s > 0] if per_segment else [None]
            for s in parts:
                tokens = set(row[segments == s if per_segment else segments > 0].tolist())
                names = [n for n in ("a", "b") if tokens & only[n]]
                assert len(names) == 1, names
                found.append(names[0])
    return found


def test_rows_come_in_the_weighted_proportions(corpora, sp_tokenizer):
    it = make("train", corpora, sp_tokenizer, weights=(0.9, 0.1))
    rows = sources_of([next(it) for _ in range(50)], corpora[1])  # 200 rows
    assert rows.count("b") == 20  # exactly 10%: the pattern is a fixed interleave
    it = make("train", corpora, sp_tokenizer, weights=(1, 1))
    assert sources_of([next(it) for _ in range(10)], corpora[1]).count("a") == 20


def test_mixture_is_seeded_and_resumes_exactly(corpora, sp_tokenizer):
    it = make("train", corpora, sp_tokenizer)
    first = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    expected = [next(it) for _ in range(20)]
    fresh = make("train", corpora, sp_tokenizer)
    for a, b in zip(first, (next(fresh) for _ in range(7))):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    resumed = make("train", corpora, sp_tokenizer)
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(20)), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = next(make("train", corpora, sp_tokenizer, seed=1))
    assert (other["inputs"] != first[0]["inputs"]).any()


def test_validation_reads_every_components_held_out_documents(corpora, sp_tokenizer):
    docs = sources_of(list(make("validation", corpora, sp_tokenizer)), corpora[1],
                      per_segment=True)
    assert docs.count("a") > 0 and docs.count("b") > 0
    assert docs == sorted(docs)  # one component after the other


@pytest.mark.parametrize("weights", [(1.0,), (1.0, 0.0), (1.0, -2.0)])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ConfigError, match="mixture_weights.*one number > 0 per source"):
        PipelineConfig(sources=[TextFiles(paths="a"), TextFiles(paths="b")],
                       mixture_weights=weights)


def test_lora_sft_recipe_binds_the_chat_and_text_mixture(corpora, sp_model_path, tmp_path):
    """gin/train/lora_sft.gin's data (gin/data/chat_mixture.gin): 90% chat, 10% text; its
    tokenizer is the one beside the base (model_files)."""
    import_configurables()  # the recipe binds train, LoRA and optimizer configurables too
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "the king"}]}) + "\n")
    gin_config.parse_config(["gin/train/lora_sft.gin", "gin/models/tiny.gin"], gin_params=[
        f"BASE='{sp_model_path}'", f"CHAT_DATA=['{tmp_path / 'c.jsonl'}']",
        f"TEXT_DATA=['{corpora[0] / 'a'}']"])
    config = data_pipeline()
    assert config.mixture_weights == (0.9, 0.1)
    assert [type(s) for s in config.sources] == [JsonlFiles, TextFiles]
    assert config.sources[0].messages_field == "messages"
    assert load_tokenizer().vocab_size == 32000
