"""Chat templates: OpenAI-style messages rendered to a prompt string with the model's Jinja template.

Templates arrive inside downloaded model files, so they run in Jinja's immutable sandbox: they can read the
messages but cannot reach Python internals or mutate the objects they are given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, NoReturn

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ksdk.errors import InvalidRequestError, ModelFileError

if TYPE_CHECKING:
    from ksdk.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "deepseek_r1_chat_template", "prompt_opens_reasoning"]

ROLES = ("system", "user", "assistant", "tool")
_TEMPLATE_KEY = "tokenizer.chat_template"
# Text parts of one message are joined on a newline (vLLM does the same for string-content templates).
_PART_SEPARATOR = "\n"


def deepseek_r1_chat_template() -> str:
    """DeepSeek-R1's published chat template (the revision whose generation prompt ends in ``<think>\\n``)."""
    return resources.files("ksdk").joinpath("data/deepseek-r1-chat-template.jinja").read_text(encoding="utf-8")


def prompt_opens_reasoning(rendered: str, open_tag: str = "<think>") -> bool:
    """Whether a rendered prompt ends inside an opened reasoning block (R1's ends in ``<think>\\n``)."""
    return rendered.rstrip().endswith(open_tag)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False
) -> str:
    # Unlike Jinja's built-in tojson, keep non-ASCII and <>&' as they are: this is a prompt, not HTML.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _content_text(index: int, content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string, null or a list of content parts, "
            f"not {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise InvalidRequestError(
                f"messages[{index}].content[{j}] has type {kind!r}; only 'text' parts are supported"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"messages[{index}].content[{j}].text must be a string")
        texts.append(text)
    return _PART_SEPARATOR.join(texts)


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object, not {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        out.append({**message, "content": _content_text(i, message.get("content"))})
    return out


class ChatTemplate:
    """A Hugging Face-style chat template, compiled once and rendered per request."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
            # Templates that never read `tools` would drop them silently: such models get no tools at all.
            self.reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTemplate:
        """The GGUF file's ``tokenizer.chat_template``, or DeepSeek-R1's template when the file has none."""
        source = metadata.get(_TEMPLATE_KEY) or deepseek_r1_chat_template()
        try:
            return cls(str(source), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        except InvalidRequestError as exc:
            raise ModelFileError(f"{_TEMPLATE_KEY} in the model file is broken: {exc}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages``. Extra keywords reach the template as variables."""
        if tools and not self.reads_tools:
            raise InvalidRequestError("tools: this model's chat template does not describe tools to the model, "
                                      "so tool calling is not supported for it")
        context = {
            **extra,
            "messages": _normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": list(tools) if tools is not None else None,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return self._template.render(**context)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template: {exc.message or exc}") from exc
        except (TypeError, LookupError, ValueError, AttributeError) as exc:
            # e.g. a template concatenating str + None for a message shape it does not expect.
            raise InvalidRequestError(f"chat template cannot render these messages: {exc}") from exc
