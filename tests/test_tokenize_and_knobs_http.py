"""Over HTTP: /tokenize and /detokenize, context lengths in /v1/models, the sampling knobs clients
send (penalties, min_tokens, min_p, logit_bias) and the fields accepted for client compatibility."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import API_KEY

MODEL = "tiny-chat"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, headers=AUTH, timeout=60)


def _error(e: pytest.ExceptionInfo) -> dict:
    return e.value.response.json()["error"]


# -- /tokenize, /detokenize, /v1/models ------------------------------------------------------------


def test_tokenize_a_prompt_and_messages_as_generation_sees_them(tandem_app, client, tokenizer, model_handle):
    max_len = model_handle.model_info.remote().result()["max_model_len"]
    text = "中国的首都是哪里？ The capital of France is"
    r = _post(tandem_app + "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200
    ids = tokenizer(text)["input_ids"]
    assert r.json() == {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": tokenizer.convert_ids_to_tokens(ids)}

    r = _post(tandem_app + "/tokenize", {"model": MODEL, "messages": QUESTION})
    templated = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.json()["tokens"] == templated
    # The count is the prompt_tokens a chat completion of the same messages reports.
    usage = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1).usage
    assert r.json()["count"] == usage.prompt_tokens
    without = _post(tandem_app + "/tokenize", {"model": MODEL, "messages": QUESTION, "add_generation_prompt": False}).json()
    assert without["tokens"] == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert without["count"] < r.json()["count"]


def test_detokenize_round_trips_and_names_both_fields(tandem_app, tokenizer):
    text = "一个星期有七天。 Seven days."
    tokens = _post(tandem_app + "/tokenize", {"model": MODEL, "prompt": text}).json()["tokens"]
    r = _post(tandem_app + "/detokenize", {"model": MODEL, "tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": text, "text": text}


@pytest.mark.parametrize(
    "path, body, status, param, fragment",
    [
        ("/tokenize", {"model": MODEL}, 400, None, "give exactly one of prompt or messages"),
        ("/tokenize", {"model": MODEL, "prompt": "a", "messages": QUESTION}, 400, None, "give exactly one of prompt or messages"),
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model", "The model 'nope' does not exist"),
        ("/tokenize", {"model": MODEL, "prompt": "a", "extra": 1}, 400, "extra", "Unrecognized request argument supplied: extra"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, None, "tokens must be token ids in [0, "),
        ("/detokenize", {"model": MODEL, "tokens": "abc"}, 400, "tokens", "tokens"),
    ],
)
def test_tokenizer_endpoints_bad_input(tandem_app, path, body, status, param, fragment):
    r = _post(tandem_app + path, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param


def test_models_list_their_context_length(client, model_handle):
    max_len = model_handle.model_info.remote().result()["max_model_len"]
    entries = {m.id: m.model_dump() for m in client.models.list().data}
    assert entries["tiny-chat"]["max_model_len"] == max_len
    assert "max_model_len" not in entries["agent:safe_response"]


# -- sampling knobs --------------------------------------------------------------------------------


def test_logit_bias_forces_and_forbids_tokens(client, tokenizer):
    forced = tokenizer.encode(" zebra", add_special_tokens=False)[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == tokenizer.decode([forced])
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0).choices[0].text
    first = tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100}).choices[0].text
    assert banned != plain


def test_min_tokens_holds_off_the_end(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64)
    n = plain.usage.completion_tokens
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, extra_body={"min_tokens": n + 3})
    assert r.usage.completion_tokens >= n + 3
    assert r.choices[0].message.content.startswith(ANSWER) and r.choices[0].message.content != ANSWER


def test_penalties_reach_the_engine_alike_over_http_and_handles(tandem_app, client):
    # tests/test_sampling_knobs.py pins their meaning on the engine; here: the gateway passes them on.
    # On tiny-chat-b, which has no reasoning parser, so that the HTTP answer is the raw text a handle
    # returns (with repetition_penalty the model wanders into a <think> block, which tiny-chat's
    # parser would move to reasoning_content).
    from ray import serve

    model, handle = "tiny-chat-b", serve.get_deployment_handle("BaseModel-tiny-chat-b", app_name="tandem")
    count = [{"role": "user", "content": "Count from 1 to 20."}]
    plain = client.chat.completions.create(model=model, messages=count, temperature=0, max_tokens=30).choices[0].message.content
    for knobs, extra in (({"frequency_penalty": 2.0}, {}), ({}, {"repetition_penalty": 3.0})):
        got = client.chat.completions.create(model=model, messages=count, temperature=0, max_tokens=30, extra_body=extra, **knobs)
        text = got.choices[0].message.content
        assert text != plain, (knobs, extra)
        assert text == handle.chat.remote(count, temperature=0, max_tokens=30, **knobs, **extra).result()["text"]


def test_min_p_one_keeps_only_the_top_token(client):
    sampled = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=1.5, seed=3, max_tokens=64,
                                             extra_body={"min_p": 1.0})
    assert sampled.choices[0].message.content == ANSWER


def test_fields_clients_send_are_accepted_and_change_nothing(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, store=False, metadata={"team": "search"},
        service_tier="auto", user="u-1", extra_body={"prompt_cache_key": "k", "safety_identifier": "s"},
    )
    assert r.choices[0].message.content == ANSWER


@pytest.mark.parametrize(
    "kwargs, param, fragment",
    [
        ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "keys must be token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "values must be in [-100, 100]"),
        ({"service_tier": "flex"}, "service_tier", "'auto' or 'default'"),
        ({"extra_body": {"min_p": 2}}, "min_p", "less than or equal to 1"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty", "greater than 0"),
        ({"extra_body": {"min_tokens": 9}, "max_tokens": 4}, None, "min_tokens must be an integer in [0, max_tokens=4]"),
        ({"logit_bias": {str(10**7): 5}}, None, "logit_bias keys must be token ids in [0, "),
    ],
)
def test_bad_knobs_are_400_naming_the_field(client, kwargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, **kwargs)
    error = _error(e)
    assert fragment in error["message"] and error["param"] == param
