"""Bad gin values are one-line ConfigErrors naming the setting and what is allowed, before a job
runs (llamahome/config/validate.py), and gin's own parse errors are one line too."""

from __future__ import annotations

import inspect
from pathlib import Path

import gin
import pytest
from absl import flags

from llamahome import cli
from llamahome.config import gin_config, validate
from llamahome.errors import ConfigError
from tests.conftest import REPO

RECIPE = "gin/train/tiny_cpu.gin"


@pytest.fixture(scope="module", autouse=True)
def _configurables():
    cli.import_configurables()


def run_main(capsys, gin_params, gin_files=(RECIPE,)) -> tuple[int, str]:
    """`python -m llamahome.launch` in this process: (exit status, stderr)."""
    argv = ["launch", "--env_file=", *(f"--gin_file={f}" for f in gin_files),
            *(f"--gin_param={p}" for p in gin_params)]
    flags.FLAGS(argv)
    try:
        status = cli.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    return status, capsys.readouterr().err


def bind(*gin_params: str, gin_files=(RECIPE,)) -> None:
    cli.bind_all(gin_files, gin_params, None, None)


# The cases of issue 15 item 7 and issue 18 item 7, through the launch command's main().
@pytest.mark.parametrize("gin_param,message", [
    ("train.steps='abc'", "train.steps='abc': expected an integer >= 1"),
    ("train.steps=-5", "train.steps=-5: expected an integer >= 1"),
    ("train.seq_len=0", "train.seq_len=0: expected an integer >= 1"),
    ("LlamaConfig.num_kv_heads=0", "LlamaConfig.num_kv_heads=0: expected an integer >= 1"),
    ("train.learning_rate='nan'", "train.learning_rate='nan': expected a finite number >= 0"),
    ("build_optimizer.schedule = @constant",
     "'constant' is ambiguous: it names llamahome.train.optim.constant and gin.constant; write "
     "the full name or the shortest unambiguous one: optim.constant or gin.constant"),
])
def test_issue_cases_exit_2_with_one_line(capsys, gin_param, message):
    status, stderr = run_main(capsys, [gin_param])
    assert status == 2
    assert stderr.strip().splitlines() == [stderr.strip()], stderr
    assert stderr.startswith("error: ") and message in stderr, stderr


@pytest.mark.parametrize("gin_params,message", [
    (["train.steps=True"], "train.steps=True: expected an integer >= 1"),
    (["train.steps=2.0"], "train.steps=2.0: expected an integer >= 1"),
    (["train.learning_rate=1e999"], "train.learning_rate=inf: expected a finite number >= 0"),
    (["train.learning_rate=-0.1"], "train.learning_rate=-0.1: expected a finite number >= 0"),
    (["train.nan_policy='halt'"], "train.nan_policy='halt': expected one of ('stop', 'skip')"),
    (["train.eval_batches=0"], "train.eval_batches=0: expected an integer >= 1, or None"),
    (["train.init_from=3"], "train.init_from=3: expected a string, or None"),
    (["train.progress_bar=1"], "train.progress_bar=1: expected True or False"),
    (["X=-3", "train.steps=%X"], "train.steps=-3: expected an integer >= 1"),
    (["eval/train.steps=0"], "eval/train.steps=0: expected an integer >= 1"),
    (["adamw.b2=1.0"], "adamw.b2=1.0: expected a finite number in [0, 1)"),
    (["build_mesh.data=0"], "build_mesh.data=0: expected an integer >= 1, or -1"),
    (["data_pipeline.packing='zip'"], "data_pipeline.packing='zip': expected one of ("),
    (["generate.prompts='hi'"], "generate.prompts='hi': expected a list of strings"),
    (["TextFiles.paths=[1]"], "TextFiles.paths=[1]: expected a string, or a list of strings"),
    (["CheckpointConfig.keep_last_n=0"],
     "CheckpointConfig.keep_last_n=0: expected an integer >= 1"),
    (["LlamaConfig.num_kv_heads=3"],
     "LlamaConfig.num_kv_heads=3: expected a divisor of LlamaConfig.num_heads=4"),
    (["LlamaConfig.num_heads=3"],
     "LlamaConfig.hidden_size=64: expected a multiple of LlamaConfig.num_heads=3"),
    (["LlamaConfig.head_dim=7"], "LlamaConfig.head_dim=7: expected an even integer >= 2"),
    (["LlamaConfig.dtype='fp8'"], "LlamaConfig.dtype 'fp8' is not one of"),
    (["LlamaConfig.hidden_size='64'"], "LlamaConfig.hidden_size='64': expected an integer"),
    (["SamplerConfig.top_p=2.0"], "top_p must be in (0, 1]"),
    (["constant.warmup_steps=3"], "'constant' is ambiguous"),
    (["train.steps=abc"], "cannot parse the value abc: quote a string ('abc')"),
    (["train.steps=%NOPE"], "%NOPE is used but never bound"),
    (["train.stpes=3"], "doesn't have a parameter named 'stpes'. Did you mean 'steps'?"),
])
def test_bad_bindings_are_one_line_config_errors(gin_params, message):
    with pytest.raises(ConfigError) as e:
        bind(*gin_params)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("gin_params", [
    ["train.learning_rate=1"],  # gin writes whole numbers as ints
    ["train.eval_batches=None", "train.data_shards=None"],
    ["build_mesh.data=-1", "build_mesh.fsdp=1"],
    ["build_optimizer.schedule=@optim.constant", "optim.constant.warmup_steps=2"],
    ["build_optimizer.schedule=@llamahome.train.optim.constant"],
    ["build_optimizer.schedule=@warmup_stable_decay", "warmup_stable_decay.decay_fraction=0.1"],
    ["N=4", "LlamaConfig.num_heads=%N", "LlamaConfig.num_kv_heads=%N"],
    ["LlamaConfig.vocab_size=None"],
])
def test_good_bindings_pass(gin_params):
    bind(*gin_params)


def test_ambiguous_name_in_a_gin_file_names_the_file_and_line(tmp_path):
    inner = tmp_path / "inner.gin"
    inner.write_text("train.steps = 3\nbuild_optimizer.schedule = @constant\n")
    outer = tmp_path / "outer.gin"
    outer.write_text(f"include '{inner}'\n")
    with pytest.raises(ConfigError) as e:
        gin_config.parse_config([str(outer)])
    message = str(e.value)
    assert message.startswith(f"{inner}, line 2: 'constant' is ambiguous") and "\n" not in message


@pytest.mark.parametrize("gin_file", sorted(
    str(p.relative_to(REPO)) for p in (REPO / "gin").rglob("*.gin")))
def test_every_gin_file_in_the_repo_validates(gin_file):
    gin_config.parse_config([gin_file])
    validate.validate_config()


def _annotated_parameters():
    for configurable in validate.llamahome_configurables():
        for param, annotation in validate.parameter_types(configurable).items():
            yield configurable, param, annotation


# Parameters whose annotation allows any value: each one added here was looked at.
ANY_VALUE = {"adafactor.decay_mask", "adamw.decay_mask", "build_optimizer.decay_mask",
             "lion.decay_mask", "sgd.decay_mask"}


def test_every_annotated_parameter_of_every_configurable_is_type_checked():
    configurables = validate.llamahome_configurables()
    assert {"train", "LlamaConfig", "build_optimizer", "constant", "data_pipeline",
            "launch"} <= {c.name for c in configurables}
    wrong = complex(1, 1)  # no annotation in llamahome allows it, except Any
    unchecked = []
    for configurable, param, annotation in _annotated_parameters():
        name = f"{configurable.name}.{param}"
        try:
            validate.check_value(name, annotation, wrong)
        except ConfigError:
            continue
        unchecked.append(name)
    assert sorted(unchecked) == sorted(ANY_VALUE)
    for configurable in configurables:  # none dropped: every annotation resolved
        fn = configurable.wrapped
        signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
        annotated = {p for p, v in signature.parameters.items()
                     if v.annotation is not inspect.Parameter.empty and p != "self"}
        assert annotated == set(validate.parameter_types(configurable)), configurable.name


def test_every_default_value_passes_its_own_check():
    for configurable, param, annotation in _annotated_parameters():
        fn = configurable.wrapped
        fn = fn.__init__ if inspect.isclass(fn) else fn
        default = inspect.signature(fn).parameters[param].default
        if default not in (inspect.Parameter.empty, gin.REQUIRED):
            validate.check_value(f"{configurable.name}.{param}", annotation, default)


def test_every_rule_names_a_real_parameter():
    params = {f"{c.name}.{p}" for c, p, _ in _annotated_parameters()}
    assert set(validate.RULES) - params == set()


@pytest.mark.parametrize("annotation,good,bad", [
    (int, [0, -1], [True, 1.0, "1", None]),
    (float, [1, 0.5], [False, float("nan"), float("-inf"), "0.1"]),
    (bool, [True], [1, "true"]),
    (str | None, ["x", None], [1, ["x"]]),
    (tuple[int, ...], [(1, 2), [3]], [(1, "a"), "12"]),
    (dict[str, float], [{"a": 1.0}], [{"a": "x"}, [("a", 1.0)]]),
    (Path, ["p", Path("p")], [1]),
])
def test_annotation_checks(annotation, good, bad):
    for value in good:
        validate.check_value("probe.x", annotation, value)
    for value in bad:
        with pytest.raises(ConfigError, match=r"^probe\.x="):
            validate.check_value("probe.x", annotation, value)


def test_checking_a_dataclass_config_leaves_the_operative_config_to_the_job():
    bind()
    assert "LlamaConfig" not in gin.operative_config_str()
