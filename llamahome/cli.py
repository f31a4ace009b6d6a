"""What `python -m llamahome.launch --gin_file=... --gin_param=...` runs.

Which job runs (train, evaluate, generate, import_hf, build_cache, ...) is itself a gin
binding, `launch.job = @train`, so one command runs every job. Settings are bound in this
order, later winning: gin files, `--config_toml`, the environment (`.env`, `LLAMAHOME_*`),
`--gin_param`. Each run gets a run dir holding the config it ran with (secrets redacted, see
llamahome/secrets.py), locked against a second job for as long as the job runs (see
llamahome/files.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import itertools
import logging
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gin
import jax
from absl import app, flags
from absl import logging as absl_logging

import llamahome
from llamahome import secrets, store
from llamahome.cache import apply_memory_limits, enable_compilation_cache
from llamahome.config import gin_config, validate
from llamahome.errors import ConfigError, UserError
from llamahome.files import (RunDir, RunDirBusy, RunDirSync, hold, runs_dir, save_config,
                             sigterm_exits)
from llamahome.jobs import JOBS, describe_jobs, job, needs_run_dir
from llamahome.launch import allocator_name, describe_allocator
from llamahome.parallel import distributed

FLAGS = flags.DEFINE_multi_string("gin_file", [], "Gin files to parse, in order.")
PARAMS = flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'train.steps=100'.")
TOML = flags.DEFINE_string("config_toml", None,
                           "A TOML settings file; see llamahome/config/gin_config.py.")
DOTENV = flags.DEFINE_string("env_file", ".env", "A .env file to load at start if it exists.")


def import_configurables() -> None:
    """Imports every llamahome module so that all gin configurables and jobs are registered."""
    for module in pkgutil.walk_packages(llamahome.__path__, prefix="llamahome."):
        importlib.import_module(module.name)


def new_run_dir(create: bool = False) -> store.AnyPath:
    """A fresh `runs/<timestamp>[-n]`; `create` makes it, so two jobs started at once never share it.

    Under a URI nothing is made (object storage has no folders): the first name with no object
    under it is taken, and the run dir lock stops a second job that picked the same name."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = runs_dir()
    for n in itertools.count(1):
        run_dir = root / (stamp if n == 1 else f"{stamp}-{n}")
        if store.is_remote(run_dir) or not create:
            store.refresh(run_dir)
            if not run_dir.exists():
                return run_dir
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
    raise AssertionError("unreachable")


@gin.configurable
def launch(job: Callable[..., object] = gin.REQUIRED, run_dir: str | None = None,
           write_config: bool = True) -> object:
    """Runs `job(run_dir=...)` in a fresh or given run dir, saving the config it runs with.

    A job declared `@job(run_dir=False)` (env_info, models, dashboard) gets `run_dir=None` and
    no run dir is made, unless `launch.run_dir` is bound. The operative config (what the job
    used) is written when the job ends, also when it fails.

    A run dir on object storage (`gs://`, `s3://`): process 0 checks it can write there before
    anything else, takes the lock on the store, and writes the run's small files through a
    staging folder that `RunDirSync` uploads while the job runs and once more when it ends
    (llamahome/files.py `RunDir`); the job still gets the URI as `run_dir`.
    """
    apply_memory_limits()  # XLA_PYTHON_CLIENT_* must be set before JAX starts its backend
    distributed.initialize()
    enable_compilation_cache()
    if not run_dir and not needs_run_dir(job):
        return job(run_dir=None)
    is_writer = distributed.is_coordinator()
    # Every process of a pod must use process 0's run dir; each would name a new one differently.
    run_path = store.as_path(run_dir or _shared(lambda: _checked_new_run_dir(write_config),
                                                is_writer))
    take = is_writer and write_config
    with _locked(run_path, take), _synced(run_path, is_writer):
        if take:
            save_config(run_path, RunDir.CONFIG_FILE, gin.config_str())
        absl_logging.info("run dir: %s", store.show(run_path))
        absl_logging.info("host allocator: %s", describe_allocator())
        warn_redacted_bindings()
        try:
            return job(run_dir=str(run_path))
        finally:
            if take:
                save_config(run_path, RunDir.OPERATIVE_CONFIG_FILE, gin.operative_config_str())


def _checked_new_run_dir(create: bool) -> str:
    """`new_run_dir`, once the runs dir is known writable (a bucket: one line if it is not)."""
    store.check_access(runs_dir())
    return str(new_run_dir(create=create))


_REFUSED = "\0refused: "


def _shared(make: Callable[[], str], is_writer: bool) -> str:
    """`make()` in process 0, handed to every process; a UserError there stops every process."""
    answer = ""
    if is_writer:
        try:
            answer = make()
        except UserError as e:
            if jax.process_count() == 1:
                raise
            answer = _REFUSED + str(e)
    answer = distributed.from_coordinator(answer)
    if answer.startswith(_REFUSED):
        raise UserError(answer[len(_REFUSED):])
    return answer


@contextlib.contextmanager
def _locked(run_dir: store.AnyPath, take: bool) -> Iterator[None]:
    """Holds the run dir's lock when `take`; on a pod every process stops if process 0 could not.

    A run dir on object storage is first probed for access (one line naming the bucket and the
    cause), so nothing is written where it cannot all be written."""
    with contextlib.ExitStack() as stack:
        refusal, error = "", None
        if take:
            try:
                store.check_access(run_dir)
                stack.enter_context(hold(run_dir))
            except UserError as e:
                refusal, error = str(e), e
        if refusal := distributed.from_coordinator(refusal):
            if error is not None:
                raise error
            raise RunDirBusy(refusal)
        yield


@contextlib.contextmanager
def _synced(run_dir: store.AnyPath, is_writer: bool) -> Iterator[None]:
    """For a remote run dir in process 0: its staged files uploaded while the job runs and at the
    end, SIGTERM turned into an exit that still uploads."""
    if not (is_writer and store.is_remote(run_dir)):
        yield
        return
    with RunDirSync(run_dir), sigterm_exits():
        yield


def warn_redacted_bindings() -> None:
    """Warns about each binding that still holds a secret redacted when a config was saved."""
    for name in secrets.redacted_bindings(gin.config_str()):
        absl_logging.warning("%s holds %r: a secret removed when a config was saved; bind the real "
                             "value with --gin_param (secrets such as HF_TOKEN come from the "
                             "environment)", name, secrets.REDACTED)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        time = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        return secrets.redact(f"{time} {record.levelname[0]} {_source(record)}] {record.getMessage()}")


def _source(record: logging.LogRecord) -> str:
    """'llamahome.train.loop' style names for absl records (absl names every logger 'absl')."""
    path = Path(record.pathname)
    if "llamahome" in path.parts:
        parts = path.with_suffix("").parts
        return ".".join(parts[len(parts) - 1 - parts[::-1].index("llamahome"):])
    return record.name if record.name not in ("absl", "root") else path.stem


# Libraries whose INFO lines are noise at the default verbosity (orbax logs every save step
# by step; gin logs each include path it tries). `--verbosity=1` shows them.
_CHATTY = ("orbax", "gin", "jax", "grain", "etils", "tensorstore")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and "gin" not in Path(record.pathname).parts:
            return True
        if absl_logging.get_verbosity() >= absl_logging.DEBUG:
            return True
        return not any(part in _CHATTY for part in Path(record.pathname).parts)


def setup_logging() -> None:
    """absl logging with 'HH:MM:SS L module] message' lines, secrets redacted, libraries quiet."""
    handler = absl_logging.get_absl_handler()
    handler.setFormatter(_Formatter())
    handler.addFilter(_QuietLibraries())
    absl_logging.use_absl_handler()
    logging.getLogger().addFilter(_QuietLibraries())


def bind_all(gin_files: Sequence[str], gin_params: Sequence[str], toml_path: str | None,
             env_file: str | None) -> None:
    """Binds gin files < TOML < environment < gin params (see llamahome/config/gin_config.py)."""
    if env_file:
        gin_config.load_dotenv(Path(env_file))
    import_configurables()
    toml_bindings = gin_config.toml_to_bindings(Path(toml_path)) if toml_path else []
    gin_config.parse_config(gin_files, toml_bindings, gin_config.env_bindings(), gin_params)
    validate.validate_config()


def require_job() -> None:
    """A clear error when no gin file bound `launch.job`, listing the jobs there are."""
    try:
        gin.query_parameter("launch.job")
    except ValueError:
        raise ConfigError("no job to run: bind one, e.g. --gin_param='launch.job=@train' or a gin "
                          f"file from gin/; jobs: {', '.join(sorted(JOBS))}") from None


_GIN_CALL_CONTEXT = re.compile(r"\n\s*In call to configurable '[^\n]*")


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; settings go in --gin_param", file=sys.stderr)
        return 2
    setup_logging()
    try:
        bind_all(FLAGS.value, PARAMS.value, TOML.value, DOTENV.value)
        require_job()
        launch()
    except UserError as e:
        message = _GIN_CALL_CONTEXT.sub("", str(e))  # the error says where; gin's frames are noise
        print(f"error: {secrets.redact(message)}", file=sys.stderr)
        return 2
    return 0


def _redacted_excepthook(kind, value, tb) -> None:
    sys.stderr.write(secrets.redact("".join(traceback.format_exception(kind, value, tb))))


def usage() -> str:
    """What `--help` prints: the command, its flags, the jobs and where their gin files are."""
    import_configurables()  # every job registers itself when its module is imported
    gin_dir = gin_config.REPO_GIN_DIR
    width = max(len(name) for name, _ in describe_jobs())
    flag_lines = [f"  --{f.name}: {flags.FLAGS[f.name].help.split(';')[0]}"
                  for f in (FLAGS, PARAMS, TOML, DOTENV)]
    job_lines = [f"  {name:<{width}}  {doc}" for name, doc in describe_jobs()]
    return "\n".join([
        "usage: python -m llamahome.launch --gin_file=FILE [--gin_file=...] [--gin_param='x.y=1' ...]",
        "       [--config_toml=FILE] [--env_file=.env] [--verbosity=1]",
        "",
        "Runs one job, chosen by the gin binding launch.job (each gin/jobs/<job>.gin binds it).",
        "Settings bind in this order, later winning: gin files, TOML, environment, --gin_param.",
        "",
        "flags:", *flag_lines, "  --verbosity: 1 also shows the libraries' INFO logs",
        "  --helpfull: every absl flag",
        "",
        "jobs (launch.job = @<job>):", *job_lines,
        "",
        f"gin files (looked up as given, then under {gin_dir}):",
        "  jobs/<job>.gin, train/<recipe>.gin (quickstart, tiny_cpu, ...), models/<size>.gin,",
        "  data/<set>.gin, train/parallel/<preset>.gin",
        "example: python -m llamahome.launch --gin_file=gin/train/quickstart.gin",
    ])


@job(run_dir=False)
def env_info(run_dir: str | None = None) -> dict[str, object]:
    """Prints the JAX backend, devices and library versions: the first thing to run on a new machine."""
    del run_dir  # it prints; nothing to keep
    info = {
        "llamahome": llamahome.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "process": f"{jax.process_index()}/{jax.process_count()}",
        "devices": [str(d) for d in jax.devices()],
        "host_allocator": allocator_name(),
    }
    for key, value in info.items():
        absl_logging.info("%s: %s", key, value)
    return info


def run() -> None:
    if any(arg in ("--help", "-h", "-?", "--helpshort") for arg in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    sys.excepthook = _redacted_excepthook  # a traceback may quote a signed URL or a token
    app.run(lambda argv: sys.exit(main(argv)))

