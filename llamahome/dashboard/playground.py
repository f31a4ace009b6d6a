"""The playground: sample text from a run's checkpoint, streamed back chunk by chunk.

Generation itself is `llamahome.infer.generator`'s (`load_generator(run_dir, step=...)`,
`Generator.stream(prompt, ...)`), which decodes on the serving engine (llamahome/infer/engine.py),
so the playground's text equals the `generate` job's and the `serve` job's for the same request;
this module parses the request, keeps the last loaded checkpoint in memory (loading and
compiling take seconds), and serialises requests.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from llamahome.dashboard import run_files
from llamahome.errors import UserError
from llamahome.files import RunDir
from llamahome.infer.generator import load_generator

MAX_PROMPT_CHARS = 8192
MAX_NEW_TOKENS = 1024
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1  # the sampler holds top_k in an int32
MAX_SEED = 2**32 - 1
MAX_STEP = 2**63 - 1


class FieldError(ValueError):
    """A request field with a bad value; the message names the field and what it must be."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _integer(body: dict, field: str, default: int | None, low: int, high: int,
             off: str = "") -> int | None:
    """body[field], an int in [low, high]; `default` when absent or null."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(field, f"{field} must be an integer in [{low}, {high}]{off}")
    return value


def _number(body: dict, field: str, default: float | None, low: float, high: float,
            must_be: str, *, low_open: bool = False) -> float | None:
    """body[field], a finite float in [low, high] (low excluded if low_open); `default` if absent/null."""
    value = body.get(field)
    if value is None:
        return default
    error = FieldError(field, f"{field} must be {must_be}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the float range
        raise error from None
    if not math.isfinite(value) or not (low < value if low_open else low <= value) or value > high:
        raise error
    return value


def _prompt(body: dict) -> str:
    prompt = body.get("prompt", "")
    message = f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters"
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise FieldError("prompt", message)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (`"\ud800"` in the JSON)
        raise FieldError("prompt", f"{message} of valid Unicode (no lone surrogates)") from None
    return prompt


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What the playground form posts."""

    step: int | None  # None: the latest checkpoint
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @classmethod
    def from_json(cls, body: object) -> SampleRequest:
        """Validates a parsed request body; raises FieldError (a ValueError) naming the bad field.

        Absent and null fields take their defaults; numbers must be JSON numbers of the right
        kind and range (no strings, no booleans, nothing non-finite).
        """
        if not isinstance(body, dict):
            raise FieldError("body", "the body must be a JSON object")
        fields = [f.name for f in dataclasses.fields(cls)]
        if unknown := sorted(set(body) - set(fields)):
            raise FieldError(unknown[0], f"unknown fields {unknown}; the fields are {fields}")
        return cls(
            step=_integer(body, "step", None, 0, MAX_STEP, " (null: the latest checkpoint)"),
            prompt=_prompt(body),
            max_new_tokens=_integer(body, "max_new_tokens", cls.max_new_tokens, 1, MAX_NEW_TOKENS),
            temperature=_number(body, "temperature", cls.temperature, 0.0, MAX_TEMPERATURE,
                                f"a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy)"),
            top_k=_integer(body, "top_k", None, 0, MAX_TOP_K, " (0 or null: off)") or None,
            top_p=_number(body, "top_p", None, 0.0, 1.0, "a number in (0, 1] (null: off)",
                          low_open=True),
            seed=_integer(body, "seed", cls.seed, 0, MAX_SEED))


def checkpoint_step(run_dir: Path, step: int | None) -> int:
    """`step` if it is a committed checkpoint of the run, else UserError; None: the newest."""
    steps = [c["step"] for c in run_files.list_checkpoints(run_dir)]
    if not steps:
        raise UserError(f"run {run_dir.name} has no checkpoint under {RunDir(run_dir).checkpoints} "
                        "yet; wait for the first save (CheckpointConfig.save_steps)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"run {run_dir.name} has no checkpoint at step {step}; its checkpoints "
                        f"are at steps {steps}")
    return step


def check_no_symlink_out(run_dir: Path, step: int) -> None:
    """UserError if loading `step` would read a file through a symlink to outside the run dir."""
    run = RunDir(run_dir)
    read = [run.config, run.operative_config, run.checkpoints / str(step)]
    if (link := run_files.escaping_symlink(run_dir, read)) is not None:
        raise UserError(f"{link} is a symlink to outside the run dir {run_dir}; the dashboard "
                        "does not follow it (copy the files into the run dir)")


def load_run_generator(run_dir: Path, step: int):
    """The generator of `run_dir` at checkpoint `step`: what a Playground loads by default."""
    return load_generator(run_dir, step=step)


class Playground:
    """Streams sampled text from run checkpoints, one request at a time.

    The last loaded `llamahome.infer.generator.Generator` stays in memory, so asking the same
    checkpoint again costs no load (and reuses its compiled decode step). `load(run_dir,
    step)` makes a Generator; tests pass a fake.
    """

    def __init__(self, busy_timeout_s: float = 120.0,
                 load: Callable[[Path, int], object] = load_run_generator) -> None:
        self.busy_timeout_s = busy_timeout_s
        self._load = load
        self._lock = threading.Lock()  # a Generator is not thread-safe
        self._key: tuple[str, int] | None = None
        self._generator = None

    def _generator_for(self, run_dir: Path, step: int):
        key = (str(run_dir.resolve()), step)
        if key != self._key:
            self._generator, self._key = None, None  # free the old model before loading
            self._generator = self._load(run_dir, step)
            self._key = key
        return self._generator

    def stream(self, run_dir: Path, sample: SampleRequest) -> Iterator[str]:
        """Yields text chunks as they are decoded; raises UserError for a bad checkpoint."""
        if not self._lock.acquire(timeout=self.busy_timeout_s):
            raise UserError("the playground is busy with another request; try again")
        try:
            step = checkpoint_step(run_dir, sample.step)
            check_no_symlink_out(run_dir, step)
            generator = self._generator_for(run_dir, step)
            yield from generator.stream(sample.prompt, sample.max_new_tokens,
                                        temperature=sample.temperature, top_k=sample.top_k,
                                        top_p=sample.top_p, seed=sample.seed)
        finally:
            self._lock.release()
