"""ksdk.chat (templates) and ksdk.reasoning (think/answer split)."""

from __future__ import annotations

import pytest

from ksdk.chat import ChatTemplate, deepseek_r1_chat_template, prompt_opens_reasoning
from ksdk.errors import InvalidRequestError, ModelFileError
from ksdk.reasoning import ReasoningParser, split_reasoning
from ksdk.testing.tokenizer_data import deepseek_tokenizer_fields
from ksdk.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def r1() -> ChatTemplate:
    return ChatTemplate(deepseek_r1_chat_template(), bos_token=BOS, eos_token=EOS)


def test_r1_renders_system_user_assistant(r1: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>secret</think>Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    prompt = r1.render(messages)
    assert prompt == (
        f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}<｜User｜>2+2?<｜Assistant｜><think>\n"
    )
    assert prompt_opens_reasoning(prompt)
    closed = r1.render(messages, add_generation_prompt=False)
    assert closed.endswith("<｜User｜>2+2?") and not prompt_opens_reasoning(closed)


def test_r1_renders_tool_calls_and_outputs(r1: ChatTemplate) -> None:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
    ]
    prompt = r1.render(messages, add_generation_prompt=False)
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```" in prompt
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>" in prompt
    assert prompt.endswith(f"<｜tool▁outputs▁end｜>It is 18C.{EOS}")


def test_content_parts_are_joined(r1: ChatTemplate) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    prompt = r1.render([{"role": "system", "content": [{"type": "text", "text": "sys"}]},
                        {"role": "user", "content": parts}])
    assert prompt == f"{BOS}sys<｜User｜>first\nsecond<｜Assistant｜><think>\n"


def test_non_text_part_is_refused(r1: ChatTemplate) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(InvalidRequestError, match="image_url"):
        r1.render([{"role": "user", "content": parts}])


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}], ["hello"], "hello"])
def test_bad_messages_are_refused(r1: ChatTemplate, messages: object) -> None:
    with pytest.raises(InvalidRequestError):
        r1.render(messages)  # type: ignore[arg-type]


def test_template_errors_become_invalid_request() -> None:
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}", bos_token=BOS, eos_token=EOS)
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        raising.render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="compile"):
        ChatTemplate("{% if %}", bos_token=BOS, eos_token=EOS)


def test_r1_template_rejects_null_user_content(r1: ChatTemplate) -> None:
    with pytest.raises(InvalidRequestError, match="cannot render"):
        r1.render([{"role": "user", "content": None}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{% set _ = messages.append({'role': 'x'}) %}",
        "{% set _ = messages[0].update({'role': 'x'}) %}",
        "{{ raise_exception.__globals__['os'] }}",
    ],
)
def test_sandbox_refuses_internals_and_mutation(source: str) -> None:
    template = ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    with pytest.raises(InvalidRequestError):
        template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["{{ raise_exception.__globals__ }}", "{{ strftime_now.__code__ }}"])
def test_sandbox_hides_unsafe_attributes(source: str) -> None:
    template = ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    assert template.render([{"role": "user", "content": "x"}]) == ""


def test_helpers_hf_templates_expect() -> None:
    source = "{{ tools | tojson }}|{{ {'b': 1, 'a': '<é>'} | tojson(indent=1, sort_keys=true) }}|{{ strftime_now('%Y') }}|{{ foo }}"
    template = ChatTemplate(source, bos_token=BOS, eos_token=EOS)
    out = template.render([{"role": "user", "content": "x"}], tools=[{"name": "f"}], foo="bar")
    tools_json, sorted_json, year, foo = out.split("|")
    assert tools_json == '[{"name": "f"}]'
    assert sorted_json == '{\n "a": "<é>",\n "b": 1\n}'
    assert len(year) == 4 and year.isdigit()
    assert foo == "bar"


def test_from_metadata_uses_file_template_or_r1() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(deepseek_tokenizer_fields())
    fields = deepseek_tokenizer_fields()
    fallback = ChatTemplate.from_metadata(fields, tokenizer)
    assert fallback.source == deepseek_r1_chat_template()
    assert fallback.render([{"role": "user", "content": "x"}]).startswith(tokenizer.bos_token)
    own = ChatTemplate.from_metadata({**fields, "tokenizer.chat_template": "{{ eos_token }}"}, tokenizer)
    assert own.render([{"role": "user", "content": "x"}]) == tokenizer.eos_token
    with pytest.raises(ModelFileError, match="tokenizer.chat_template"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": "{% for %}"}, tokenizer)


def test_rendered_prompt_tokenizes_to_control_tokens(r1: ChatTemplate) -> None:
    tokenizer = Tokenizer.from_gguf_metadata(deepseek_tokenizer_fields())
    ids = tokenizer.encode(r1.render([{"role": "user", "content": "Hi"}]))
    think = tokenizer.token_id("<think>")
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1] == tokenizer.token_id("<｜User｜>")
    assert think is not None and think in ids


# -- reasoning -----------------------------------------------------------------------------------------

_STREAM = "I think 1+1 is 2.</think>\n\nThe answer is 2."


def _feed_in_two(text: str, cut: int, start_in_reasoning: bool) -> tuple[str, str]:
    parser = ReasoningParser(start_in_reasoning)
    results = [parser.feed(text[:cut]), parser.feed(text[cut:]), parser.finish()]
    return "".join(r for r, _ in results), "".join(c for _, c in results)


@pytest.mark.parametrize("cut", range(len(_STREAM) + 1))
def test_close_tag_split_at_every_position(cut: int) -> None:
    assert _feed_in_two(_STREAM, cut, True) == ("I think 1+1 is 2.", "\n\nThe answer is 2.")


_OPENED = "<think>plan</think>done <think> literal"


@pytest.mark.parametrize("cut", range(len(_OPENED) + 1))
def test_open_and_close_tags_split_at_every_position(cut: int) -> None:
    assert _feed_in_two(_OPENED, cut, False) == ("plan", "done <think> literal")


def test_character_by_character_stream_holds_back_only_tag_prefixes() -> None:
    parser = ReasoningParser(True)
    outputs = [parser.feed(ch) for ch in _STREAM]
    # "<" starts a possible tag: nothing may be released until it is decided.
    assert outputs[_STREAM.index("<")] == ("", "")
    assert outputs[0] == ("I", "")
    assert "".join(r for r, _ in outputs) == "I think 1+1 is 2."


def test_split_reasoning_whole_texts() -> None:
    assert split_reasoning("no reasoning here", False) == ("", "no reasoning here")
    assert split_reasoning("answer <think>x</think>", False) == ("", "answer <think>x</think>")
    assert split_reasoning("cut off mid tho", True) == ("cut off mid tho", "")
    assert split_reasoning("ends in </thi", True) == ("ends in </thi", "")
    assert split_reasoning("a</think>b</think>", True) == ("a", "b</think>")
    assert split_reasoning("", True) == ("", "")


def test_tools_with_a_template_that_ignores_them_are_refused() -> None:
    from ksdk.chat import ChatTemplate, deepseek_r1_chat_template

    r1 = ChatTemplate(deepseek_r1_chat_template(), bos_token="<s>", eos_token="</s>")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(InvalidRequestError, match="tools"):
        r1.render([{"role": "user", "content": "hi"}], tools=tools)
    reading = ChatTemplate("{{ tools | length }}", bos_token="<s>", eos_token="</s>")
    assert reading.render([{"role": "user", "content": "hi"}], tools=tools) == "1"
