"""Agents and SGLang's native API from outside the cluster: HTTP, the openai client and SGLang's
own `RuntimeEndpoint`, against the session's `tandem` app (built-in agents from its config)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import sglang as sgl

from tests.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BUILTINS = ["multi_step_reasoning", "safe_response", "self_consistency"]
QUESTION = "What is the capital of France?"


def _post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url, json=body, headers=AUTH, timeout=120, **kw)


def test_list_agents_with_arguments(tandem_app, client):
    r = httpx.get(tandem_app + "/v1/agents", headers=AUTH, timeout=60)
    assert r.status_code == 200
    agents = {a["name"]: a for a in r.json()["data"]}
    assert sorted(agents) == BUILTINS
    assert agents["self_consistency"]["arguments"][0] == "question"
    assert agents["self_consistency"]["required"] == ["question"]
    assert agents["self_consistency"]["doc"]
    # Agents are also OpenAI models, addressed as agent:<name>.
    assert "agent:self_consistency" in [m.id for m in client.models.list().data]


@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_agent_over_http(tandem_app, name):
    r = _post(f"{tandem_app}/v1/agents/{name}", {"question": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["agent"] == name and body["answer"]
    assert body["variables"]["answer"] == body["answer"]
    assert body["calls"] >= 2 and body["session_id"]


def test_self_consistency_forks_and_selects_a_draft(tandem_app):
    body = _post(f"{tandem_app}/v1/agents/self_consistency", {"question": QUESTION, "num_drafts": 3}).json()
    drafts = body["variables"]["draft"]  # one per fork
    assert len(drafts) == 3
    assert body["answer"] in [d.strip() for d in drafts]


def test_agent_stream_names_variables(tandem_app):
    events = []
    with httpx.stream("POST", f"{tandem_app}/v1/agents/multi_step_reasoning", json={"question": QUESTION, "stream": True}, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    deltas = [e for e in events if "variable" in e]
    assert {e["variable"] for e in deltas} >= {"answer"}
    final = events[-1]
    assert final["done"] is True
    for var, value in final["variables"].items():
        streamed = "".join(e["delta"] for e in deltas if e["variable"] == var)
        if streamed:
            assert streamed == value


def test_agent_through_openai_chat(client):
    r = client.chat.completions.create(model="agent:safe_response", messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content
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
    s += "\nA number: " + sgl.gen("number", regex="[0-9]{1,3}", max_tokens=8)


@pytest.fixture(scope="module")
def runtime_endpoint(tandem_app):
    # The tiny model uses ChatML; RuntimeEndpoint cannot guess that from the name "builtin:tiny-chat".
    return sgl.RuntimeEndpoint(tandem_app, api_key=API_KEY, chat_template_name="chatml")


def test_runtime_endpoint_runs_an_unmodified_program(runtime_endpoint, client):
    state = outside_program.run(question=QUESTION, backend=runtime_endpoint)
    expected = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32)
    assert state["answer"] == expected.choices[0].message.content
    assert state["verdict"] in ("yes", "no")
    assert state["number"].isdigit()


def test_runtime_endpoint_stream_and_batch(runtime_endpoint):
    state = outside_program.run(question=QUESTION, backend=runtime_endpoint, stream=True)
    text = "".join(state.text_iter())
    assert state["answer"] in text
    states = outside_program.run_batch([{"question": QUESTION}, {"question": "你好"}], backend=runtime_endpoint)
    assert all(s["verdict"] in ("yes", "no") for s in states)


def test_native_endpoints(tandem_app, runtime_endpoint):
    info = httpx.get(tandem_app + "/get_model_info", headers=AUTH, timeout=30).json()
    assert info["model_path"] == "builtin:tiny-chat" and info["is_generation"] is True
    assert runtime_endpoint.get_server_info()["served_model_name"] == "tiny-chat"
    runtime_endpoint.flush_cache()
    r = _post(tandem_app + "/generate", {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    body = r.json()
    assert r.status_code == 200 and body["meta_info"]["completion_tokens"] <= 4
    r = _post(tandem_app + "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 4, "frequency_penalty": 0.5}})
    assert r.status_code == 400 and "frequency_penalty" in r.json()["error"]["message"]
