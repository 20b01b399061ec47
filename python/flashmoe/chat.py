"""Chat templates: render OpenAI-style messages into the prompt text a model was trained on.

The templates are the Jinja files HF checkpoints ship, so the environment is set up the way
transformers' `apply_chat_template` sets it up (sandboxed, trim_blocks, lstrip_blocks, loop controls,
its `tojson`, `raise_exception` and `strftime_now`) and the inputs are normalised the same way: the
output is byte-identical to `tokenizer.apply_chat_template(..., tokenize=False)` for the same template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

from .errors import FlashMoEError

# names a message's reasoning may come under; templates read `reasoning_content`
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(FlashMoEError, ValueError):
    """A chat template failed to compile or render, or raised an error itself (bad message order...)."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


class _Dict:
    """dict() for templates, without the attributes of the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names, so a template cannot reach Python internals."""

        def __init__(*args, **kwargs):
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
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def _plain(value):
    """A copy of `value` made of plain JSON types (the template never sees, or mutates, caller objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _parse_arguments(tool_calls: list) -> list:
    """OpenAI messages carry function.arguments as a JSON string; this family's templates iterate over
    it as a mapping (`arguments|items`), so decode it. A string that is not a JSON object stays as is."""
    out = []
    for call in tool_calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            args = call["function"].get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args) if args.strip() else {}
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    call = {**call, "function": {**call["function"], "arguments": parsed}}
        out.append(call)
    return out


def _message(message) -> dict:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
    msg = {k: v for k, v in _plain(message).items() if v is not None}  # content=None, tool_calls=None...
    if isinstance(msg.get("tool_calls"), list):
        msg["tool_calls"] = _parse_arguments(msg["tool_calls"])
    reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
    if reasoning is not None:  # same aliasing (and key order) as transformers
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def render_chat_template(template: str, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                         add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                         bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """Render `messages` with a Jinja chat `template` into the prompt text.

    messages: OpenAI-style dicts ({"role", "content"}, assistant "tool_calls", "reasoning_content",
        tool results as {"role": "tool", "content", "tool_call_id"}). Keys whose value is None are
        dropped, and an assistant tool call's `function.arguments` given as a JSON string (OpenAI's shape)
        is decoded to a dict first, as this family's templates expect a mapping.
    tools: OpenAI tool dicts ({"type": "function", "function": {name, description, parameters}}),
        passed to the template as `tools` unchanged.
    enable_thinking: None leaves the variable undefined, so the template's own default applies (thinking
        on for Qwen3.5); True/False switch it.
    bos_token, eos_token, **extra: further template variables (transformers passes the tokenizer's
        special tokens this way); None values are not passed.

    Raises ChatTemplateError naming the problem when the template fails to compile or render, or calls
    raise_exception (for example on a message order it does not accept).
    """
    import jinja2

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation: give at least one message")
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise ChatTemplateError(f"a tool must be a dict (an OpenAI function tool), got {tool!r}")
        tools = _plain(list(tools))
    variables = {"bos_token": bos_token, "eos_token": eos_token, "enable_thinking": enable_thinking, **extra}
    variables = {k: _plain(v) for k, v in variables.items() if v is not None}
    compiled = _compile(template)
    chat = [_message(m) for m in messages]
    try:
        return compiled.render(messages=chat, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
