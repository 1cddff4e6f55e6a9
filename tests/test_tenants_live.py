"""Tenants through the live gateway: a keys file with per-key models, agents, limits and admin
rights, on an application with two gateway replicas (limits must hold across both), re-read when
it changes; and overload answered at once with 503 + Retry-After.

(The keys file's parsing and the limit arithmetic are unit-tested in tests/test_tenants.py.)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from cluster.tenants import hash_key

APP = "tenants-test"
PREFIX = "/tenants-test"
SMALL = {"kind": "cpu", "cpus": 0.1}
KEYS = {name: f"sk-{name}-0123456789" for name in ("alpha", "beta", "gamma", "delta", "root", "newcomer")}
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def _tenants(*extra: dict) -> dict:
    return {"tenants": [
        {"name": "alpha", "key_sha256": hash_key(KEYS["alpha"]), "requests_per_minute": 3},
        {"name": "beta", "key_sha256": hash_key(KEYS["beta"]), "tokens_per_minute": 40},
        {"name": "gamma", "key_sha256": hash_key(KEYS["gamma"]), "max_concurrent_requests": 1},
        {"name": "delta", "key_sha256": [hash_key(KEYS["delta"])], "models": ["tiny-chat"], "agents": []},
        {"name": "root", "key_sha256": hash_key(KEYS["root"]), "admin": True},
        *extra,
    ]}


def _write(path: Path, doc: dict) -> None:
    # Atomically, as the KeyStore's docstring asks: no read sees half a file.
    tmp = path.with_suffix(".tmp.yaml")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    _write(path, _tenants())
    return path


@pytest.fixture(scope="module")
def tenants_app(tandem_app, keys_file):
    from ray import serve

    from cluster.app import build_app

    args = {
        "models": [
            {
                "name": "tiny-chat", "source": "builtin:tiny-chat", "engine": "transformers", "accelerator": SMALL,
                # Two requests at a time, one more queued per caller: the third at once is refused.
                "replicas": {"min": 1, "max": 1, "target_ongoing_requests": 1, "max_ongoing_requests": 2, "max_queued_requests": 1},
            },
            {"name": "tiny-chat-b", "source": "builtin:tiny-chat", "engine": "transformers", "accelerator": SMALL},
        ],
        "agents": [{"name": "safe_response", "program": "deployments.programs:safe_response", "model": "tiny-chat", "cpus": 0.05}],
        "gateway": {"keys_file": str(keys_file), "replicas": 2, "cpus": 0.05},
    }
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    yield f"{tandem_app}{PREFIX}"
    serve.delete(APP, _blocking=False)


def _post(url: str, path: str, key: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def _chat(url: str, key: str, **extra) -> httpx.Response:
    return _post(url, "/v1/chat/completions", key, {"model": "tiny-chat", "messages": HELLO, "temperature": 0, "max_tokens": 16, **extra})


async def _concurrently(url: str, key: str, n: int, body: dict, path: str = "/v1/completions") -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(
            client.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"}) for _ in range(n)
        ))


def _assert_limited(r: httpx.Response, kind: str, words: str) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == kind, error
    assert f"on {words}" in error["message"], error
    assert int(r.headers["retry-after"]) >= 1


def test_requests_per_minute_hold_across_both_gateway_replicas(tenants_app):
    from ray import serve

    gateway = serve.status().applications[APP].deployments["Gateway"]
    assert gateway.replica_states.get("RUNNING") == 2
    body = {"model": "tiny-chat-b", "prompt": "Hello", "max_tokens": 1}  # (tiny-chat's tight queue would refuse some)
    # Eight at once, spread over both gateway replicas by the proxy: exactly three get through, as
    # one shared window admits them (two per-replica windows would let up to six through).
    responses = asyncio.run(_concurrently(tenants_app, KEYS["alpha"], 8, body))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 5, [r.text for r in responses]
    for r in responses:
        if r.status_code == 429:
            _assert_limited(r, "requests", "requests per minute: limit 3")
            assert 50 <= int(r.headers["retry-after"]) <= 60  # the window's oldest request, ~60 s away
    # As the openai client sees it: its own RateLimitError, with OpenAI's error code.
    client = openai.OpenAI(base_url=tenants_app + "/v1", api_key=KEYS["alpha"], max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(**body)
    assert info.value.code == "rate_limit_exceeded" and info.value.response.headers["retry-after"]


def test_tokens_per_minute(tenants_app):
    # 3 prompt tokens + 30 generated: 33 tokens. Under 40 used: the second is admitted (66 used);
    # the third is refused until the first request's tokens leave the window.
    body = {"model": "tiny-chat-b", "prompt": [5, 6, 7], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    for _ in range(2):
        r = _post(tenants_app, "/v1/completions", KEYS["beta"], body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == 33
        time.sleep(0.5)  # the tokens are handed to the limiter after the response
    r = _post(tenants_app, "/v1/completions", KEYS["beta"], body)
    _assert_limited(r, "tokens", "tokens per minute: limit 40")


def test_concurrent_requests(tenants_app):
    body = {"model": "tiny-chat-b", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['gamma']}"}
    with httpx.stream("POST", tenants_app + "/v1/completions", json=body, headers=headers, timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(lines)  # the first chunk: the stream is in flight
        r = _chat(tenants_app, KEYS["gamma"], model="tiny-chat-b")
        _assert_limited(r, "requests", "concurrent requests: limit 1")
        assert r.headers["retry-after"] == "1"
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
    time.sleep(0.5)  # the lease is handed back after the stream's end
    assert _chat(tenants_app, KEYS["gamma"], model="tiny-chat-b").status_code == 200


def test_a_tenant_sees_and_uses_only_its_models_and_agents(tenants_app):
    headers = {"Authorization": f"Bearer {KEYS['delta']}"}
    models = httpx.get(tenants_app + "/v1/models", headers=headers, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny-chat"]
    root = httpx.get(tenants_app + "/v1/models", headers={"Authorization": f"Bearer {KEYS['root']}"}, timeout=30).json()
    assert [m["id"] for m in root["data"]] == ["tiny-chat", "tiny-chat-b", "agent:safe_response"]
    # Not allowed: answered as if it did not exist, listing only what the key may use.
    r = _chat(tenants_app, KEYS["delta"], model="tiny-chat-b")
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "The model 'tiny-chat-b' does not exist. Available models: tiny-chat.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }
    client = openai.OpenAI(base_url=tenants_app + "/v1", api_key=KEYS["delta"], max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="tiny-chat-b", messages=HELLO)
    assert info.value.code == "model_not_found"
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    missing = _chat(tenants_app, KEYS["delta"], model="no-such-model")
    assert missing.status_code == 404 and "Available models: tiny-chat." in missing.json()["error"]["message"]
    for path, body in [("/v1/agents/safe_response", {"question": "hi"}), ("/v1/chat/completions", {"model": "agent:safe_response", "messages": HELLO})]:
        r = _post(tenants_app, path, KEYS["delta"], body)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == "The agent 'safe_response' does not exist. Available agents: none."
    assert httpx.get(tenants_app + "/v1/agents", headers=headers, timeout=30).json()["data"] == []
    pools = httpx.get(tenants_app + "/v1/pools", headers=headers, timeout=30).json()
    assert [p["model"] for p in pools["data"]] == ["tiny-chat"]
    view = httpx.get(tenants_app + "/v1/cluster", headers=headers, timeout=30).json()
    assert [m["model"] for m in view["models"]] == ["tiny-chat"] and view["agents"] == []
    r = _chat(tenants_app, KEYS["delta"])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."


def test_admin_routes_need_an_admin_key(tenants_app):
    r = _post(tenants_app, "/flush_cache", KEYS["delta"], {})
    assert r.status_code == 403 and r.json()["error"] == {
        "message": "This API key may not use the admin route /flush_cache.",
        "type": "invalid_request_error", "param": None, "code": "permission_denied",
    }
    r = _post(tenants_app, "/flush_cache", KEYS["root"], {})
    assert r.status_code == 200 and r.json()["message"] == "Cache flushed."


def test_keys_file_is_reread_without_a_restart(tenants_app, keys_file):
    assert _chat(tenants_app, KEYS["newcomer"]).status_code == 401
    _write(keys_file, _tenants({"name": "newcomer", "key_sha256": hash_key(KEYS["newcomer"])}))
    deadline = time.monotonic() + 15
    # Both gateway replicas re-read it: several requests in a row all pass.
    while [_chat(tenants_app, KEYS["newcomer"]).status_code for _ in range(4)] != [200] * 4:
        assert time.monotonic() < deadline, "the new key was not accepted"
        time.sleep(0.5)
    # A broken edit keeps the tenants loaded before.
    keys_file.write_text("tenants: [ {name: broken")
    time.sleep(1.5)
    assert _chat(tenants_app, KEYS["newcomer"]).status_code == 200
    _write(keys_file, _tenants())
    deadline = time.monotonic() + 15
    while _chat(tenants_app, KEYS["newcomer"]).status_code != 401 or _chat(tenants_app, KEYS["newcomer"]).status_code != 401:
        assert time.monotonic() < deadline, "the removed key was still accepted"
        time.sleep(0.5)
    r = _chat(tenants_app, "sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."


def test_overload_is_refused_at_once_with_retry_after(tenants_app):
    """The model takes 2 requests and queues 1 per gateway replica: of 10 long streams at once, the
    ones beyond that are answered 503 with Retry-After within a second, the others finish."""
    body = {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        start = time.monotonic()
        r = await client.post(tenants_app + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS['root']}"})
        return r.status_code, time.monotonic() - start, r

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(10)))

    results = asyncio.run(burst())
    refused = [(t, r) for status, t, r in results if status == 503]
    served = [r for status, _, r in results if status == 200]
    assert len(served) + len(refused) == 10, [r.text for _, _, r in results]
    assert 2 <= len(served) <= 6 and refused, [s for s, _, _ in results]
    for t, r in refused:
        assert t < 1.5, t
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
    texts = {r.json()["choices"][0]["text"] for r in served}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 120 for r in served)


def test_one_request_with_more_streams_than_the_queue_takes_is_one_clean_503(tenants_app):
    # Four prompts: two run, one queues, the fourth is refused at assignment; the request as a whole
    # is answered 503 in OpenAI's shape (streamed or not: its response has not started), and its
    # other streams are cancelled.
    body = {"model": "tiny-chat", "prompt": ["a", "b", "c", "d"], "max_tokens": 4}
    for stream in (False, True):
        r = _post(tenants_app, "/v1/completions", KEYS["root"], {**body, "stream": stream})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.headers["content-type"] == "application/json"
        assert r.json()["error"] == {"message": "The model is overloaded; retry later.", "type": "server_error", "param": None, "code": "overloaded"}
    # Nothing leaked: a request within the bounds is served.
    assert _post(tenants_app, "/v1/completions", KEYS["root"], {**body, "prompt": "a"}).status_code == 200
