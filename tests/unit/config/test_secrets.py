"""Redaction: which names are secret, URL credentials, gin configs that still parse and bind the
same non-secret values, .env errors that do not echo, and log lines and tracebacks."""

from __future__ import annotations

import logging

import gin
import pytest

from llamahome import cli, files, secrets
from llamahome.config.gin_config import gin_statements, parse_dotenv
from llamahome.errors import ConfigError

R = secrets.REDACTED


@pytest.mark.parametrize("name", [
    "HF_TOKEN", "hf_token", "download.hf_token", "scope/download.hf_token", "token", "auth_token",
    "access_token", "refresh_token", "id_token", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN",
    "hfToken", "api_key", "apiKey", "WANDB_API_KEY", "private_key", "AWS_SECRET_ACCESS_KEY",
    "client_secret", "password", "DB_PASSWD", "passphrase", "credentials", "X-Amz-Signature",
    "X-Amz-Credential", "download.auth", "Authorization"])
def test_secret_names(name):
    assert secrets.is_secret_name(name)


@pytest.mark.parametrize("name", [
    "TOKENIZER", "load_tokenizer.path", "load_tokenizer", "bos_token", "load_tokenizer.bos_token",
    "eos_token", "pad_token", "unk_token", "mask_token", "im_start_token", "special_tokens",
    "max_tokens", "max_new_tokens", "token_ids", "token_id", "flops_per_token", "tokens_per_second",
    "TOKENIZERS_PARALLELISM", "cache_key", "key", "sort_key", "hf_token_path", "PWD",
    "SSH_AUTH_SOCK", "AWS_ACCESS_KEY_ID", "secrets_dir", "TextFiles.paths", ""])
def test_not_secret_names(name):
    assert not secrets.is_secret_name(name)


@pytest.mark.parametrize("text,expected", [
    ("https://alice:pw@host/a", f"https://{R}@host/a"),
    ("git+https://ghp_abc@github.com/o/r.git", f"git+https://{R}@github.com/o/r.git"),
    ("https://h/f?sig=abc%2B&sv=2024&se=x", f"https://h/f?sig={R}&sv=2024&se=x"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=A&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff",
     f"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=A&X-Amz-Credential={R}&X-Amz-Signature={R}"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=00&X-Goog-Date=1",
     f"https://storage.googleapis.com/b/o?X-Goog-Signature={R}&X-Goog-Date=1"),
    ("https://api/x?key=AIza1&token=t0k&access_token=a&api_key=k&page=2",
     f"https://api/x?key={R}&token={R}&access_token={R}&api_key={R}&page=2"),
    ("https://h/cb#access_token=abc&state=1", f"https://h/cb#access_token={R}&state=1"),
    ("['https://h/a?sig=s1', 'https://u:p@h/b']", f"['https://h/a?sig={R}', 'https://{R}@h/b']"),
    ("https://h/a?q=tokenizer&max_tokens=5", "https://h/a?q=tokenizer&max_tokens=5"),
    ("user@example.com and a.b = 3 # key=1", "user@example.com and a.b = 3 # key=1"),
])
def test_redact_url_credentials(text, expected):
    assert secrets.redact(text) == expected
    assert secrets.redact(expected) == expected  # idempotent


def test_redact_replaces_secret_env_values_only(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123")
    monkeypatch.setenv("TOKENIZER_DIR", "/data/tok")
    assert secrets.redact("t=hf_abcdef123 dir=/data/tok") == f"t={R} dir=/data/tok"


CONFIG = """\
# Macros:
# ==============================================================================
HF_TOKEN = 'hf_fromaginfile'
TOKENIZER = \\
    '/a/very/long/path/to/a/tokenizer/that/gin/wrapped/onto/a/second/line.model'

# Parameters for probe_secrets:
# ==============================================================================
probe_secrets.api_key = \\
    'sk-averyveryveryveryveryveryveryveryveryverylongsecretkeythatwraps'
probe_secrets.bos_token = '<s>'
probe_secrets.password = {'a': '1',
                          'b': ')2'}
probe_secrets.path = %TOKENIZER
probe_secrets.urls = \\
    ['https://u:p@host/a?sig=SIG&part=1',
     # a comment with 'quotes and [brackets
     '/plain/path']
"""


@gin.configurable
def probe_secrets(path="", bos_token="", api_key="", password=None, urls=()):
    return dict(path=path, bos_token=bos_token, api_key=api_key, password=password, urls=urls)


def test_redacted_gin_config_parses_and_binds_the_same_non_secret_values():
    redacted = secrets.redact_gin_config(CONFIG)
    for secret in ("hf_fromaginfile", "sk-avery", "'1'", ")2", "u:p", "SIG"):
        assert secret not in redacted
    assert f"HF_TOKEN = '{R}'\n" in redacted and f"probe_secrets.api_key = '{R}'\n" in redacted
    gin.parse_config(redacted)
    got = probe_secrets()
    assert got["path"] == "/a/very/long/path/to/a/tokenizer/that/gin/wrapped/onto/a/second/line.model"
    assert got["bos_token"] == "<s>" and got["api_key"] == R and got["password"] == R
    assert got["urls"] == [f"https://{R}@host/a?sig={R}&part=1", "/plain/path"]
    assert secrets.redacted_bindings(redacted) == [
        "HF_TOKEN", "probe_secrets.api_key", "probe_secrets.password", "probe_secrets.urls"]
    assert secrets.redact_gin_config(redacted) == redacted


@pytest.mark.parametrize("config,statements", [
    ("a.b = 1\nc.d = 2\n", ["a.b = 1\n", "c.d = 2\n"]),
    ("a.b = [1,\n  2]\nc.d = 'x]'\n", ["a.b = [1,\n  2]\n", "c.d = 'x]'\n"]),
    ("a.b = \\\n    'x'\n", ["a.b = \\\n    'x'\n"]),
    ("a.b = '''x\n(y'''\nc = 1", ["a.b = '''x\n(y'''\n", "c = 1"]),
    ("a.b = 'it\\'s ('\n# c\n\n", ["a.b = 'it\\'s ('\n", "# c\n", "\n"]),
])
def test_gin_statements(config, statements):
    assert gin_statements(config) == statements


def test_saved_config_is_redacted_and_names_what_to_give_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret_value")
    config = ("download.hf_token = 'abc'\nprobe.name = 'hf_supersecret_value'\n"
              "load_tokenizer.bos_token = '<s>'\nTOKENIZER = 'tok.model'\n")
    text = files.save_config(tmp_path, "config.gin", config).read_text()
    assert text == (f"download.hf_token = '{R}'\nprobe.name = '{R}'\n"
                    "load_tokenizer.bos_token = '<s>'\nTOKENIZER = 'tok.model'\n")


@pytest.mark.parametrize("line,problem", [
    ("HF_TOKEN hf_abcdefsecret", "the line has no '='"),
    ("hf_abcdefsecret", "the line has no '='"),
    ("HF TOKEN=hf_abcdefsecret", "the name before '=' is not letters"),
])
def test_malformed_dotenv_line_names_file_and_line_not_the_value(tmp_path, line, problem):
    path = tmp_path / ".env"
    path.write_text(f"# comment\n{line}\n")
    with pytest.raises(ConfigError) as e:
        parse_dotenv(path)
    assert str(e.value).startswith(f"{path}:2: expected KEY=VALUE but {problem}")
    assert "abcdefsecret" not in str(e.value)


def test_log_lines_and_tracebacks_are_redacted(capsys):
    record = logging.LogRecord("absl", logging.INFO, __file__, 1, "reading %s",
                               ("https://u:pw@h/x?X-Goog-Signature=abc",), None)
    assert cli._Formatter().format(record).endswith(f"reading https://{R}@h/x?X-Goog-Signature={R}")
    try:
        raise RuntimeError("GET https://h/x?sig=abc failed")
    except RuntimeError as e:
        cli._redacted_excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and f"sig={R} failed" in err and "sig=abc" not in err


def test_command_lines_redact_secret_gin_params():
    argv = ["python", "-m", "llamahome.launch", "--gin_param=HF_TOKEN='hf_x1'",
            "--gin_param=TOKENIZER='t.model'", "--gin_param=a.url='https://u:p@h/?sig=s'"]
    assert secrets.redact_argv(argv) == [
        "python", "-m", "llamahome.launch", f"--gin_param=HF_TOKEN = '{R}'",
        "--gin_param=TOKENIZER='t.model'", f"--gin_param=a.url='https://{R}@h/?sig={R}'"]
