"""Chat templates: the Jinja2 environment Hugging Face chat templates are written for, and the
checks on a conversation before it is rendered.

Templates come from checkpoints (untrusted code), so they run in jinja2's immutable sandbox.
The environment matches what transformers gives a template: ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML
(``ensure_ascii=False``, with ``indent`` / ``separators`` / ``sort_keys``), the globals
``raise_exception(message)`` and ``strftime_now(format)``, and a ``{% generation %}`` block tag
that renders its body (transformers uses it to mark assistant tokens; we only render).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from layerzero_serve.errors import ValidationError

__all__ = ["CHAT_ROLES", "check_conversation", "render_chat"]

# The roles a message may have. Templates differ in which they accept; these are the ones the
# OpenAI-style chat format defines (and that the common templates handle).
# OpenAI's roles, plus Llama 3.1's tool-output role and the legacy function role
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


def _raise_exception(message: object):
    """What a template calls to reject a conversation (``{{ raise_exception('...') }}``)."""
    from jinja2.exceptions import TemplateError

    raise TemplateError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The compiled template (templates are a few KiB; a checkpoint has one or two)."""
    return _environment().from_string(source)


def render_chat(source: str, messages: list, param: str, variables: dict) -> str:
    """Render ``messages`` with the template ``source`` and the template ``variables``
    (``add_generation_prompt``, ``tools``, ``bos_token``...). A template that does not compile
    raises ``ValidationError("chat_template", ...)``; one that raises while rendering (its own
    ``raise_exception``, an undefined attribute, a type error) a ``ValidationError`` naming
    ``param`` (the conversation it rejected) with the template's message. Host only."""
    from jinja2 import TemplateSyntaxError

    try:
        template = _compile(source)
    except TemplateSyntaxError as e:
        raise ValidationError(
            "chat_template", f"line {e.lineno}", "a Jinja2 template that compiles", str(e)
        ) from None
    try:
        return template.render({**variables, "messages": messages})
    except Exception as e:  # the template is the checkpoint's code: any failure is a rejection
        raise ValidationError(
            param,
            f"a conversation of {len(messages)} messages",
            "what the chat template accepts",
            f"the template raised {type(e).__name__}: {e}",
        ) from None


def _content_ok(content: object, role: str, m: Mapping) -> bool:
    """A str; a list of parts (dicts with a str ``type``, as OpenAI's multi-part content, passed
    to the template as they are); or None for an assistant message that carries
    ``tool_calls``."""
    if isinstance(content, str):
        return True
    if content is None:
        return role == "assistant" and bool(m.get("tool_calls"))
    if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
        return all(isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in content)
    return False


def check_conversation(messages: object, param: str = "messages") -> list[dict]:
    """``messages`` as a list of dicts, each with a ``role`` in :data:`CHAT_ROLES` and a
    ``content``: a str, a list of ``{"type": ...}`` parts, or None for an assistant message
    with ``tool_calls`` (other keys, such as ``name`` or ``tool_calls``, pass through to the
    template). A ValidationError names the field at fault: ``messages``, ``messages[1]``,
    ``messages[1].role``, ``messages[1].content``."""
    allowed = "a list of {'role': str, 'content': str} dicts"
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValidationError(param, type(messages).__name__, allowed)
    if not messages:
        raise ValidationError(param, [], "at least one message")
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, Mapping):
            raise ValidationError(where, type(m).__name__, "a dict with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise ValidationError(f"{where}.{key}", "missing", "present in every message")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValidationError(f"{where}.role", role, f"one of {', '.join(CHAT_ROLES)}")
        if not _content_ok(content, role, m):
            allowed = "a str, a list of {'type': str, ...} parts, or None with tool_calls"
            raise ValidationError(f"{where}.content", type(content).__name__, allowed)
        out.append(dict(m))
    return out
