"""The playground: sample text from a run's checkpoint, streamed back chunk by chunk.

Generation itself is `llamahome.infer.generator`'s (`load_generator(run_dir, step=...)`,
`Generator.stream(prompt, ...)`); this module parses the request, keeps the last loaded
checkpoint in memory (loading and compiling take seconds), and serialises requests.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from llamahome.dashboard import run_files
from llamahome.errors import UserError

MAX_PROMPT_CHARS = 8192
MAX_NEW_TOKENS = 1024


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
    def from_json(cls, body: dict) -> SampleRequest:
        """Validates a request body; raises ValueError/TypeError naming the bad field."""
        if not isinstance(body, dict):
            raise TypeError("the body must be a JSON object")
        unknown = set(body) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
        step = body.get("step")
        max_new_tokens = int(body.get("max_new_tokens", cls.max_new_tokens))
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        temperature = float(body.get("temperature", cls.temperature))
        if temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        top_k, top_p = body.get("top_k"), body.get("top_p")
        return cls(step=None if step in (None, "") else int(step), prompt=prompt,
                   max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=None if top_k in (None, "", 0) else int(top_k),
                   top_p=None if top_p in (None, "") else float(top_p),
                   seed=int(body.get("seed", cls.seed)))


def latest_step(run_dir: Path) -> int:
    """The newest committed checkpoint step of a run; UserError when there is none."""
    steps = [c["step"] for c in run_files.list_checkpoints(run_dir)]
    if not steps:
        raise UserError(f"run {run_dir.name} has no checkpoint under {run_dir / run_files.CHECKPOINTS_DIR} "
                        "yet; wait for the first save (CheckpointConfig.save_steps)")
    return steps[-1]


class Playground:
    """Streams sampled text from run checkpoints, one request at a time.

    The last loaded `llamahome.infer.generator.Generator` stays in memory, so asking the same
    checkpoint again costs no load (and reuses its compiled decode step).
    """

    def __init__(self, busy_timeout_s: float = 120.0) -> None:
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()  # a Generator is not thread-safe
        self._key: tuple[str, int] | None = None
        self._generator = None

    def _generator_for(self, run_dir: Path, step: int):
        from llamahome.infer.generator import load_generator  # noqa: PLC0415  (jax: load lazily)

        key = (str(run_dir.resolve()), step)
        if key != self._key:
            self._generator, self._key = None, None  # free the old model before loading
            self._generator = load_generator(run_dir, step=step)
            self._key = key
        return self._generator

    def stream(self, run_dir: Path, sample: SampleRequest) -> Iterator[str]:
        """Yields text chunks as they are decoded; raises UserError for a bad checkpoint."""
        if not self._lock.acquire(timeout=self.busy_timeout_s):
            raise UserError("the playground is busy with another request; try again")
        try:
            step = latest_step(run_dir) if sample.step is None else sample.step
            generator = self._generator_for(run_dir, step)
            yield from generator.stream(sample.prompt, sample.max_new_tokens,
                                        temperature=sample.temperature, top_k=sample.top_k,
                                        top_p=sample.top_p, seed=sample.seed)
        finally:
            self._lock.release()
