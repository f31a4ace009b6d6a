"""Shared fixtures. XLA_FLAGS must be set before jax initialises its backend, so the device
count for the whole session is chosen here: 8 fake CPU devices unless the caller set XLA_FLAGS.
Tests that need a specific count can run a subprocess (see `run_python`)."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests never write the user's caches: the cache root (token caches, corpora, models, JAX's
# compilation cache, which every launch turns on) is a temporary folder for the session, in
# this process (llamahome.files reads XDG_CACHE_HOME) and in every subprocess (launch binds
# LLAMAHOME_CACHE_DIR / LLAMAHOME_MODELS_DIR, which also win over a .env file).
TEST_CACHE_HOME = Path(tempfile.mkdtemp(prefix="llamahome-tests-cache-"))
atexit.register(shutil.rmtree, TEST_CACHE_HOME, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = str(TEST_CACHE_HOME)
os.environ["LLAMAHOME_CACHE_DIR"] = str(TEST_CACHE_HOME / "llamahome")
os.environ["LLAMAHOME_MODELS_DIR"] = str(TEST_CACHE_HOME / "llamahome" / "models")

import gin  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_gin():
    """Each test starts and ends with no gin bindings."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def object_stores():
    """The S3 (moto) and GCS (gcp-storage-emulator) emulators on 127.0.0.1, for the session."""
    from tests.object_store import emulators

    with emulators() as stores:
        yield stores


@pytest.fixture(params=["s3", "gs"])
def bucket(request, object_stores, monkeypatch) -> str:
    """A fresh, empty bucket on each emulator (`s3://...`, `gs://...`), with this process's
    environment pointed at that emulator (subprocesses inherit it)."""
    from llamahome import store

    emulator = object_stores[request.param]
    for name, value in emulator.env().items():
        monkeypatch.setenv(name, value)
    store.reset_clients()
    yield emulator.bucket()
    store.reset_clients()


@pytest.fixture
def eight_devices():
    """The 8 fake CPU devices of this session (skips if XLA_FLAGS was overridden)."""
    import jax  # noqa: PLC0415

    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip(f"needs 8 devices, have {len(devices)}; run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return devices[:8]


def run_python(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Runs `python args...` in a subprocess with the repo importable; returns the result."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([sys.executable, *args], env=full_env, cwd=cwd or REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr}")
    return result


def launch_job(gin_file: str, *params: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llamahome.launch --gin_file=<gin_file> --gin_param=<p>...` as a user runs it."""
    return run_python(["-m", "llamahome.launch", f"--gin_file={gin_file}",
                       *[f"--gin_param={p}" for p in params]], env={"XLA_FLAGS": ""}, timeout=timeout)


def assert_refused_in_one_line(result: subprocess.CompletedProcess, names: str) -> str:
    """A job that refused its input: exit 2, no traceback, one error line, naming `names`."""
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and names in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


@pytest.fixture
def python_runner():
    return run_python


# The tiny training runs of the integration tests: a corpus of random words, Mistral v1's
# SentencePiece model (shipped in the mistral_common package), gin/train/tiny_cpu.gin.
CORPUS_WORDS = ("the king queen crown sword love death night day rose thou art fair sweet heart "
                "speak").split()


def sp_tokenizer_path() -> Path:
    """Mistral v1's 32k SentencePiece model (the Llama layout: bos 1, eos 2)."""
    import mistral_common  # noqa: PLC0415

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_word_corpus(directory: Path, words: Sequence[str] = CORPUS_WORDS, paragraphs: int = 300,
                      seed: int = 0) -> Path:
    """Writes `directory`/corpus.txt: paragraphs of 5-40 random `words`, blank-line separated."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "."
                        for _ in range(paragraphs))
    (directory / "corpus.txt").write_text(text)
    return directory


def tiny_train_params(corpus_dir: Path, cache_dir: Path, run_dir: Path) -> list[str]:
    """gin params pointing gin/train/tiny_cpu.gin at a test corpus, cache and run dir."""
    return [f"DATA_DIR='{corpus_dir}'", f"TOKENIZER='{sp_tokenizer_path()}'",
            f"CacheManager.root='{cache_dir}'", f"launch.run_dir='{run_dir}'",
            "train.progress_bar=False"]


def tiny_train_command(workdir: Path, run_dir: Path, *params: str,
                       gin_file: str = "gin/train/tiny_cpu.gin") -> list[str]:
    """The launch argv training `gin_file` on `workdir`/txt (cache in `workdir`/cache), `params` last."""
    gin_params = [*tiny_train_params(workdir / "txt", workdir / "cache", run_dir), *params]
    return [sys.executable, "-m", "llamahome.launch", f"--gin_file={gin_file}",
            *[f"--gin_param={p}" for p in gin_params]]


@contextlib.contextmanager
def serving(app, timeout_s: float = 20.0) -> Iterator[str]:
    """Serves the ASGI `app` with uvicorn on a free 127.0.0.1 port in a thread; yields its URL."""
    import uvicorn

    from llamahome import net

    sock = net.listen("127.0.0.1", 0, setting="test", public_hint="tests serve loopback only")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield net.url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
