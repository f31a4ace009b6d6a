"""LlamaHomeLM against lm-eval's own `hf` backend (HFLM) on the same tiny HF Llama, and the
lm_eval job end to end: three tasks over local JSON files (multiple choice, rolling
loglikelihood, generate_until)."""

from __future__ import annotations

import json
import subprocess
import sys

import gin
import pytest

import llamahome.cli  # noqa: F401  (registers launch, which the job gin files bind)
from llamahome.errors import ConfigError, DataError
from llamahome.files import RunDir
from llamahome.infer import lm_eval_jobs
from llamahome.infer.lm_eval import LlamaHomeLM
from llamahome.train import downstream
from tests.conftest import REPO
from tests.unit.infer.lm_eval_fixtures import (GEN_TASK, MC_TASK, ROLLING_TASK, TASKS,
                                               write_hf_model, write_tasks)

BATCH = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    return write_hf_model(root / "hf"), write_tasks(root / "tasks")


@pytest.fixture(scope="module")
def tasks(files):
    manager = downstream.task_manager(str(files[1]), include_defaults=False)
    return manager, downstream.load_tasks(TASKS, manager=manager)


@pytest.fixture(scope="module")
def both(files, tasks):
    """lm-eval's results (samples logged) of HFLM and of LlamaHomeLM, on the same task objects."""
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    reference = HFLM(pretrained=str(files[0]), device="cpu", dtype="float32", batch_size=BATCH)
    ours = LlamaHomeLM.from_checkpoint(str(files[0]), batch_size=BATCH)
    return [downstream.run_tasks(lm, tasks[1], log_samples=True, bootstrap_iters=0)
            for lm in (reference, ours)]


def _responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("task", [MC_TASK, ROLLING_TASK])
def test_per_request_loglikelihoods_and_is_greedy_equal_hflm(both, task):
    reference, ours = (_responses(r, task) for r in both)
    count = 0
    for doc_ref, doc_ours in zip(reference, ours, strict=True):
        for (ref,), (got,) in zip(doc_ref, doc_ours, strict=True):
            ref, got = (ref, got) if task == MC_TASK else ((ref, None), (got, None))
            assert got[0] == pytest.approx(ref[0], abs=1e-4)
            assert got[1] == ref[1]  # is_greedy
            count += 1
    assert count >= (26 if task == MC_TASK else 6)


def test_is_greedy_of_greedy_continuations(both, files):
    """The generated texts continue their prompts greedily: both backends say so, alike."""
    from lm_eval.api.instance import Instance  # noqa: PLC0415
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    pairs = [(s["arguments"][0][0], s["resps"][0][0]) for s in both[0]["samples"][GEN_TASK]]
    requests = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in
                enumerate(pairs) if cont]
    reference = HFLM(pretrained=str(files[0]), device="cpu", dtype="float32", batch_size=BATCH)
    ours = LlamaHomeLM.from_checkpoint(str(files[0]), batch_size=BATCH)
    want, got = reference.loglikelihood(requests), ours.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in want] and sum(g for _, g in got) >= 2
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], abs=1e-4)


def test_greedy_generate_until_outputs_equal_hflm(both):
    reference, ours = (_responses(r, GEN_TASK) for r in both)
    assert ours == reference
    assert any(r[0][0] for r in ours), "every generation empty: nothing was compared"


def test_task_metrics_equal_hflm(both):
    reference, ours = (downstream.flat_metrics(r) for r in both)
    assert set(ours) == set(reference) and {f"{MC_TASK}/acc", f"{ROLLING_TASK}/bits_per_byte",
                                            f"{GEN_TASK}/exact_match"} <= set(ours)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, rel=1e-5), name


def test_chat_template_renders_like_transformers(files):
    import transformers  # noqa: PLC0415

    lm = LlamaHomeLM.from_checkpoint(str(files[0]), batch_size=BATCH)
    reference = transformers.AutoTokenizer.from_pretrained(str(files[0]))
    chat = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "a rose "}]
    for prompt in (True, False):
        history = chat[:1] if prompt else chat
        expected = reference.apply_chat_template(history, tokenize=False,
                                                 add_generation_prompt=prompt,
                                                 continue_final_message=not prompt)
        assert lm.apply_chat_template(history, add_generation_prompt=prompt) == expected
    # A templated string starts with BOS text: it is not given a second BOS.
    text = lm.apply_chat_template(chat[:1])
    assert lm.tok_encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def _bind_job(files, run_dir, *extra):
    gin.parse_config([f"lm_eval.checkpoint = '{files[0]}'", f"lm_eval.include_path = '{files[1]}'",
                      "lm_eval.include_defaults = False", f"lm_eval.batch_size = {BATCH}", *extra])
    return RunDir(run_dir)


def test_job_writes_results_samples_and_a_downstream_line(files, tmp_path, both, capsys):
    run = _bind_job(files, tmp_path / "run", f"lm_eval.tasks = ['{MC_TASK}', '{ROLLING_TASK}']",
                    "lm_eval.limit = 4")
    metrics = lm_eval_jobs.lm_eval(run_dir=str(run.path))  # on the 8-device test mesh
    results = json.loads(run.lm_eval_results.read_text())
    assert set(results["results"]) == {MC_TASK, ROLLING_TASK}
    assert results["n-samples"][MC_TASK]["effective"] == 4
    assert metrics == downstream.flat_metrics(results)
    samples = [json.loads(line) for line in (run.lm_eval_samples / f"{MC_TASK}.jsonl").open()]
    assert len(samples) == 4
    # The limited docs score as in the full, unsharded run.
    full = {s["doc_id"]: s["resps"] for s in both[1]["samples"][MC_TASK]}
    for sample in samples:
        for (got,), (want,) in zip(sample["resps"], full[sample["doc_id"]]):
            assert got[0] == pytest.approx(want[0], abs=1e-4)
    [line] = [json.loads(r) for r in run.metrics.read_text().splitlines()]
    assert line["split"] == "downstream" and line[f"{MC_TASK}/acc"] == metrics[f"{MC_TASK}/acc"]
    assert "|" in capsys.readouterr().out and MC_TASK in run.lm_eval_results.read_text()


def test_unknown_task_names_the_nearest(files, tmp_path):
    _bind_job(files, tmp_path, "lm_eval.tasks = ['tiny_mcq']")
    with pytest.raises(ConfigError, match="unknown lm-eval task 'tiny_mcq'.*'tiny_mc'"):
        lm_eval_jobs.lm_eval(run_dir=str(tmp_path))


def test_too_many_fewshot_examples(files, tmp_path):
    _bind_job(files, tmp_path, f"lm_eval.tasks = ['{MC_TASK}']", "lm_eval.num_fewshot = 5")
    with pytest.raises(ConfigError, match="num_fewshot=5 but task 'tiny_mc' has only 3"):
        lm_eval_jobs.lm_eval(run_dir=str(tmp_path))


def test_dataset_not_in_the_cache_offline(files, tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "remote.yaml").write_text(
        "task: remote_task\ndataset_path: llamahome-test/no-such-dataset\noutput_type: "
        "loglikelihood\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    gin.parse_config([f"lm_eval.checkpoint = '{files[0]}'", "lm_eval.tasks = ['remote_task']",
                      f"lm_eval.include_path = '{tmp_path / 'tasks'}'",
                      "lm_eval.include_defaults = False"])
    with pytest.raises(DataError, match="'remote_task'.*not in the Hugging Face datasets cache"):
        lm_eval_jobs.lm_eval(run_dir=str(tmp_path / "run"))


@pytest.mark.integration
def test_launch_prints_one_line_and_exits_2(files, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llamahome.launch", "--gin_file=gin/jobs/lm_eval.gin",
         f"--gin_param=lm_eval.checkpoint='{files[0]}'", "--gin_param=lm_eval.tasks=['tiny_mcq']",
         f"--gin_param=lm_eval.include_path='{files[1]}'",
         "--gin_param=lm_eval.include_defaults=False", f"--gin_param=launch.run_dir='{tmp_path}'"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "tiny_mcq" in line]
    assert len(errors) == 1 and "Did you mean 'tiny_mc'" in errors[0]
