"""Two JAX processes on 127.0.0.1 (gloo collectives, 4 fake CPU devices each, FSDP over the 8)
train the tiny model. The reference is always one process with 8 devices reading the same two
data shards (`train.data_shards=2`): the pair's losses equal it, a checkpoint written by the pair
continues in one process, a killed peer stops the survivor within a bound, and the restarted
pair resumes from the last checkpoint.

The pair that trains like one shares no disk, as a pod's hosts: each process has its own HOME,
cache and temp dirs, and the run dir and token cache are on S3 (the moto emulator on loopback);
the killed-peer pair shares a local run dir. A run with everything on a bucket, SIGKILLed and
restarted, gives the reference's losses bit for bit on S3 and on GCS (the emulators)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamahome import store
from llamahome.files import RunDir
from tests.conftest import REPO, tiny_train_params, write_word_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 10
HEARTBEAT_S, WATCHDOG_S, DEATH_BOUND_S = 10, 30, 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    write_word_corpus(root / "txt")
    return root


def flags(workdir: Path, run_dir: Path) -> list[str]:
    gin_params = [*tiny_train_params(workdir / "txt", workdir / "cache", run_dir),
                  f"train.steps={STEPS}", "train.data_shards=2",
                  # Validation shards of 4 and 3 batches: the process with fewer pads the 4th eval step.
                  "data_pipeline.validation_fraction=0.1", "train.eval_every=5", "train.eval_batches=None",
                  "CheckpointConfig.save_steps=5",
                  f"initialize.heartbeat_timeout_seconds={HEARTBEAT_S}", f"Watchdog.timeout_s={WATCHDOG_S}"]
    return ["--gin_file=gin/train/tiny_cpu.gin", *[f"--gin_param={p}" for p in gin_params]]


def env(devices: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def run_one_process(workdir: Path, run_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "llamahome.launch", *flags(workdir, run_dir)],
                            env=env(8), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def run_two_processes(workdir: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """launch/local.sh 2 ...: both processes of the same command, on loopback."""
    result = subprocess.run(["bash", "launch/local.sh", "2", *flags(workdir, run_dir)],
                            env=env(4, PYTHON=sys.executable), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run_dir: Path | str, split: str) -> list[dict]:
    lines = RunDir.view(str(run_dir)).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path | str, split: str = "train") -> dict[int, float]:
    """step -> loss of the last record of each step (a restart rewrites steps)."""
    return {r["step"]: r["loss"] for r in records(run_dir, split)}


def assert_losses_equal(run_dir: Path | str, reference: Path, steps: range) -> None:
    for split in ("train", "eval"):
        got, want = losses(run_dir, split), losses(reference, split)
        keys = [s for s in steps if s in want]
        np.testing.assert_allclose([got[s] for s in keys], [want[s] for s in keys], atol=1e-5,
                                   err_msg=f"{split} losses at steps {keys}")


@pytest.fixture(scope="module")
def reference(workdir):
    run_dir = workdir / "one_process"
    run_one_process(workdir, run_dir)
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert sorted(losses(run_dir, "eval")) == [5, 10]
    return run_dir


@pytest.fixture(scope="module")
def s3_bucket(object_stores):
    """A bucket on the S3 emulator, with this process's environment pointed at it."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in object_stores["s3"].env().items():
            mp.setenv(name, value)
        store.reset_clients()
        yield object_stores["s3"].bucket()
    store.reset_clients()


@pytest.fixture(scope="module")
def two_process_run(workdir, reference, s3_bucket, tmp_path_factory):
    """Two hosts that share no disk: each process has its own HOME, cache and temp dirs; the run
    dir and the token cache are on S3 (the emulator). Returns the run dir's URI."""
    port, procs = free_port(), []
    for i in range(2):
        home = tmp_path_factory.mktemp(f"host{i}")
        (home / "tmp").mkdir()
        host_env = env(4, LLAMAHOME_COORDINATOR=f"127.0.0.1:{port}", LLAMAHOME_NUM_PROCESSES="2",
                       LLAMAHOME_PROCESS_ID=str(i), HOME=str(home), TMPDIR=str(home / "tmp"),
                       XDG_CACHE_HOME=str(home / "cache"))
        host_env.pop("LLAMAHOME_CACHE_DIR")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llamahome.launch", *flags(workdir, workdir / "unused"),
             *on_bucket(s3_bucket, "pair")],
            env=host_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    return f"{s3_bucket}/runs/pair"


def test_two_processes_train_like_one(two_process_run, reference):
    assert_losses_equal(two_process_run, reference, range(1, STEPS + 1))
    # Only process 0 writes metrics, status and configs: one record per step, not two.
    assert [r["step"] for r in records(two_process_run, "train")] == list(range(1, STEPS + 1))
    run = RunDir.view(two_process_run)
    assert json.loads(run.status.read_text())["status"] == "finished"
    assert run.config.is_file() and run.operative_config.is_file()
    # Both processes wrote their data shard's iterator state into the same checkpoint.
    data_iter = run.checkpoints / "5" / "data_iter"
    assert {"shard_0-of-2.json", "shard_1-of-2.json"} <= {p.name for p in data_iter.iterdir()}


def test_checkpoint_of_two_processes_continues_in_one(workdir, two_process_run, reference):
    continued = two_process_run.replace("/runs/pair", "/runs/continued")
    step5 = f"{two_process_run}/checkpoints/5"
    for f in store.files_under(step5):  # the pair's step 5 alone, in a new run dir
        store.put(store.as_path(continued + str(f)[len(two_process_run):]), f.read_bytes())
    result = subprocess.run([sys.executable, "-m", "llamahome.launch",
                             *flags(workdir, workdir / "unused"), *on_bucket_uri(continued)],
                            env=env(8), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(continued)) == list(range(6, STEPS + 1))
    assert_losses_equal(continued, reference, range(6, STEPS + 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_peer_stops_the_survivor_and_the_restarted_pair_resumes(workdir, reference):
    run_dir = workdir / "killed_peer"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "llamahome.launch", *flags(workdir, run_dir)],
                              env=env(4, LLAMAHOME_COORDINATOR=f"127.0.0.1:{port}",
                                      LLAMAHOME_NUM_PROCESSES="2", LLAMAHOME_PROCESS_ID=str(i)),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "5").is_dir():
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 5"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, stderr = procs[0].communicate(timeout=DEATH_BOUND_S + 30)
        took = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode != 0
    assert took < DEATH_BOUND_S, f"the survivor took {took:.0f} s to stop"
    assert "another task died" in stderr or "a peer process has probably died" in stderr, stderr[-3000:]
    written = len(records(run_dir, "train"))
    run_two_processes(workdir, run_dir)
    assert records(run_dir, "train")[written]["step"] == 6  # resumed from the checkpoint at step 5
    assert_losses_equal(run_dir, reference, range(1, STEPS + 1))


# -- pods without a shared disk: every shared thing on a bucket (S3 and GCS emulators) ---------


def on_bucket(bucket: str, name: str) -> list[str]:
    """gin params putting the run dir, the token cache and the models dir on `bucket`."""
    return on_bucket_uri(f"{bucket}/runs/{name}")


def on_bucket_uri(run_uri: str) -> list[str]:
    bucket = run_uri.split("/runs/")[0]
    return [f"--gin_param=launch.run_dir='{run_uri}'",
            f"--gin_param=CacheManager.root='{bucket}/cache'",
            f"--gin_param=models_dir.path='{bucket}/models'"]


def sealed(run_uri: str, step: int) -> bool:
    store.refresh(f"{run_uri}/checkpoints")
    return store.as_path(f"{run_uri}/checkpoints/{step}/llamahome_manifest.json").exists()


def test_sigkill_and_resume_with_everything_on_a_bucket_is_bit_identical(bucket, workdir, reference):
    run_uri, cmd = f"{bucket}/runs/killed", [sys.executable, "-m", "llamahome.launch",
                                             *flags(workdir, workdir / "unused"),
                                             *on_bucket(bucket, "killed")]
    log = workdir / f"killed-{bucket.split(':')[0]}.log"  # a file: a full pipe would block it
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env(8), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 240
        while not sealed(run_uri, 5):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no sealed checkpoint at step 5 on the bucket"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    result = subprocess.run(cmd, env=env(8), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = losses(reference), losses(run_uri)
    assert [got[s] for s in range(6, STEPS + 1)] == [want[s] for s in range(6, STEPS + 1)]  # bit for bit
    assert not (workdir / "unused").exists() and not (REPO / f"{bucket.split(':')[0]}:").exists()
