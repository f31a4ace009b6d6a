"""Chat templates: a model's Jinja `chat_template` rendered as `transformers` renders it.

    text = render_chat(template, messages, add_generation_prompt=True, bos_token="<s>", ...)
    text, spans = render_chat_spans(template, messages, bos_token="<s>", ...)

The environment copies transformers' `utils/chat_template_utils.py` (5.x): a sandboxed
(`ImmutableSandboxedEnvironment`) Jinja with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` tag, and the globals `raise_exception`,
`strftime_now`, `dict`, `namespace` and a `tojson` filter that does not escape HTML. Keyword
arguments (the tokenizer's special tokens, as transformers passes its `special_tokens_map`)
are visible to the template.

`render_chat_spans` also returns the character spans of each assistant turn (its content and
the text that closes it), which the chat SFT loss mask covers: the spans a template marks with
`{% generation %}` when it has them, else the text each assistant message adds after the
conversation before it with `add_generation_prompt=True`.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
from collections.abc import Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamahome.errors import DataError

# The layout for tokenizers that bring no template (LlamaHome's own): Llama 3's headers when
# the vocabulary has them, else `<|role|>\n...` closed by EOS.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_TRACKING: contextvars.ContextVar = contextvars.ContextVar("generation_spans", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` as transformers' AssistantTracker: marks spans."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        text = caller()
        if (tracking := _TRACKING.get()) is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore attributes (as transformers' TemplateNamespace)."""

    def __init__(*args, **kwargs):  # noqa: N805  (Jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template, in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, dict=_Dict(), namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the tokenizer's chat_template is not valid Jinja (line {e.lineno}: "
                        f"{e.message}); fix chat_template in tokenizer_config.json or "
                        "chat_template.jinja") from None


def _messages(messages: Sequence[dict]) -> list[dict]:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"chat message {i} is {message!r}; each message needs 'role' and "
                            "'content'")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                **special_tokens) -> str:
    """The text of `messages` ([{role, content}]) under the Jinja `template`."""
    try:
        return compile_template(template).render(
            messages=_messages(messages), tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template refused the messages: {e}") from None


def render_chat_spans(template: str, messages: Sequence[dict], **special_tokens
                      ) -> tuple[str, list[tuple[int, int]]]:
    """(text, [start, end) character spans of the assistant turns) of a whole conversation."""
    messages = _messages(messages)
    if "generation" in template and "{%" in template:
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _TRACKING.set((blocks, spans))
        try:
            for block in compile_template(template).generate(
                    messages=messages, tools=None, documents=None, add_generation_prompt=False,
                    **special_tokens):
                blocks.append(block)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"the chat template refused the messages: {e}") from None
        finally:
            _TRACKING.reset(token)
        if spans:
            return "".join(blocks), spans
    text = render_chat(template, messages, **special_tokens)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], add_generation_prompt=True, **special_tokens)
        through = render_chat(template, messages[:i + 1], **special_tokens)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render a conversation as the growing "
                            "renderings of its turns, so the assistant tokens cannot be found; "
                            "mark them with {% generation %} in the template")
        spans.append((len(before), len(through)))
    return text, spans
