"""Loading checkpoints of every kind, and the generate / evaluate jobs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import jax
import numpy as np
import optax
import pytest

import llamahome.cli  # noqa: F401  (registers launch, which the job gin files bind)
from llamahome.config import gin_config
from llamahome.cache import CacheManager
from llamahome.config.gin_config import gin_bindings
from llamahome.data.pipeline import data_pipeline, make_data_iterator
from llamahome.data.tokenizer import load_tokenizer, save_run_tokenizer
from llamahome.errors import CheckpointError, UserError
from llamahome.files import RunDir
from llamahome.infer import jobs
from llamahome.infer.generator import TextStream, load_generator
from llamahome.model import hf, params_io
from llamahome.model.checkpoints import load_model
from llamahome.model.llama import Llama, LlamaConfig, architecture_gin, init_params
from llamahome.train.checkpoint import CheckpointConfig, Checkpointer
from llamahome.train.step import init_train_state
from tests.unit.data.conftest import random_paragraphs

CONFIG = LlamaConfig(name="tiny32k", vocab_size=32000, max_seq_len=128)


@pytest.fixture(scope="module")
def sp_path() -> str:
    import mistral_common  # noqa: PLC0415

    return str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sp_path):
    """A run dir with checkpoints at steps 3 and 7 (different params), as training writes them."""
    run_dir = tmp_path_factory.mktemp("run")
    gin.clear_config()
    gin.parse_config([f"TOK = '{sp_path}'", "load_tokenizer.path = %TOK"] +
                     [f"LlamaConfig.{line}" for line in
                      architecture_gin(CONFIG).replace("LlamaConfig.", "").splitlines()])
    assert LlamaConfig() == CONFIG
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    params = {}
    for step in (3, 7):
        params[step] = init_params(CONFIG, jax.random.key(step))
        ckpt.save(step, init_train_state(params[step], optax.adamw(1e-3), 0))
    ckpt.close()
    gin.clear_config()
    return run_dir, params


def assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_run_dir_loads_latest_or_named_step_params_only(trained_run, sp_path):
    run_dir, params = trained_run
    latest = load_model(run_dir)
    assert (latest.kind, latest.step, latest.config) == ("train", 7, CONFIG)
    assert latest.tokenizer.path == sp_path
    assert_same_params(latest.params, params[7])
    assert_same_params(load_model(run_dir, step=3).params, params[3])
    assert_same_params(load_model(run_dir / "checkpoints" / "3").params, params[3])
    with pytest.raises(CheckpointError, match=r"no step 5; it has steps \[3, 7\]"):
        load_model(run_dir, step=5)


def test_params_and_hf_directories_load(tmp_path, trained_run):
    _, params = trained_run
    out = tmp_path / "imported"
    params_io.save_params(out / "params", params[3])
    (out / "model.gin").write_text(architecture_gin(CONFIG))
    loaded = load_model(out)
    assert (loaded.kind, loaded.config) == ("params", CONFIG)
    assert_same_params(loaded.params, params[3])

    hf.save_hf_checkpoint(tmp_path / "hf", CONFIG, params[7])
    loaded = load_model(tmp_path / "hf", dtype="bfloat16")
    assert loaded.kind == "hf" and loaded.config.dtype == "bfloat16"
    assert_same_params(loaded.params, params[7])
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_model(tmp_path)


def test_gin_bindings_resolve_macros_without_touching_the_global_config():
    text = "A = 'x'\nB = %A\nload_tokenizer.path = %B\nscope/load_tokenizer.path = 'no'\n" \
           "llamahome.model.llama.LlamaConfig.num_layers = 3\n"
    assert gin_bindings(text, "load_tokenizer") == {"path": "x"}
    assert gin_bindings(text, "LlamaConfig") == {"num_layers": 3}


def test_stream_text_equals_decoding_all_ids(trained_run):
    run_dir, _ = trained_run
    generator = load_generator(run_dir)
    tokenizer = generator.tokenizer
    sampler_kwargs = dict(temperature=1.0, top_p=0.95, seed=3)
    pieces = list(generator.stream("The king shall", max_new_tokens=20, chunk=3,
                                   **sampler_kwargs))
    [completion] = generator.generate(["The king shall"], max_new_tokens=20,
                                      sampler=jobs.SamplerConfig(temperature=1.0, top_p=0.95),
                                      seed=3)
    assert "".join(pieces) == completion.text
    prompt_ids = tokenizer.encode("The king shall")
    full = tokenizer.decode(prompt_ids + completion.token_ids)
    assert full == tokenizer.decode(prompt_ids) + completion.text  # SentencePiece: no lost space
    assert len(completion.token_ids) == 20 and completion.finish_reason == "length"


def test_text_stream_holds_back_half_characters(sp_path):
    tokenizer = load_tokenizer(sp_path)
    ids = tokenizer.encode("é 世界", add_bos=False)
    stream = TextStream(tokenizer, [tokenizer.bos_id], stop_ids=[tokenizer.eos_id])
    pieces = [stream.push([i]) for i in ids] + [stream.push([tokenizer.eos_id, ids[0]])]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "é 世界"
    assert stream.completion(1).token_ids == ids + [tokenizer.eos_id]


def test_generate_job_writes_generations_and_streams(tmp_path, trained_run, capsys):
    run_dir, _ = trained_run
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Good night"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Who art thou?"}]}) + "\n")
    gin_config.parse_config(["gin/jobs/generate.gin"], [], [], [
        f"generate.checkpoint = '{run_dir}'", "generate.prompts = ['To be']",
        f"generate.prompts_file = '{prompts_file}'", "generate.max_new_tokens = 6",
        "generate.batch_size = 2", "SamplerConfig.temperature = 0.0"])
    out_dir = tmp_path / "gen_run"
    records = jobs.generate(run_dir=str(out_dir))
    written = RunDir(out_dir).generations.read_text().splitlines()
    lines = [json.loads(line) for line in written]
    assert lines == records and [r["index"] for r in lines] == [0, 1, 2]
    assert lines[0]["prompt"] == "To be" and lines[2]["messages"][0]["content"] == "Who art thou?"

    generator = load_generator(run_dir)
    expected = generator.generate(["To be", "Good night"], max_new_tokens=6)
    assert [r["token_ids"] for r in lines[:2]] == [c.token_ids for c in expected]
    chat_ids, _ = generator.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who art thou?"},
         {"role": "assistant", "content": ""}])
    assert lines[2]["prompt_tokens"] == len(chat_ids) - 1
    printed = capsys.readouterr().out
    assert f"--- [0]\nTo be{lines[0]['completion']}\n--- [1]\nGood night" in printed
    assert f"[user] Who art thou?\n{lines[2]['completion']}" in printed


@pytest.fixture
def shakespeare_gin(tmp_path, sp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(random_paragraphs(rng, 400)) + "\n")
    return ["gin/data/shakespeare.gin", "gin/jobs/evaluate.gin"], [
        f"DATA_DIR = '{folder}'", f"TOKENIZER = '{sp_path}'",
        f"CacheManager.root = '{tmp_path / 'cache'}'"]


def test_evaluate_perplexity_equals_exp_of_numpy_mean_loss(tmp_path, trained_run,
                                                           shakespeare_gin, eight_devices):
    run_dir, params = trained_run
    files, bindings = shakespeare_gin
    gin_config.parse_config(files, [], [], bindings + [
        f"evaluate.checkpoint = '{run_dir}'", "evaluate.step = 3", "evaluate.batch_size = 8",
        "evaluate.seq_len = 32", "evaluate.max_batches = 3"])
    batches = [b for _, b in zip(range(3), make_data_iterator(
        "validation", global_batch_size=8, seq_len=32, seed=0, config=data_pipeline(),
        tokenizer=load_tokenizer(), cache_manager=CacheManager()))]
    result = jobs.evaluate(run_dir=str(tmp_path / "eval_run"))

    nll, count = 0.0, 0.0
    for batch in batches:
        logits = np.asarray(Llama(CONFIG).apply({"params": params[3]}, batch["inputs"],
                                                batch["positions"], batch["segment_ids"]),
                            np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        target = np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
        nll -= (target * batch["loss_mask"]).sum()
        count += batch["loss_mask"].sum()
    assert result["tokens"] == count > 0
    np.testing.assert_allclose(result["loss"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(nll / count), rtol=1e-5)

    tokenizer = load_tokenizer()
    nbytes = 0
    for batch in batches:  # bytes of each row's masked target text, specials excluded
        for row, mask in zip(batch["targets"], batch["loss_mask"]):
            runs = np.split(np.arange(len(row)), np.flatnonzero(np.diff(mask > 0)) + 1)
            nbytes += sum(len(tokenizer.decode([t for t in row[r] if t > 2]).encode())
                          for r in runs if mask[r[0]] > 0)
    np.testing.assert_allclose(result["bits_per_byte"], nll / np.log(2) / nbytes, rtol=1e-5)
    saved = json.loads(RunDir(tmp_path / "eval_run").eval_results.read_text())
    assert saved["step"] == 3 and saved["loss"] == result["loss"]
    metrics = json.loads((tmp_path / "eval_run" / "metrics.jsonl").read_text())
    assert metrics["split"] == "eval" and metrics["perplexity"] == result["perplexity"]


def test_evaluate_needs_only_the_run_dir(tmp_path, sp_path, shakespeare_gin, eight_devices):
    """A run saved with its data bindings evaluates from `evaluate.checkpoint` alone, on the same
    batches (same figures) as with its data gin file bound, and with the run dir's tokenizer."""
    files, bindings = shakespeare_gin
    run_dir = tmp_path / "run"
    gin_config.parse_config(["gin/data/shakespeare.gin"], [], [], bindings + [
        f"LlamaConfig.{line}" for line in architecture_gin(CONFIG).replace("LlamaConfig.", "").splitlines()])
    ckpt = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    ckpt.save(5, init_train_state(init_params(CONFIG, jax.random.key(5)), optax.adamw(1e-3), 0))
    ckpt.close()
    save_run_tokenizer(run_dir, load_tokenizer())
    settings = ["evaluate.seq_len = 32", "evaluate.max_batches = 3",
                f"CacheManager.root = '{tmp_path / 'cache'}'"]

    gin.clear_config()
    gin_config.parse_config(files, [], [], bindings + settings + [f"evaluate.checkpoint = '{run_dir}'"])
    bound = jobs.evaluate(run_dir=str(tmp_path / "bound"))

    gin.clear_config()
    gin_config.parse_config(["gin/jobs/evaluate.gin"], [], [], settings + [
        f"evaluate.checkpoint = '{run_dir}'"])
    alone = jobs.evaluate(run_dir=str(tmp_path / "alone"))
    assert alone == bound and alone["tokens"] > 0

    with pytest.raises(UserError, match="names no data set; pick one with --gin_file=gin/data/"):
        out = tmp_path / "imported"
        params_io.save_params(out / "params", init_params(CONFIG, jax.random.key(0)))
        (out / "model.gin").write_text(architecture_gin(CONFIG))
        gin.clear_config()
        gin_config.parse_config(["gin/jobs/evaluate.gin"], [], [], settings + [f"evaluate.checkpoint = '{out}'"])
        jobs.evaluate(run_dir=str(tmp_path / "x"))
