"""A live update, as `serve deploy` applies one (a config handed to Serve's controller, which builds
the application itself): scale a model and add another while streams and an agent run are in
flight. Every replica is rolled over (Tandem's args are Serve's code version); none of the requests
in flight fails, and the new model answers afterwards."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import httpx
import pytest

from tests.conftest import API_KEY

APP = "live-update"
PREFIX = "/live-update"
SMALL = {"kind": "cpu", "cpus": 0.1}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}

ARGS = {
    "models": [{"name": "tiny-chat", "source": "builtin:tiny-chat", "engine": "transformers", "accelerator": SMALL,
                "replicas": {"min": 1, "max": 1, "drain_timeout_s": 60}}],
    "agents": [{"name": "safe_response", "program": "deployments.programs:safe_response", "model": "tiny-chat", "cpus": 0.05}],
    "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.05, "drain_timeout_s": 60},
}


def _deploy(args: dict) -> None:
    """What `serve deploy` does with a config file: hand it to the controller (declaratively)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = {"applications": [{"name": APP, "route_prefix": PREFIX, "import_path": "cluster.app:build_app", "args": args}]}
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def _wait_running(timeout: float, check=lambda: True) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get(APP)
        if app is not None and str(app.status.value if hasattr(app.status, "value") else app.status) == "RUNNING" and check():
            return
        assert time.monotonic() < deadline, f"{APP} not running: {app}"
        time.sleep(1)


@pytest.fixture(scope="module")
def live_app(tandem_app):
    from ray import serve

    _deploy(ARGS)
    _wait_running(240)
    yield tandem_app + PREFIX
    serve.delete(APP, _blocking=False)


def test_scaling_a_model_and_adding_one_loses_no_request_in_flight(live_app):
    from ray import serve

    body = {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(live_app + "/v1/completions", json=body, headers=HEADERS, timeout=120).json()["choices"][0]["text"]
    agent_expected = httpx.post(live_app + "/v1/agents/safe_response", json={"question": "What is the capital of France?"},
                                headers=HEADERS, timeout=120).json()["answer"]
    started = asyncio.Event()

    async def stream(client: httpx.AsyncClient) -> str:
        text = ""
        async with client.stream("POST", live_app + "/v1/completions", json={**body, "stream": True}, headers=HEADERS) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    started.set()
        return text

    async def agent_run(client: httpx.AsyncClient) -> str:
        done = None
        async with client.stream("POST", live_app + "/v1/agents/safe_response", headers=HEADERS,
                                 json={"question": "What is the capital of France?", "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("done"):
                    done = json.loads(line[6:])
        assert done is not None, "the agent run's stream ended without its final event"
        return done["answer"]

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            streams = [asyncio.create_task(stream(client)) for _ in range(3)]
            agent = asyncio.create_task(agent_run(client))
            await started.wait()
            new = copy.deepcopy(ARGS)
            new["models"][0]["replicas"] = {"min": 2, "max": 2, "drain_timeout_s": 60}
            new["models"].append({"name": "tiny-chat-b", "source": "builtin:tiny-chat", "engine": "transformers", "accelerator": SMALL})
            await asyncio.to_thread(_deploy, new)
            return await asyncio.gather(*streams), await agent

    texts, answer = asyncio.run(scenario())
    assert texts == [expected] * 3
    assert answer == agent_expected

    def updated() -> bool:
        deployments = serve.status().applications[APP].deployments
        return "BaseModel-tiny-chat-b" in deployments and deployments["BaseModel-tiny-chat"].replica_states.get("RUNNING") == 2

    _wait_running(300, updated)
    r = httpx.post(live_app + "/v1/chat/completions", headers=HEADERS, timeout=120, json={
        "model": "tiny-chat-b", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
    })
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
