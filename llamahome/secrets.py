"""Secrets (HF_TOKEN and friends): read from the environment, never written anywhere.

`redact` is applied to everything LlamaHome writes that could echo a secret: the operative
gin config, logs and error messages.
"""

from __future__ import annotations

import os
import re

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LLAMAHOME_HF_TOKEN")
_SECRET_NAME = re.compile(r"(token|secret|password|passwd|api_key|apikey|credential)", re.I)
REDACTED = "<redacted>"


def hf_token() -> str | None:
    """The Hugging Face token from the environment (or the .env file loaded at start)."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def is_secret_name(name: str) -> bool:
    """True for names like `hf_token` or `download.api_key` whose values must not be shown."""
    return bool(_SECRET_NAME.search(name))


def known_secret_values() -> list[str]:
    """Values of secret environment variables currently set (long enough to be real)."""
    values = [os.environ.get(n, "") for n in os.environ if is_secret_name(n)]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


def redact(text: str) -> str:
    """Replaces every known secret value in `text` with a placeholder."""
    for value in known_secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact_gin_config(config: str) -> str:
    """Redacts secret values and the values of secret-named bindings in a gin config string."""
    lines = []
    for line in redact(config).splitlines():
        name, sep, _ = line.partition("=")
        if sep and not line.lstrip().startswith("#") and is_secret_name(name):
            line = f"{name.rstrip()} = '{REDACTED}'"
        lines.append(line)
    return "\n".join(lines) + ("\n" if config.endswith("\n") else "")
