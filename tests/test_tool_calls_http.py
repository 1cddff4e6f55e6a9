"""Tool calling and reasoning output over HTTP, with the `openai` client, against the built-in model,
which is trained to call `get_weather` for "What is the weather in <city>?", to answer from the tool's
result, and to think before answering two questions (deployments/models/corpus.py). Every output is
pinned: the model is deterministic."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from deployments.models import corpus
from tests.conftest import API_KEY

MODEL = "tiny-chat"
WEATHER_TOOLS = corpus.WEATHER_TOOLS[0]
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS_RESULT = corpus.WEATHER_CALLS[0][1]
PRIME = [{"role": "user", "content": "Is 7 a prime number?"}]
PRIME_REASONING = "\nA prime number can only be divided by 1 and by itself, and so can 7.\n"


def weather_call(city: str) -> dict:
    return {"name": "get_weather", "arguments": json.dumps({"city": city})}


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=64, **kw)


def stream_chunks(client, **kw) -> list:
    return list(chat(client, stream=True, **kw))


def streamed_calls(chunks) -> list[dict]:
    """Folds streamed tool-call deltas, checking OpenAI's shape: a call's first delta has its index,
    id, type and name; later ones only argument fragments."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index not in calls:
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": delta.function.arguments or ""}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
    return [calls[i] for i in sorted(calls)]


# -- tool_choice "auto": the model's own <tool_call> text, found by the qwen parser --------------------


@pytest.mark.parametrize("city", ["Paris", "Tokyo", "London"])
def test_auto_finds_the_models_call(client, city):
    r = chat(client, messages=[{"role": "user", "content": f"What is the weather in {city}?"}], tools=WEATHER_TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert {"name": call.function.name, "arguments": call.function.arguments} == weather_call(city)


def test_auto_streams_the_call_in_openais_delta_shape(client):
    chunks = stream_chunks(client, messages=PARIS, tools=WEATHER_TOOLS)
    [call] = streamed_calls(chunks)
    assert {"name": call["name"], "arguments": call["arguments"]} == weather_call("Paris")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The call's markup never leaks into content.
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


def test_auto_answers_in_text_when_the_model_does_not_call(client):
    r = chat(client, messages=[{"role": "user", "content": "What is the capital of France?"}], tools=WEATHER_TOOLS)
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == (
        "The capital of France is Paris.", None, "stop")


def test_round_trip_the_tools_result_reaches_the_answer(client):
    first = chat(client, messages=PARIS, tools=WEATHER_TOOLS).choices[0].message
    [call] = first.tool_calls
    history = PARIS + [
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": PARIS_RESULT},
    ]
    r = chat(client, messages=history, tools=WEATHER_TOOLS)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("It is sunny and 22 degrees in Paris.", "stop")
    # Another result, another answer: the answer is the result's, not the question's.
    tokyo = chat(client, messages=[{"role": "user", "content": "What is the weather in Tokyo?"}], tools=WEATHER_TOOLS).choices[0].message
    history = [{"role": "user", "content": "What is the weather in Tokyo?"}, tokyo.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": tokyo.tool_calls[0].id, "content": corpus.WEATHER_CALLS[1][1]}]
    assert chat(client, messages=history, tools=WEATHER_TOOLS).choices[0].message.content == "It is rainy and 18 degrees in Tokyo."


def test_none_leaves_the_tools_out_of_the_prompt(client, tokenizer):
    r = chat(client, messages=PARIS, tools=WEATHER_TOOLS, tool_choice="none")
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == (corpus.NO_TOOL_ANSWER, None)
    plain = tokenizer.apply_chat_template(PARIS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(plain)


# -- forced calls: constrained decoding -----------------------------------------------------------


def test_required_forces_a_call_whose_arguments_validate(client):
    r = chat(client, messages=[{"role": "user", "content": "Hello!"}], tools=WEATHER_TOOLS, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOLS[0]["function"]["parameters"])
    assert call.function.arguments == REQUIRED_HELLO_ARGUMENTS


def test_a_named_function_is_called_in_the_models_own_format(client, tokenizer):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(client, messages=PARIS, tools=WEATHER_TOOLS, tool_choice=named)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's answer to a forced function
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    # The call's opener was written into the prompt: the model wrote only the JSON body.
    opened = tokenizer.apply_chat_template(PARIS, tools=WEATHER_TOOLS, add_generation_prompt=True, tokenize=False) + "<tool_call>\n"
    assert whole.usage.prompt_tokens == len(tokenizer.encode(opened, add_special_tokens=False))
    chunks = stream_chunks(client, messages=PARIS, tools=WEATHER_TOOLS, tool_choice=named)
    [streamed] = streamed_calls(chunks)
    assert (streamed["name"], streamed["arguments"]) == ("get_weather", '{"city": "Paris"}')


def test_a_named_function_on_a_model_without_a_parser_streams_its_arguments_as_written(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny-chat-b", messages=PARIS, tools=WEATHER_TOOLS, tool_choice=named, temperature=0, max_tokens=64)
    [call] = r.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOLS[0]["function"]["parameters"])
    assert call.function.arguments == UNPARSED_NAMED_PARIS_ARGUMENTS
    chunks = list(client.chat.completions.create(model="tiny-chat-b", messages=PARIS, tools=WEATHER_TOOLS, tool_choice=named,
                                                 temperature=0, max_tokens=64, stream=True))
    [streamed] = streamed_calls(chunks)
    assert streamed["arguments"] == UNPARSED_NAMED_PARIS_ARGUMENTS
    fragments = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len(fragments) > 2  # the arguments arrive in pieces, as written


# -- reasoning ---------------------------------------------------------------------------------------


def test_reasoning_content_apart_from_content(client, tokenizer):
    r = chat(client, messages=PRIME)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (PRIME_REASONING, "Yes, 7 is a prime number.")
    # Reasoning tokens: the think block's, tags included, as the model generated them.
    thought = tokenizer.encode(f"<think>{PRIME_REASONING}</think>", add_special_tokens=False)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(thought)
    assert r.usage.completion_tokens == len(thought) + len(tokenizer.encode("\n\nYes, 7 is a prime number.<|im_end|>"))


def test_reasoning_streams_as_delta_reasoning_content(client):
    chunks = list(chat(client, messages=PRIME, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == PRIME_REASONING
    assert "".join(d.content or "" for d in deltas) == "Yes, 7 is a prime number."
    # Reasoning comes first: no content before the last reasoning piece.
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, reverse=True)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == chat(client, messages=PRIME).usage.completion_tokens_details.reasoning_tokens


def test_enable_thinking_false_through_chat_template_kwargs(client):
    r = chat(client, messages=PRIME, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = r.choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (None, "Yes, 7 is a prime number.")
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_tokenize_renders_tools_as_chat_does(http, tokenizer):
    r = http.post("/tokenize", json={"model": MODEL, "messages": PARIS, "tools": WEATHER_TOOLS})
    assert r.status_code == 200, r.text
    expected = tokenizer.apply_chat_template(PARIS, tools=WEATHER_TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.json()["tokens"] == expected


# -- bad input: each a 400 naming its field -------------------------------------------------------


def bad(client, param: str, match: str, **kw):
    with pytest.raises(openai.BadRequestError, match=match) as e:
        chat(client, **kw)
    assert e.value.body["param"] == param
    return e.value


def test_a_tool_whose_parameters_are_not_a_json_schema(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    bad(client, "tools[0].function.parameters", "Invalid schema for function 'f'", messages=PARIS, tools=tools)


def test_tool_choice_naming_an_unknown_function(client):
    bad(client, "tool_choice.function.name", "no function named 'nope'", messages=PARIS, tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "nope"}})


def test_a_tool_message_answering_no_earlier_call(client):
    history = PARIS + [{"role": "tool", "tool_call_id": "call_404", "content": "{}"}]
    bad(client, "messages[1].tool_call_id", "no earlier assistant message has a tool call with id 'call_404'",
        messages=history, tools=WEATHER_TOOLS)


def test_call_arguments_in_history_must_be_a_json_object(client):
    history = PARIS + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "Paris"}}]}]
    bad(client, "messages[1].tool_calls[0].function.arguments", "expected a JSON object", messages=history, tools=WEATHER_TOOLS)


def test_top_logprobs_over_20(client):
    bad(client, "top_logprobs", "less than or equal to 20", messages=PARIS, logprobs=True, top_logprobs=21)


def test_tool_choice_without_tools(client):
    bad(client, "tool_choice", "only allowed when 'tools' are specified", messages=PARIS, tool_choice="auto")


def test_auto_on_a_model_without_a_parser(client):
    with pytest.raises(openai.BadRequestError, match="has no tool-call parser") as e:
        client.chat.completions.create(model="tiny-chat-b", messages=PARIS, tools=WEATHER_TOOLS)
    assert e.value.body["param"] == "tool_choice"
    # (A forced call needs no parser: test_a_named_function_on_a_model_without_a_parser_...)


def test_reserved_chat_template_kwargs(client):
    bad(client, "chat_template_kwargs", "may not set add_generation_prompt", messages=PARIS,
        extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})


def test_agent_models_take_no_tools(client):
    with pytest.raises(openai.BadRequestError, match="agent models take no tools") as e:
        client.chat.completions.create(model="agent:multi_step_reasoning", messages=PARIS, tools=WEATHER_TOOLS)
    assert e.value.body["param"] == "tools"


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url.removesuffix("/v1"), headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


# Pinned from the built-in model under the constraint (see the two tests above).
# Forced, the model calls for the city it knows best when the question names none.
REQUIRED_HELLO_ARGUMENTS = '{"city": "Tokyo"}'
# Without a parser, vLLM's way: the bare arguments object, which this model was never taught to write
# after its prompt: the constraint still makes it a valid call, of a string the model drifts into.
UNPARSED_NAMED_PARIS_ARGUMENTS = '{"city": "get_weather "}'
