"""Models and Hugging Face dirs on object storage through the jobs (issue 25): import_hf from and
export_hf to a bucket keep the logits; a missing bucket, missing credentials and a denied write
are refused in one line naming the URI and the cause (exit 2) with nothing partial left; no
credential reaches an error line, a log, the run dir or the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import transformers

from llamahome import store
from tests.conftest import assert_refused_in_one_line, launch_job
from tests.object_store import ROOT, _wait_for, free_port
from tests.unit.model.hf_reference import hf_logits, random_hf_llama

SECRET = "lh-test-secret-9Qz7Wv"  # an AWS_SECRET_ACCESS_KEY value that must never be shown


def files_under(folder: Path) -> dict[str, str]:
    return {str(p): p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # one store (CI time): the same code runs on the other
def test_export_hf_to_and_import_hf_from_a_bucket_keep_the_logits(bucket, tmp_path, monkeypatch):
    if bucket.startswith("s3://"):
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # the emulator takes any secret
        store.reset_clients()
    model = random_hf_llama(num_kv_heads=2, seed=3)
    model.save_pretrained(tmp_path / "hf")
    store.upload_dir(tmp_path / "hf", f"{bucket}/hf", last=("config.json",))
    imported = launch_job("gin/jobs/import_hf.gin", f"import_hf.hf_dir='{bucket}/hf'",
                          f"import_hf.output_dir='{bucket}/imported'",
                          f"launch.run_dir='{tmp_path / 'run-import'}'")
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "LlamaConfig" in store.as_path(f"{bucket}/imported/model.gin").read_text()
    exported = launch_job("gin/jobs/export_hf.gin", f"export_hf.checkpoint='{bucket}/imported'",
                          f"export_hf.output_dir='{bucket}/exported'",
                          f"launch.run_dir='{tmp_path / 'run-export'}'")
    assert exported.returncode == 0, exported.stderr[-3000:]
    local = store.download_dir(f"{bucket}/exported", tmp_path / "exported")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(local).eval()
    tokens = np.random.default_rng(0).integers(0, 128, (2, 24))
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max() <= 1e-5
    everything = store.download_dir(bucket, tmp_path / "bucket")  # the imports, the exports
    shown = [imported.stdout, imported.stderr, exported.stdout, exported.stderr,
             *files_under(tmp_path / "run-import").values(),
             *files_under(tmp_path / "run-export").values(), *files_under(everything).values()]
    assert not [text for text in shown if SECRET in text]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_bucket_that_does_not_exist_is_refused_in_one_line(scheme, object_stores, tmp_path,
                                                            monkeypatch):
    for name, value in object_stores[scheme].env().items():
        monkeypatch.setenv(name, value)
    missing = f"{scheme}://lh-missing-{uuid.uuid4().hex[:12]}/models/out"
    result = launch_job("gin/jobs/export_hf.gin", "export_hf.checkpoint='/nowhere'",
                        f"export_hf.output_dir='{missing}'",
                        f"launch.run_dir='{tmp_path / 'run'}'")
    line = assert_refused_in_one_line(result, missing)
    assert "the bucket does not exist" in line


def test_missing_credentials_are_refused_in_one_line_quickly(object_stores, tmp_path, monkeypatch):
    s3 = object_stores["s3"]
    bucket = s3.bucket()
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    start = time.monotonic()
    result = launch_job("gin/jobs/import_hf.gin", f"import_hf.hf_dir='{bucket}/hf'",
                        f"import_hf.output_dir='{tmp_path / 'out'}'",
                        f"launch.run_dir='{tmp_path / 'run'}'", timeout=120)
    line = assert_refused_in_one_line(result, f"{bucket}/hf")
    assert "no credentials" in line
    assert time.monotonic() - start < 40  # no minutes of retries against a metadata server
    assert not (tmp_path / "out").exists()


# -- a denied write: moto with IAM enforced -----------------------------------------------------

READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}]}


@pytest.fixture(scope="module")
def read_only_s3():
    """A second moto S3 server that enforces IAM: its first 4 requests (make a bucket, a user, the
    user's read-only policy, its access key) go unchecked, every later one is checked against the
    signing key's policy. Yields (environment of the read-only user, bucket URI)."""
    import botocore.session

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        _wait_for(port, proc, "the IAM-enforcing S3 emulator")
        endpoint = f"http://127.0.0.1:{port}"
        session = botocore.session.get_session()
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "admin", "aws_secret_access_key": "admin-secret"}
        bucket = f"lh-readonly-{uuid.uuid4().hex[:8]}"
        session.create_client("s3", **admin).create_bucket(Bucket=bucket)
        iam = session.create_client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only",
                            PolicyDocument=json.dumps(READ_ONLY))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        yield env, f"s3://{bucket}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_denied_write_is_refused_in_one_line_and_writes_nothing(read_only_s3, tmp_path,
                                                                  monkeypatch):
    env, bucket = read_only_s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store.reset_clients()
    out = f"{bucket}/exported"
    result = launch_job("gin/jobs/export_hf.gin", "export_hf.checkpoint='/nowhere'",
                        f"export_hf.output_dir='{out}'", f"launch.run_dir='{tmp_path / 'run'}'")
    line = assert_refused_in_one_line(result, out)
    assert "access denied" in line
    assert env["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout
    listed = store.s3_client().list_objects_v2(Bucket=bucket[len("s3://"):])  # the reader may list
    assert listed["KeyCount"] == 0
    store.reset_clients()


def test_credentials_in_a_uri_never_reach_the_error_or_the_run_dir(bucket, tmp_path):
    with_userinfo = bucket.replace("://", "://AKIAEXAMPLEKEY:hunter2-uri-secret@") + "/out"
    result = launch_job("gin/jobs/export_hf.gin", "export_hf.checkpoint='/nowhere'",
                        f"export_hf.output_dir='{with_userinfo}'",
                        f"launch.run_dir='{tmp_path / 'run'}'")
    assert_refused_in_one_line(result, "<redacted>@")
    shown = [result.stdout, result.stderr, *files_under(tmp_path / "run").values()]
    assert not [text for text in shown if "hunter2-uri-secret" in text or "AKIAEXAMPLEKEY" in text]
