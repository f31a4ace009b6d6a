"""Secrets (HF_TOKEN and friends): read from the environment, never written anywhere.

Everything LlamaHome writes or prints that could echo a secret goes through `redact`: saved gin
configs (through `redact_gin_config`), log lines, error messages, the run-dir lock record.
`redact` replaces with `<redacted>`:
- the values of secret-named environment variables that are set (HF_TOKEN, WANDB_API_KEY, ...);
- URL credentials: the `user:pass@` userinfo, and signed-URL or credential parameters of a query
  or fragment (`sig=`, `X-Amz-Signature=`, `X-Amz-Credential=`, `X-Goog-Signature=`, `token=`,
  `key=`, `access_token=`, ...).
`redact_gin_config` also replaces the whole value of each secret-named binding (`*.hf_token`,
`*.api_key`, `PASSWORD`, ...; see `is_secret_name`), statement by statement, so the result
always parses and re-runs the run. A binding left holding `<redacted>` needs the real value
again: `redacted_bindings` names them, and launch warns about each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from llamahome.config.gin_config import gin_statements

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LLAMAHOME_HF_TOKEN")
REDACTED = "<redacted>"

# A name is split into lowercase words: `hf_token`, `HF_TOKEN`, `hfToken`, `X-Amz-Signature`.
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
# Words that make any name secret wherever they stand.
_SECRET_WORDS = frozenset({"secret", "password", "passwd", "passphrase", "credential",
                           "credentials", "apikey", "signature", "authorization", "cookie"})
# `<q>_key` is secret for these q (api_key, access_key, private_key), not for cache_key, sort_key.
_KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "auth", "signing", "encryption",
                             "client", "account", "master", "subscription", "license", "sas"})
# `<q>_token` is a vocabulary token or a count, not a credential, for these q (bos_token,
# pad_token, flops_per_token, ...).
_NON_SECRET_TOKEN_QUALIFIERS = frozenset({
    "bos", "eos", "pad", "unk", "sep", "cls", "mask", "start", "end", "stop", "eot", "eom",
    "special", "image", "audio", "video", "boi", "eoi", "begin", "middle", "prefix", "suffix",
    "fim", "tool", "think", "separator", "padding", "default", "vocab", "first", "last", "next",
    "per", "each", "num"})
# In URLs, parameters whose value is a signature or credential (beyond secret names).
_URL_SECRET_WORDS = frozenset({"sig", "signature", "token", "key", "credential", "password",
                               "pass", "secret", "auth"})

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s'\"<>]+@")
_URL_PARAM = re.compile(r"(?P<head>[?&#;](?P<name>[A-Za-z0-9_.\-]+)=)[^&#;\s'\"<>,)\]\\]+")
_BINDING = re.compile(r"(?P<indent>\s*)(?P<name>[A-Za-z_][\w./\-]*)\s*=(?!=)")


API_KEY_VAR = "LLAMAHOME_API_KEY"  # the serve job's key: a secret name, so it is redacted too


def api_key() -> str | None:
    """The `serve` job's API key (LLAMAHOME_API_KEY, from the environment or .env); never gin."""
    return os.environ.get(API_KEY_VAR) or None


def hf_token() -> str | None:
    """The Hugging Face token from the environment (or the .env file loaded at start)."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(name)]


def is_secret_name(name: str) -> bool:
    """True for names whose values must not be shown: `download.hf_token`, `WANDB_API_KEY`,
    `client_secret`, `password`, `auth_token`, `token`; false for `TOKENIZER`, `bos_token`,
    `max_tokens`, `token_ids`, `cache_key`. Only the last dotted part of a binding counts."""
    words = _words(re.split(r"[./]", name)[-1])
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    *qualifiers, last = words
    if last == "token":
        return not qualifiers or qualifiers[-1] not in _NON_SECRET_TOKEN_QUALIFIERS
    if last == "key":
        return bool(qualifiers) and qualifiers[-1] in _KEY_QUALIFIERS
    return last == "auth"


def _is_secret_url_param(name: str) -> bool:
    return is_secret_name(name) or bool(_URL_SECRET_WORDS.intersection(_words(name)))


def known_secret_values() -> list[str]:
    """Values of secret environment variables currently set (long enough to be real)."""
    values = [os.environ.get(n, "") for n in os.environ if is_secret_name(n)]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


def redact_urls(text: str) -> str:
    """Replaces URL userinfo (`user:pass@`) and secret query or fragment parameter values."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _URL_PARAM.sub(
        lambda m: f"{m['head']}{REDACTED}" if _is_secret_url_param(m["name"]) else m[0], text)


def redact(text: str) -> str:
    """`text` with known secret values and URL credentials replaced by a placeholder."""
    for value in known_secret_values():
        text = text.replace(value, REDACTED)
    return redact_urls(text)


def _redact_statement(statement: str) -> str:
    match = _BINDING.match(statement)
    if match and is_secret_name(match["name"]):
        end = statement[len(statement.rstrip("\r\n")):]
        return f"{match['indent']}{match['name']} = '{REDACTED}'{end}"
    return redact(statement)


def redact_gin_config(config: str) -> str:
    """`config` with secret values and URL credentials redacted and the whole value of each
    secret-named binding replaced by '<redacted>'; still a parseable gin config."""
    return "".join(_redact_statement(s) for s in gin_statements(config))


def redacted_bindings(config: str) -> list[str]:
    """Names of the bindings in `config` whose value holds the redaction placeholder."""
    return [m["name"] for s in gin_statements(config)
            if REDACTED in s and (m := _BINDING.match(s))]


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line for display: `--gin_param=` bindings redacted as in a saved config."""
    shown = []
    for arg in argv:
        flag, sep, binding = arg.partition("=")
        if sep and flag.lstrip("-") == "gin_param":
            arg = f"{flag}={redact_gin_config(binding)}"
        shown.append(redact(arg))
    return shown
