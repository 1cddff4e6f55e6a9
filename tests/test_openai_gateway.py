"""The OpenAI-compatible gateway over real HTTP, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.conftest import API_KEY

MODEL = "tiny-chat"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The built-in model's greedy answer to QUESTION (deterministic: the tests pin it).
ANSWER = "The capital of France is Paris."


def test_list_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-chat", "tiny-chat-b", "agent:multi_step_reasoning", "agent:safe_response", "agent:self_consistency"]


def test_health(tandem_app):
    r = httpx.get(tandem_app + "/health", timeout=30)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["models"] == {"tiny-chat": "ok", "tiny-chat-b": "ok"}


def test_chat_greedy_is_deterministic_and_ends_with_stop(client):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    # Same greedy answer on every call, whichever of the three replicas serves it.
    for _ in range(4):
        again = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64)
        assert again.choices[0].message.content == choice.message.content


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64)
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_framing_ends_with_done(tandem_app):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.stream("POST", tandem_app + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_stop_string_is_cut(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64).choices[0].message.content
    stop = full.split()[2] if len(full.split()) > 2 else full[len(full) // 2:]
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def test_n_and_seed_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=1.0, top_p=0.9, max_tokens=24, n=3, seed=7)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_completions_text_list_tokens_and_echo(client):
    one = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and (one.choices[0].text, one.choices[0].finish_reason) == (" Paris of hThe France", "length")
    many = client.completions.create(model=MODEL, prompt=["The capital of France is", "Hello"], max_tokens=5, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    echo = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert echo.choices[0].text == "Hello" + plain.choices[0].text == "Hello! I I"
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def test_completions_stream(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    parts = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts if c.choices) == full.choices[0].text


def test_second_model_is_its_own_deployment(client):
    r = client.chat.completions.create(model="tiny-chat-b", messages=QUESTION, temperature=0, max_tokens=64)
    ref = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64)
    assert r.model == "tiny-chat-b" and r.choices[0].message.content == ref.choices[0].message.content


def test_chinese_stream_never_garbles(client):
    # A question from the built-in model's training corpus: its greedy answer is valid Chinese.
    messages = [{"role": "user", "content": "给我讲一个故事。"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48)
    text = full.choices[0].message.content
    assert "\ufffd" not in text and any("\u4e00" <= ch <= "\u9fff" for ch in text), text
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48, stream=True) if c.choices and c.choices[0].delta.content]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


async def test_async_client_sixteen_concurrent_requests(async_client, client):
    prompts = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "你好", "What color is the sky?", "What is 2+2?")]
    expected = [client.chat.completions.create(model=MODEL, messages=p, temperature=0, max_tokens=32).choices[0].message.content for p in prompts]
    calls = [async_client.chat.completions.create(model=MODEL, messages=prompts[i % 4], temperature=0, max_tokens=32) for i in range(16)]
    results = await asyncio.gather(*calls)
    assert [r.choices[0].message.content for r in results] == [expected[i % 4] for i in range(16)]


async def test_async_stream(async_client):
    stream = await async_client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == ANSWER


# -- errors: the OpenAI error shape with the right status -------------------------------------


def _error(exc_info):
    body = exc_info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=QUESTION)
    body = _error(e)
    assert body["code"] == "model_not_found" and "tiny-chat" in body["message"] and body["param"] == "model"


def test_invalid_parameters_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=3)
    assert _error(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"frobnicate": 1})
    assert "Unrecognized request argument supplied: frobnicate" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert _error(e)["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, stop=["a", "b", "c", "d", "e"])


def test_prompt_longer_than_context_is_400_with_both_numbers(client, model_handle):
    max_len = model_handle.model_info.remote().result()["max_model_len"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * (max_len + 10), max_tokens=1)
    body = _error(e)
    assert body["code"] == "context_length_exceeded"
    assert str(max_len) in body["message"] and str(max_len + 10) in body["message"]


def test_stream_errors_come_before_the_stream(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[5] * 100_000, max_tokens=1, stream=True)


def test_auth_missing_and_wrong_key_are_401(base_url):
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(base_url + "/chat/completions", json={"model": MODEL, "messages": QUESTION}, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base_url + "/models", headers={"Authorization": "Bearer sk-second-key"}, timeout=30).status_code == 200


@pytest.mark.parametrize("message", [
    {"role": "user", "content": None},
    {"role": "user"},
    {"role": "assistant", "content": None},
])
def test_a_message_without_content_is_400_as_openai_answers(base_url, message):
    body = {"model": MODEL, "messages": [*QUESTION, message] if message["role"] == "assistant" else [message]}
    r = httpx.post(base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    index = 1 if message["role"] == "assistant" else 0
    assert r.json()["error"] == {
        "message": f"messages.{index}: content is required for a {message['role']!r} message (got null or nothing)",
        "type": "invalid_request_error", "param": f"messages.{index}", "code": "invalid_value",
    }


def test_bad_json_is_400(base_url):
    r = httpx.post(base_url + "/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# -- Python handle calls (the README's example) -----------------------------------------------


def test_handle_calls(model_handle):
    answer = model_handle.chat.remote(QUESTION, temperature=0, max_tokens=64).result()
    assert answer["finish_reason"] == "stop" and answer["text"] == ANSWER
    replicas = {model_handle.chat.remote(QUESTION, temperature=0, max_tokens=64).result()["replica"] for _ in range(32)}
    texts = {model_handle.chat.remote(QUESTION, temperature=0, max_tokens=64).result()["text"] for _ in range(4)}
    assert texts == {answer["text"]}
    assert len(replicas) == 3, "requests without a session id spread over all replicas"
    scores = model_handle.score.remote("The capital of France is", [" Paris.", " zebra banana"]).result()
    assert scores[0] > scores[1]
    deltas = list(model_handle.options(stream=True).stream.remote(prompt="The capital of France is", max_tokens=8, temperature=0))
    assert "".join(d.get("text", "") for d in deltas) == " Paris of hThe France?"
    assert (deltas[-1]["finish_reason"], deltas[-1]["completion_tokens"]) == ("stop", 7)
    assert set(model_handle.stats.remote().result()) >= {"running", "waiting", "kv_cache_usage", "tokens_per_s"}
    with pytest.raises(ValueError, match="temperature"):
        model_handle.chat.remote(QUESTION, temperature=-1).result()
