"""Checks every gin binding of a llamahome configurable after gin binds and before any job runs.

Three checks, each raising a one-line `ConfigError` such as
"train.steps='abc': expected an integer >= 1":

1. Type: the bound value against the parameter's annotation (int, float, bool, str, None,
   unions, Literal, sequences, dicts, callables, classes). An int is a float; a bool is not
   an int; a float must be finite; a string is not a sequence of strings.
2. Range: `RULES` below, one entry per function argument with a limit ("train.steps": >= 1).
3. Dataclass configs (`LlamaConfig`, `SamplerConfig`) check their own fields, across fields
   too, in `__post_init__`; each one bound in gin is built here once so that runs first.

Values built by references (`@TextFiles()`) are checked by their own configurable's bindings.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin

from llamahome.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which values of a setting are allowed, and how to say so ("> 0", "in [0, 1)")."""

    allows: Callable[[Any], bool]
    text: str | Callable[[], str]  # a callable when the words need a lookup (`one_of`)
    names_choices: bool = False  # the text says it all: "one of ('stop', 'skip')"

    def describe(self) -> str:
        return self.text() if callable(self.text) else self.text


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def positive() -> Rule:
    return Rule(lambda v: v > 0, "> 0")


def in_range(low: float, high: float, *, high_included: bool = False) -> Rule:
    """low <= v < high, or <= high."""
    if high_included:
        return Rule(lambda v: low <= v <= high, f"in [{low}, {high}]")
    return Rule(lambda v: low <= v < high, f"in [{low}, {high})")


def one_of(constant: str) -> Rule:
    """A value among `module.CONSTANT`'s items or keys, looked up when checked (no import cycle)."""
    module, name = constant.rsplit(".", 1)
    choices = lambda: tuple(getattr(importlib.import_module(module), name))  # noqa: E731
    return Rule(lambda v: v in choices(), lambda: f"one of {choices()}", names_choices=True)


def mesh_axis() -> Rule:
    return Rule(lambda v: v >= 1 or v == -1, ">= 1, or -1 (the devices left over)")


# Limits of function arguments, "<configurable>.<parameter>": Rule. Dataclass configs keep
# theirs in __post_init__; test_validate checks that every key names a real parameter.
RULES: dict[str, Rule] = {
    # train (llamahome/train/job.py)
    "train.steps": at_least(1),
    "train.batch_size": at_least(1),
    "train.seq_len": at_least(1),
    "train.learning_rate": at_least(0),  # 0 trains nothing: a run that only measures its loss
    "train.gradient_accumulation_steps": at_least(1),
    "train.seed": at_least(0),
    "train.eval_every": at_least(0),
    "train.eval_batches": at_least(1),
    "train.log_every": at_least(1),
    "train.z_loss": at_least(0),
    "train.nan_policy": one_of("llamahome.train.loop.NAN_POLICIES"),
    "train.data_shards": at_least(1),
    "train.loss_chunk_length": at_least(0),
    "CheckpointConfig.save_steps": at_least(1),
    "CheckpointConfig.keep_last_n": at_least(1),
    # optimizers and schedules (llamahome/train/optim.py)
    "build_optimizer.learning_rate": at_least(0),
    "build_optimizer.total_steps": at_least(1),
    "build_optimizer.clip_norm": positive(),
    "constant.warmup_steps": at_least(0),
    "warmup_cosine.warmup_steps": at_least(0),
    "warmup_cosine.end_factor": in_range(0, 1, high_included=True),
    "warmup_linear.warmup_steps": at_least(0),
    "warmup_linear.end_factor": in_range(0, 1, high_included=True),
    "warmup_stable_decay.warmup_steps": at_least(0),
    "warmup_stable_decay.decay_fraction": in_range(0, 1, high_included=True),
    "warmup_stable_decay.end_factor": in_range(0, 1, high_included=True),
    "adamw.b1": in_range(0, 1),
    "adamw.b2": in_range(0, 1),
    "adamw.eps": positive(),
    "adamw.weight_decay": at_least(0),
    "lion.b1": in_range(0, 1, high_included=True),
    "lion.b2": in_range(0, 1, high_included=True),
    "lion.weight_decay": at_least(0),
    "adafactor.decay_rate": in_range(0, 1, high_included=True),
    "adafactor.clipping_threshold": positive(),
    "adafactor.weight_decay": at_least(0),
    "sgd.momentum": in_range(0, 1),
    "sgd.weight_decay": at_least(0),
    # data (llamahome/data/)
    "data_pipeline.validation_fraction": in_range(0, 1),
    "data_pipeline.packing": one_of("llamahome.data.pipeline.PACKERS"),
    "data_pipeline.window_rows": at_least(1),
    "data_pipeline.build_workers": at_least(0),
    "data_pipeline.read_workers": at_least(0),
    "fim.rate": in_range(0, 1, high_included=True),
    "fim.spm_rate": in_range(0, 1, high_included=True),
    "fim.keep_first": at_least(0),
    "fim.keep_last": at_least(0),
    "random_crop.max_tokens": at_least(1),
    "token_noise.p": in_range(0, 1, high_included=True),
    "token_noise.vocab_size": at_least(1),
    "HFDiskDataset.rows_per_shard": at_least(1),
    "corpus_tokenizer.vocab_size": at_least(1),
    "corpus_tokenizer.min_frequency": at_least(1),
    "train_tokenizer.vocab_size": at_least(1),
    "train_tokenizer.min_frequency": at_least(1),
    "build_cache.num_workers": at_least(1),
    "CacheManager.policy": one_of("llamahome.cache.POLICIES"),
    "compilation_cache.min_compile_time_secs": at_least(0),
    # inference (llamahome/infer/jobs.py)
    "evaluate.batch_size": at_least(1),
    "evaluate.seq_len": at_least(1),
    "evaluate.max_batches": at_least(1),
    "evaluate.step": at_least(0),
    "evaluate.seed": at_least(0),
    "generate.max_new_tokens": at_least(1),
    "generate.batch_size": at_least(1),
    "generate.step": at_least(0),
    "generate.seed": at_least(0),
    # parallelism and hosts (llamahome/parallel/, llamahome/hub/)
    "build_mesh.data": mesh_axis(),
    "build_mesh.fsdp": mesh_axis(),
    "build_mesh.tensor": mesh_axis(),
    "axis_rules.preset": one_of("llamahome.parallel.mesh.PRESETS"),
    "initialize.num_processes": at_least(1),
    "initialize.process_id": at_least(0),
    "initialize.initialization_timeout": at_least(1),
    "initialize.heartbeat_timeout_seconds": at_least(1),
    "initialize.shutdown_timeout_seconds": at_least(1),
    "Watchdog.timeout_s": positive(),
    "Watchdog.poll_s": positive(),
    "Profiler.start_step": at_least(0),
    "Profiler.end_step": at_least(0),
    "MemoryLimits.device_memory_fraction": Rule(lambda v: 0 < v <= 1, "in (0, 1]"),
    "MemoryLimits.host_ram_bytes": at_least(1),
    "StorageBudget.max_bytes": at_least(0),
    "models.action": one_of("llamahome.hub.jobs.ACTIONS"),
    "peak_flops.per_device": positive(),
    "dashboard.port": in_range(0, 65535, high_included=True),
    "dashboard.stale_after_s": positive(),
    "quickstart.vocab_size": at_least(1),
}

# Annotations that allow any value.
_OPAQUE = (typing.Any, object)


class _Check(typing.NamedTuple):
    """Whether a value fits an annotation, and the annotation in words ("an integer")."""

    fits: Callable[[Any], bool]
    text: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_SCALARS: dict[Any, _Check] = {
    int: _Check(_is_int, "an integer"),
    float: _Check(_is_number, "a finite number"),
    bool: _Check(lambda v: isinstance(v, bool), "True or False"),
    str: _Check(lambda v: isinstance(v, str), "a string"),
    type(None): _Check(lambda v: v is None, "None"),
    Path: _Check(lambda v: isinstance(v, (str, Path)), "a path string"),
}
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)
_MAPPINGS = (dict, collections.abc.Mapping)
_PLURALS = {"an integer": "integers", "a finite number": "finite numbers", "a string": "strings",
            "True or False": "booleans", "a path string": "path strings"}


def check_for(annotation: Any) -> _Check:
    """The check of a value against a resolved annotation; TypeError for one it cannot check."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _OPAQUE or isinstance(annotation, typing.TypeVar):
        return _Check(lambda v: True, "anything")
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if annotation is None:
        return _SCALARS[type(None)]
    if origin in (typing.Union, types.UnionType):
        checks = [check_for(a) for a in args]
        texts = [c.text for c in checks if c.text != "None"] + ["None"] * (type(None) in args)
        return _Check(lambda v: any(c.fits(v) for c in checks), ", or ".join(texts))
    if origin is typing.Literal:
        return _Check(lambda v: v in args, f"one of {args}")
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        items = tuple(a for a in args if a is not Ellipsis)  # tuple[int, ...] or tuple[int, str]
        item = check_for(typing.Union[items]) if items else None
        noun = f"a list of {_PLURALS.get(item.text, item.text)}" if item else "a list"
        return _Check(lambda v: (isinstance(v, (list, tuple))
                                 and (item is None or all(_fits(item, x) for x in v))), noun)
    if annotation in _MAPPINGS or origin in _MAPPINGS:
        value = check_for(args[1]) if args else None
        return _Check(lambda v: (isinstance(v, dict)
                                 and (value is None or all(_fits(value, x) for x in v.values()))),
                      "a dict")
    if annotation is collections.abc.Callable or origin is collections.abc.Callable:
        return _Check(callable, "a reference to a function (@name)")
    if inspect.isclass(annotation):
        if getattr(annotation, "_is_protocol", False):
            return _Check(lambda v: True, f"a {annotation.__name__}")
        name = annotation.__name__
        return _Check(lambda v: isinstance(v, annotation), f"a {name} (@{name}())")
    raise TypeError(f"cannot check values against the annotation {annotation!r}")


def _fits(check: _Check, value: Any) -> bool:
    return _is_reference(value) or check.fits(value)


def _is_reference(value: Any) -> bool:
    return isinstance(value, gin.config.ConfigurableReference)


def parameter_types(configurable: Any) -> dict[str, Any]:
    """{parameter: resolved annotation} of a registered configurable (its annotated ones)."""
    fn = configurable.wrapped
    signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    namespace = vars(sys.modules[fn.__module__])
    types_ = {}
    for name, param in signature.parameters.items():
        if name == "self" or param.annotation is inspect.Parameter.empty:
            continue
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = eval(annotation, namespace)  # noqa: S307  (a module's own annotation)
        types_[name] = annotation
    return types_


def _is_llamahome(configurable: Any) -> bool:
    return (configurable.module or "").split(".")[0] == "llamahome"


def llamahome_configurables() -> list[Any]:
    """Every registered gin configurable defined in llamahome."""
    return [c for _, c in sorted(gin.config._REGISTRY.items()) if _is_llamahome(c)]


def resolve(value: Any) -> Any:
    """`value` with macros (%NAME) and gin constants replaced by what they are bound to."""
    if _is_reference(value):
        wrapped, scope = value.configurable.wrapped, "/".join(value.scopes)
        if wrapped is gin.config.macro:
            return resolve(gin.config._CONFIG.get((scope, "gin.macro"), {}).get("value"))
        if wrapped is gin.config._retrieve_constant:
            return gin.config._CONSTANTS.get(scope)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v) for v in value)
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    return value


def check_value(name: str, annotation: Any, value: Any) -> None:
    """Raises ConfigError unless `value`, bound as `name` ("train.steps"), fits type and rule."""
    if _is_reference(value):
        return
    check, rule = check_for(annotation), RULES.get(name.rsplit("/", 1)[-1])
    expected = check.text
    if rule:  # the rule speaks of the non-None part: "an integer >= 1, or None"
        parts = expected.split(", or ")
        first = rule.describe() if rule.names_choices else f"{parts[0]} {rule.describe()}"
        expected = ", or ".join([first, *parts[1:]])
    if not check.fits(value) or (rule and value is not None and not rule.allows(value)):
        raise ConfigError(f"{name}={value!r}: expected {expected}")


def _bindings() -> list[tuple[str, Any, dict[str, Any]]]:
    """(scope, configurable, {parameter: resolved value}) of every llamahome binding."""
    found = []
    for (scope, selector), params in list(gin.config._CONFIG.items()):
        configurable = gin.config._REGISTRY.get(selector)
        if configurable and _is_llamahome(configurable):
            found.append((scope, configurable, {k: resolve(v) for k, v in params.items()}))
    return found


def _contains_reference(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_contains_reference(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_reference(v) for v in value.values())
    return _is_reference(value)


def _build(configurable: Any, values: dict[str, Any]) -> None:
    """Builds a frozen dataclass config from its bound values, so __post_init__ checks them."""
    cls = configurable.wrapped
    fields = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING
              else f.default for f in dataclasses.fields(cls) if f.init}
    required = (dataclasses.MISSING, gin.REQUIRED)
    if any(v is r for v in fields.values() for r in required) or _contains_reference(values):
        return  # a required field, or a value only a reference can build: left to the job
    recorded = ("", configurable.selector)  # gin logs each call in the operative config
    logged_before = recorded in gin.config._OPERATIVE_CONFIG
    try:
        cls(**{**fields, **values})
    except UserError as e:  # gin appends "In call to configurable ..."; the message says where
        raise ConfigError(str(e).splitlines()[0]) from None
    finally:
        if not logged_before:  # a check is not a use: the operative config lists what the job used
            gin.config._OPERATIVE_CONFIG.pop(recorded, None)


def validate_config() -> None:
    """Checks every llamahome gin binding; raises a one-line ConfigError for the first bad one."""
    bindings = _bindings()
    for scope, configurable, values in bindings:
        types_ = parameter_types(configurable)
        for param, value in values.items():
            if param in types_:
                name = f"{scope + '/' if scope else ''}{configurable.name}.{param}"
                check_value(name, types_[param], value)
    for scope, configurable, values in bindings:  # types are right: cross-field checks next
        cls = configurable.wrapped
        if (not scope and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
                and hasattr(cls, "__post_init__")):
            _build(configurable, values)
