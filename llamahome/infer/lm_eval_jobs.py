"""The `lm_eval` job (gin/jobs/lm_eval.gin): lm-evaluation-harness tasks on a checkpoint.

    python -m llamahome.launch --gin_file=gin/jobs/lm_eval.gin \\
        --gin_param="lm_eval.checkpoint='runs/<run>'" --gin_param="lm_eval.tasks=['hellaswag']"

`checkpoint` is any kind the other jobs take (a run dir, a step dir, an import_hf output, a
Hugging Face directory, `model:name@N`). Tasks are lm-eval's built-in ones and the user's own
YAML tasks under `include_path`; their datasets come from the Hugging Face datasets cache
(offline) unless `allow_download=True`. Bad input stops the job before the model loads, in one
line: an unknown task (with the nearest names), a dataset not in the cache, a `num_fewshot`
larger than a task's fewshot examples.

Writes <run_dir>/lm_eval_results.json (lm-eval's results dict, as its own CLI writes it),
<run_dir>/lm_eval_samples/<task>.jsonl (one logged sample per line, when `log_samples`), one
"downstream" line per task in <run_dir>/metrics.jsonl (so the dashboard shows it), and prints
lm-eval's results table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import gin
from absl import logging

from llamahome.errors import ConfigError
from llamahome.files import RunDir, write_text_atomic
from llamahome.infer.lm_eval import LlamaHomeLM
from llamahome.jobs import job
from llamahome.monitor import MetricsWriter
from llamahome.parallel import distributed
from llamahome.parallel.mesh import axis_rules, build_mesh
from llamahome.train.downstream import flat_metrics, load_tasks, run_tasks, task_manager


@job
def lm_eval(run_dir: str, *, checkpoint: str = gin.REQUIRED, tasks: Sequence[str] = gin.REQUIRED,
            step: int | None = None, num_fewshot: int | None = None,
            limit: int | float | None = None, batch_size: int = 8,
            include_path: str | None = None, include_defaults: bool = True,
            allow_download: bool = False, tokenizer: str | None = None, dtype: str | None = None,
            max_length: int | None = None, add_bos: bool | None = None,
            apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
            system_instruction: str | None = None, log_samples: bool = True,
            bootstrap_iters: int = 100000) -> dict:
    """Runs lm-eval `tasks` on `checkpoint`; returns {"<task>/<metric>": value} (see module doc)."""
    if limit is not None and limit <= 0:
        raise ConfigError(f"lm_eval.limit={limit}: give a number of docs (or a fraction) > 0, "
                          "or None for all")
    manager = task_manager(include_path, include_defaults)
    loaded = load_tasks(tasks, manager=manager, num_fewshot=num_fewshot,
                        allow_download=allow_download)
    mesh, rules = build_mesh(), axis_rules()
    lm = LlamaHomeLM.from_checkpoint(checkpoint, step=step, tokenizer=tokenizer, mesh=mesh,
                                     rules=rules, dtype=dtype, batch_size=batch_size,
                                     max_length=max_length, add_bos=add_bos, run_dir=run_dir)
    logging.info("lm-eval tasks %s on %s", sorted(loaded["tasks"]), lm.name)
    results = run_tasks(lm, loaded, limit=limit, log_samples=log_samples,
                        apply_chat_template=apply_chat_template,
                        fewshot_as_multiturn=fewshot_as_multiturn,
                        system_instruction=system_instruction, bootstrap_iters=bootstrap_iters)
    results["config"] = {"model": "llamahome", "model_args": {"checkpoint": checkpoint},
                         **lm.get_model_info(), "batch_size": lm.batch_size, "limit": limit}
    metrics = flat_metrics(results)
    if distributed.is_coordinator():
        _write(RunDir(run_dir), results, metrics, lm.checkpoint_step)
    return metrics


def _write(run: RunDir, results: dict, metrics: dict[str, float], step: int | None) -> None:
    """Results JSON, per-sample logs, downstream metric lines; prints lm-eval's tables."""
    from lm_eval.utils import handle_non_serializable, make_table  # noqa: PLC0415

    run.path.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    dump = lambda x, **kw: json.dumps(x, default=handle_non_serializable, ensure_ascii=False, **kw)  # noqa: E731
    write_text_atomic(run.lm_eval_results, dump(results, indent=2) + "\n")
    if samples:
        run.lm_eval_samples.mkdir(exist_ok=True)
    for task, logged in samples.items():
        write_text_atomic(run.lm_eval_samples / f"{task}.jsonl",
                          "".join(dump(s) + "\n" for s in logged))
    writer = MetricsWriter(run.path, total_steps=0, progress_bar=False)
    writer.downstream(step or 0, metrics)
    writer.close()
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    logging.info("lm-eval results in %s", run.lm_eval_results)
