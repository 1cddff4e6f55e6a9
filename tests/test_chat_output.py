"""Splitting a chat answer into reasoning, content and tool calls (cluster/chat_output.py), and the
constraint that forces calls: pure functions, checked streamed in every chunking against one-shot."""

from __future__ import annotations

import json

import pytest

from cluster.chat_output import (
    ChatOutputParser,
    OutputPlan,
    ReasoningDelta,
    collect_output,
    finish_with_calls,
    forced_call_constraint,
)
from cluster.openai_protocol import ChatCompletionRequest, NamedToolChoice, OpenAIError
from cluster.parsers import ContentDelta, ToolCallDelta
from cluster.parsers.tool_calls import JSONArrayToolCallParser, NamedFunctionStream

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def run(plan: OutputPlan, chunks: list[str], ids: list[list[int]] | None = None):
    parser = plan.new_parser()
    events = []
    for i, chunk in enumerate(chunks):
        events += parser.feed(chunk, ids[i] if ids else None)
    return events + parser.finish(), parser


def chunkings(text: str):
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


def without_ids(calls: list[dict]) -> list[dict]:
    return [{**c, "id": None} for c in calls]


# -- the constraint of a forced call -----------------------------------------------------------------


def schema_and_opener(req, parser=None):
    constraint, opener = forced_call_constraint(req, parser)
    return json.loads(constraint["json_schema"]), opener


def call_body(name: str, key: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, key: params}, "required": ["name", key]}


@pytest.mark.parametrize(("parser", "opener", "key"), [("qwen", "<tool_call>\n", "arguments"), ("llama3", "", "parameters"),
                                                      ("internlm", "<|action_start|><|plugin|>\n", "parameters")])
def test_a_forced_call_is_the_familys_own_call_body_after_its_opener(parser, opener, key):
    named = request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert schema_and_opener(named, parser) == (call_body("get_time", key, TIME["function"]["parameters"]), opener)
    required = request(tools=[WEATHER, TIME], tool_choice="required")
    assert schema_and_opener(required, parser) == ({"anyOf": [
        call_body("get_weather", key, WEATHER["function"]["parameters"]), call_body("get_time", key, TIME["function"]["parameters"]),
    ]}, opener)


def test_a_family_whose_call_is_not_a_json_object_falls_back_to_vllms_schemas():
    named = request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert schema_and_opener(named, "deepseekv3") == (TIME["function"]["parameters"], "")


def test_named_function_is_constrained_to_its_parameters_schema():
    req = request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert schema_and_opener(req) == (TIME["function"]["parameters"], "")


def test_required_is_an_array_of_calls_each_held_to_its_functions_schema():
    req = request(tools=[WEATHER, TIME], tool_choice="required")
    schema, _ = schema_and_opener(req)
    assert schema == {
        "type": "array", "minItems": 1,
        "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"type": "string", "enum": ["get_weather"]},
                                              "parameters": WEATHER["function"]["parameters"]},
             "required": ["name", "parameters"]},
            {"type": "object", "properties": {"name": {"type": "string", "enum": ["get_time"]},
                                              "parameters": TIME["function"]["parameters"]},
             "required": ["name", "parameters"]},
        ]},
    }
    one, _ = schema_and_opener(request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert one["maxItems"] == 1 and one["items"]["properties"]["name"]["enum"] == ["get_weather"]


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_auto_and_none_are_not_constrained(choice):
    assert forced_call_constraint(request(tools=[WEATHER], **({"tool_choice": choice} if choice else {})), "qwen") == ({}, "")


def test_a_forced_call_and_a_response_format_conflict():
    with pytest.raises(OpenAIError, match="cannot be combined") as e:
        forced_call_constraint(request(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}))
    assert e.value.param == "tool_choice"


# -- forced calls' parsers -------------------------------------------------------------------------


def test_named_function_streams_its_arguments_as_written():
    parser = NamedFunctionStream("get_weather", id_factory=lambda: "call_1")
    events = parser.feed('{"city": ') + parser.feed('"Paris"}') + parser.feed("\n") + parser.finish()
    # Whitespace is held until text follows it; after the object (a constraint allows one newline) it is dropped.
    assert events == [
        ToolCallDelta(0, id="call_1", name="get_weather"),
        ToolCallDelta(0, arguments='{"city":'),
        ToolCallDelta(0, arguments=' "Paris"}'),
    ]


TWO_CALLS = '[{"name": "get_weather", "parameters": {"city": "Paris, \\"FR\\" {x}"}}, {"name": "get_time", "parameters": {"zone": "CET"}}]'


@pytest.mark.parametrize("chunks", list(chunkings(TWO_CALLS)))
def test_required_array_releases_each_call_in_any_chunking(chunks):
    parser = JSONArrayToolCallParser(id_factory=lambda: "id")
    events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
    content, _, calls = collect_output(events)
    assert content == ""
    assert calls == [
        {"id": "id", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris, \\"FR\\" {x}"}'}},
        {"id": "id", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]


def test_required_array_releases_a_call_as_soon_as_its_object_closes():
    parser = JSONArrayToolCallParser(id_factory=lambda: "id")
    assert parser.feed('[{"name": "get_time", "parameters": {"zone": "UTC"}') == []
    assert parser.feed("}") == [ToolCallDelta(0, id="id", name="get_time"), ToolCallDelta(0, arguments='{"zone": "UTC"}')]


def test_text_that_is_not_the_constrained_array_stays_content():
    parser = JSONArrayToolCallParser()
    assert collect_output(parser.feed("I would rather not.") + parser.finish()) == ("I would rather not.", None, [])


# -- reasoning, then content or calls ----------------------------------------------------------------

THINK_AND_CALL = '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("chunks", list(chunkings(THINK_AND_CALL)))
def test_reasoning_then_a_call_in_any_chunking(chunks):
    events, _ = run(OutputPlan(tool_parser="qwen", reasoning_parser="qwen3"), chunks)
    content, reasoning, calls = collect_output(events)
    assert (content, reasoning) == ("", "\nI need the weather.\n")
    assert without_ids(calls) == [{"id": None, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


THINK_AND_ANSWER = "<think>\n7 is only divisible by 1 and 7.\n</think>\n\nYes, 7 is prime."


@pytest.mark.parametrize("chunks", list(chunkings(THINK_AND_ANSWER)))
def test_content_after_reasoning_starts_at_its_first_non_blank_character(chunks):
    events, _ = run(OutputPlan(reasoning_parser="qwen3"), chunks)
    assert collect_output(events) == ("Yes, 7 is prime.", "\n7 is only divisible by 1 and 7.\n", [])


def test_without_thinking_everything_is_content_and_no_token_is_reasoning():
    events, parser = run(OutputPlan(reasoning_parser="qwen3", enable_thinking=False), ["Yes, 7", " is prime."], [[5, 6], [7]])
    assert collect_output(events) == ("Yes, 7 is prime.", None, [])
    assert parser.reasoning_tokens == 0


def test_an_answer_without_a_think_block_has_no_reasoning_tokens():
    events, parser = run(OutputPlan(reasoning_parser="qwen3", think_end_ids=(99,)), ["Hello", "!"], [[1], [2]])
    assert collect_output(events) == ("Hello!", None, [])
    assert parser.reasoning_tokens == 0


def test_reasoning_tokens_end_at_the_end_tags_tokens_even_inside_a_merged_delta():
    # <think>=90, </think>=99: tokens [90, 1, 2, 99] are reasoning; the same delta carries content.
    chunks = ["<think>\nab", "\n</think>\n\nYes"]
    _, parser = run(OutputPlan(reasoning_parser="qwen3", think_end_ids=(99,)), chunks, [[90, 1], [2, 99, 3, 4]])
    assert parser.reasoning_tokens == 4
    # The tag's ids unknown: the whole delta that ended the reasoning counts.
    _, parser = run(OutputPlan(reasoning_parser="qwen3"), chunks, [[90, 1], [2, 99, 3, 4]])
    assert parser.reasoning_tokens == 6
    # Cut off while thinking: every token is reasoning.
    _, parser = run(OutputPlan(reasoning_parser="qwen3", think_end_ids=(99,)), ["<think>\nab", "c"], [[90, 1], [2]])
    assert parser.reasoning_tokens == 3


def test_a_forced_call_is_not_split_for_reasoning():
    plan = OutputPlan(forced=NamedToolChoice.model_validate({"type": "function", "function": {"name": "f"}}), reasoning_parser="qwen3")
    events, _ = run(plan, ['{"a": "<think>"}'])
    assert not any(isinstance(e, ReasoningDelta) for e in events)
    assert collect_output(events)[2][0]["function"]["arguments"] == '{"a": "<think>"}'


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = "".join(f'<tool_call>\n{{"name": "{n}", "arguments": {{}}}}\n</tool_call>' for n in ("a", "b"))
    events, parser = run(OutputPlan(tool_parser="qwen", max_calls=1), [two])
    assert [c["function"]["name"] for c in collect_output(events)[2]] == ["a"]
    assert parser.calls == 1


def test_content_around_a_call_is_kept():
    events, _ = run(OutputPlan(tool_parser="qwen"), ['Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'])
    content, reasoning, calls = collect_output(events)
    assert (content, reasoning, calls[0]["function"]) == ("Let me check.", None, {"name": "a", "arguments": '{"x": 1}'})
    assert isinstance(events[0], ContentDelta)


@pytest.mark.parametrize(
    ("finish", "forced", "calls", "expected"),
    [("stop", None, 1, "tool_calls"), ("stop", "required", 2, "tool_calls"), ("length", None, 1, "length"),
     ("stop", None, 0, "stop"), ("stop", NamedToolChoice.model_validate({"type": "function", "function": {"name": "f"}}), 1, "stop")],
)
def test_finish_reason_with_calls(finish, forced, calls, expected):
    assert finish_with_calls(finish, OutputPlan(forced=forced), calls) == expected


def test_a_native_forced_call_is_read_from_its_json_body():
    plan = OutputPlan(tool_parser="qwen", forced=NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}}))
    assert plan.native and not OutputPlan(tool_parser="deepseekv3", forced="required").native
    for chunks in chunkings('{"name": "get_weather", "arguments": {"city": "Paris"}}'):
        events, parser = run(plan, chunks)
        assert without_ids(collect_output(events)[2]) == [
            {"id": None, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


def test_a_native_named_call_streams_its_arguments_as_written():
    plan = OutputPlan(tool_parser="qwen", forced=NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}}))
    parser = plan.new_parser()
    events = [e for piece in ('{"name": "get_weather", "arg', 'uments": {"ci', 'ty": "Par', 'is"}}', "\n") for e in parser.feed(piece)]
    events += parser.finish()
    assert [(e.name, e.arguments) for e in events] == [
        ("get_weather", ""), (None, '{"ci'), (None, 'ty": "Par'), (None, 'is"}'),  # the body's own "}" is not theirs
    ]


def test_parser_choice_follows_the_plan():
    assert isinstance(OutputPlan(tool_parser="qwen").new_parser(), ChatOutputParser)
    assert not OutputPlan().active and OutputPlan(reasoning_parser="deepseek-r1").active
