"""Agents and SGLang's native API from outside the cluster: HTTP, the openai client and SGLang's
own `RuntimeEndpoint`, against the session's `tandem` app (built-in agents from its config)."""

from __future__ import annotations

import inspect
import json

import httpx
import jsonschema
import openai
import pytest
import sglang as sgl

from deployments.agents import programs
from tests.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BUILTINS = ["multi_step_reasoning", "safe_response", "self_consistency"]
QUESTION = "What is the capital of France?"
# The built-in model's greedy answer to QUESTION after the programs' system prompt.
ANSWER = "The capital of France is Paris."


def _post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url, json=body, headers=AUTH, timeout=120, **kw)


def test_list_agents_with_arguments(tandem_app, client):
    r = httpx.get(tandem_app + "/v1/agents", headers=AUTH, timeout=60)
    assert r.status_code == 200
    agents = {a["name"]: a for a in r.json()["data"]}
    assert sorted(agents) == BUILTINS
    assert agents["self_consistency"]["arguments"] == ["question", "num_drafts", "max_tokens", "draft_temperature"]
    assert agents["self_consistency"]["required"] == ["question"]
    assert agents["self_consistency"]["doc"] == inspect.cleandoc(programs.self_consistency.func.__doc__)
    # Agents are also OpenAI models, addressed as agent:<name>.
    assert "agent:self_consistency" in [m.id for m in client.models.list().data]


# name -> (the greedy answer with default arguments, model calls); self_consistency samples its drafts.
# multi_step_reasoning's answer after the tiny model's own review is gibberish: the model's chat answer
# to the same conversation is the same.
BUILTIN_RUNS = {
    "multi_step_reasoning": ("A d spider legs, the robot g widal cal cal cd.", 3),  # draft, review, answer
    "safe_response": (ANSWER, 2),  # draft, the safe/unsafe select
    "self_consistency": (None, 4),  # 3 forked drafts, the select
}


@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_agent_over_http(tandem_app, name):
    r = _post(f"{tandem_app}/v1/agents/{name}", {"question": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    answer, calls = BUILTIN_RUNS[name]
    assert body["agent"] == name and body["variables"]["answer"] == body["answer"]
    if answer is not None:
        assert body["answer"] == answer
    else:  # sampled drafts: the answer is one of them
        assert body["answer"] in [d.strip() for d in body["variables"]["draft"]] and body["answer"]
    assert body["calls"] == calls and len(body["session_id"]) == 32


def test_a_failing_program_is_a_500_with_a_clean_message(tandem_app):
    """Arguments of the right types that the program itself refuses (it raises) fail the run: the
    body says so plainly, with no Ray traceback, actor name or terminal colour codes."""
    r = _post(f"{tandem_app}/v1/agents/safe_response", {"question": "x", "safe_label": "same", "unsafe_label": "same"})
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert (error["code"], error["type"]) == ("agent_program_error", "server_error")
    assert error["message"] == "agent program deployments.programs:safe_response failed: ValueError: safe_label and unsafe_label must differ"


def test_self_consistency_forks_and_selects_a_draft(tandem_app):
    # Greedy drafts, so that every value is known: three forks agree on one candidate.
    body = _post(f"{tandem_app}/v1/agents/self_consistency", {"question": QUESTION, "num_drafts": 3, "draft_temperature": 0}).json()
    assert body["variables"]["draft"] == [ANSWER] * 3  # one per fork
    assert body["variables"]["candidates"] == [ANSWER]
    assert body["answer"] == ANSWER and body["calls"] == 4


def test_agent_stream_names_variables(tandem_app):
    events = []
    with httpx.stream("POST", f"{tandem_app}/v1/agents/multi_step_reasoning", json={"question": QUESTION, "stream": True}, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    deltas = [e for e in events if "variable" in e]
    # Every gen streams: the deltas of each variable add up to its final value.
    assert {e["variable"] for e in deltas} == {"draft", "review", "answer"}
    final = events[-1]
    assert final["done"] is True and set(final["variables"]) == {"draft", "review", "answer"}
    assert final["variables"]["draft"] == ANSWER and final["variables"]["answer"] == BUILTIN_RUNS["multi_step_reasoning"][0]
    for var, value in final["variables"].items():
        assert "".join(e["delta"] for e in deltas if e["variable"] == var) == value, var


def test_agent_through_openai_chat(client):
    r = client.chat.completions.create(model="agent:safe_response", messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content == ANSWER
    agent = r.model_extra["agent"]
    assert agent["name"] == "safe_response" and agent["variables"]["answer"] == r.choices[0].message.content
    stream = client.chat.completions.create(model="agent:safe_response", messages=[{"role": "user", "content": QUESTION}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_agent_errors(tandem_app, client):
    r = _post(f"{tandem_app}/v1/agents/nope", {"question": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found"
    r = _post(f"{tandem_app}/v1/agents/self_consistency", {})
    assert r.status_code == 400 and "question" in r.json()["error"]["message"]
    r = _post(f"{tandem_app}/v1/agents/self_consistency", {"question": "x", "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]
    r = _post(f"{tandem_app}/v1/agents/self_consistency", {"question": "x", "stream": True, "bogus": 1})
    assert r.status_code == 400
    # Argument types come from the program's annotations and defaults; a wrong one is the client's
    # error, named, in clean text (not the replica's traceback), streamed or not.
    for stream in (False, True):
        r = _post(f"{tandem_app}/v1/agents/safe_response", {"question": {"nested": [1]}, "stream": stream})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {
            "message": "agent 'safe_response': argument 'question': Input should be a valid string (expected string, got dict)",
            "type": "invalid_request_error",
            "param": "question",
            "code": "invalid_agent_argument",
        }
    r = _post(f"{tandem_app}/v1/agents/self_consistency", {"question": "x", "num_drafts": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_drafts"
    assert "expected integer, got str" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="agent:nope", messages=[{"role": "user", "content": "x"}])


# -- OpenAI response_format / constraints through the gateway -----------------------------------


def test_response_format_json_schema(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
    }
    r = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_regex_extension_and_bad_regex(client):
    r = client.completions.create(model="tiny-chat", prompt="Phone:", max_tokens=16, temperature=0, extra_body={"regex": "[0-9]{3}-[0-9]{2}"})
    import re

    assert re.fullmatch("[0-9]{3}-[0-9]{2}", r.choices[0].text)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=4, extra_body={"regex": "[0-9"})
    assert "invalid regex" in e.value.body["message"]


# -- SGLang's native API, driven by SGLang's own RuntimeEndpoint -----------------------------------


@sgl.function
def outside_program(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0))
    s += sgl.user("Is that right? Answer yes or no.")
    s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))
    s += "\nA number: " + sgl.gen("number", regex="[0-9]{1,3}", max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def runtime_endpoint(tandem_app):
    # The tiny model uses ChatML; RuntimeEndpoint cannot guess that from the name "builtin:tiny-chat".
    return sgl.RuntimeEndpoint(tandem_app, api_key=API_KEY, chat_template_name="chatml")


def test_runtime_endpoint_runs_an_unmodified_program(runtime_endpoint, client):
    state = outside_program.run(question=QUESTION, backend=runtime_endpoint)
    expected = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32)
    assert state["answer"] == expected.choices[0].message.content == ANSWER
    # The built-in model's deterministic choices: the select at temperature 0, the regex gen greedy.
    assert state["verdict"] == "yes"
    assert state["number"] == "422"


def test_runtime_endpoint_stream_and_batch(runtime_endpoint):
    state = outside_program.run(question=QUESTION, backend=runtime_endpoint, stream=True)
    text = "".join(state.text_iter())
    assert state["answer"] == ANSWER and ANSWER in text
    assert (state["verdict"], state["number"]) == ("yes", "422")
    states = outside_program.run_batch([{"question": QUESTION}, {"question": "你好"}], backend=runtime_endpoint)
    assert [(s["verdict"], s["number"]) for s in states] == [("yes", "422"), ("yes", "710")]


@sgl.function
def answer_with_logprobs(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0, return_logprob=True, top_logprobs_num=2,
                               return_text_in_logprobs=True))


@pytest.mark.parametrize("stream", [False, True])
def test_runtime_endpoint_program_gets_generated_logprobs(runtime_endpoint, stream):
    state = answer_with_logprobs.run(question=QUESTION, backend=runtime_endpoint, stream=stream)
    if stream:
        "".join(state.text_iter())
    assert state["answer"] == ANSWER
    meta = state.get_meta_info("answer")
    tokens = meta["output_token_logprobs"]
    assert len(tokens) == len(meta["output_top_logprobs"]) == meta["completion_tokens"]
    assert "".join(text for _, _, text in tokens).startswith(ANSWER)
    assert all(top[0] == entry and len(top) == 2 for entry, top in zip(tokens, meta["output_top_logprobs"]))


def test_native_endpoints(tandem_app, runtime_endpoint):
    info = httpx.get(tandem_app + "/get_model_info", headers=AUTH, timeout=30).json()
    assert info["model_path"] == "builtin:tiny-chat" and info["is_generation"] is True
    assert runtime_endpoint.get_server_info()["served_model_name"] == "tiny-chat"
    runtime_endpoint.flush_cache()
    r = _post(tandem_app + "/generate", {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    body = r.json()
    assert r.status_code == 200 and (body["text"], body["meta_info"]["completion_tokens"]) == (" Paris of hThe", 4)
    r = _post(tandem_app + "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 4, "stop_regex": "a+"}})
    assert r.status_code == 400 and "stop_regex" in r.json()["error"]["message"]
