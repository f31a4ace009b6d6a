"""Qwen2, Qwen3, Mistral and Mixtral through the jobs (issue 24): import_hf -> generate gives
`transformers.generate`'s greedy ids (Mistral's prompt is longer than its window, so decoding
runs on the engine's rolling cache), and export_hf of the import reloads in `transformers` with
the original's logits. A config.json of another architecture exits 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from tests.conftest import assert_refused_in_one_line, launch_job
from tests.integration.test_hf_fidelity import NEW, generate_job, hf_generate, hf_tokenizer, run_job
from tests.unit.model.test_architectures import random_hf_model, torch_logits

pytestmark = [pytest.mark.integration]

LONG_PROMPT = "the king and the queen speak of love and night. The capital of France is"


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "mixtral"])
def test_import_generate_and_export_match_transformers(family, tmp_path):
    tokenizer = hf_tokenizer("chatml")
    options = {"sliding_window": 6} if family == "mistral" else {}
    model = random_hf_model(family, vocab_size=len(tokenizer), **options)
    model.generation_config.eos_token_id = None  # greedy for all NEW tokens
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    imported = run_job(["gin/jobs/import_hf.gin"], [
        f"import_hf.hf_dir='{hf_dir}'", f"import_hf.output_dir='{tmp_path / 'imported'}'",
        f"launch.run_dir='{tmp_path / 'import-run'}'"])

    ids, new = hf_generate(hf_dir, LONG_PROMPT)
    assert family != "mistral" or len(ids) + NEW > 2 * 6  # the window slides twice over
    record = generate_job(imported, tmp_path / "gen", LONG_PROMPT)
    assert record["prompt_tokens"] == len(ids)
    assert record["token_ids"] == new, family

    export = tmp_path / "export"
    run_job(["gin/jobs/export_hf.gin"], [f"export_hf.checkpoint='{imported}'",
                                         f"export_hf.output_dir='{export}'",
                                         f"launch.run_dir='{tmp_path / 'export-run'}'"])
    assert json.loads((export / "config.json").read_text())["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = np.asarray([ids])
    np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(model, tokens),
                               atol=1e-5, rtol=0)


def test_another_architecture_exits_2_with_one_line(tmp_path):
    hf_dir = tmp_path / "hf"
    random_hf_model("qwen2").save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "gemma2"
    (hf_dir / "config.json").write_text(json.dumps(config))
    result = launch_job("gin/jobs/import_hf.gin", f"import_hf.hf_dir='{hf_dir}'",
                        f"import_hf.output_dir='{tmp_path / 'out'}'",
                        f"launch.run_dir='{tmp_path / 'run'}'")
    assert_refused_in_one_line(result, "model_type 'gemma2'")
    assert not (tmp_path / "out").exists()
