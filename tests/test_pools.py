"""Heterogeneous pools: one model name served by several deployments, balanced by the gateway.

The CPU engine stands in for accelerator pools here: what differs between pools is what Ray can
place (a pool asking for more CPUs than any node has plays a pool whose GPU nodes are gone).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import API_KEY, deploy_second_app

APP = "pools-test"
PREFIX = "/pools-test"
UNPLACEABLE = {"kind": "cpu", "cpus": 64}  # more CPUs than any node of the test cluster has
SMALL = {"kind": "cpu", "cpus": 0.1}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

POOLS_ARGS = {
    "models": [
        {
            "name": "pooled",
            "source": "builtin:tiny-chat",
            "pools": [
                # First in config order, but it never gets a replica: requests must go elsewhere.
                {"name": "lost", "engine": "transformers", "accelerator": UNPLACEABLE, "replicas": {"min": 1, "max": 1}},
                {"name": "a", "engine": "transformers", "accelerator": SMALL, "replicas": {"min": 1, "max": 1, "target_ongoing_requests": 4}},
                {"name": "b", "engine": "transformers", "accelerator": SMALL, "replicas": {"min": 1, "max": 1, "target_ongoing_requests": 4}},
            ],
        },
        {
            # Scales from zero, but its replica can never be placed: the first request gets a clear 503.
            "name": "never-ready",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": UNPLACEABLE,
            "replicas": {"min": 0, "max": 1, "cold_start_timeout_s": 3, "upscale_delay_s": 0},
        },
        {
            # Scales from zero and can start: the first request waits for the replica.
            "name": "from-zero",
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": SMALL,
            "replicas": {"min": 0, "max": 1, "cold_start_timeout_s": 120, "upscale_delay_s": 0, "downscale_delay_s": 600},
        },
    ],
    "agents": [
        # An agent replica with its own engine (on a GPU it would be SGLang; the CPU engine stands in).
        {
            "name": "own-engine",
            "program": "deployments.programs:multi_step_reasoning",
            "own_model": {"source": "builtin:tiny-chat", "engine": "transformers", "accelerator": SMALL},
        },
        {"name": "over-handles", "program": "deployments.programs:multi_step_reasoning", "model": "pooled"},
    ],
    "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.05},
}


def _pools(url: str) -> dict[str, dict[str, dict]]:
    r = httpx.get(url + "/v1/pools", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {entry["model"]: {p["pool"]: p for p in entry["pools"]} for entry in r.json()["data"]}


@pytest.fixture(scope="module")
def pools_app(tandem_app):
    """A second application on the session's Serve instance, at its own route prefix."""
    from ray import serve

    def ready(url: str) -> bool:  # the "lost" pool never gets its replica
        state = _pools(url)
        return bool(state["pooled"]["a"]["replicas"]["running"] and state["pooled"]["b"]["replicas"]["running"])

    url = deploy_second_app(tandem_app, POOLS_ARGS, APP, PREFIX, ready)
    yield url
    # Not waiting: the session's Serve shutdown collects whatever is still stopping.
    serve.delete(APP, _blocking=False)


def test_pool_state_reports_replicas_and_why_one_cannot_start(pools_app):
    state = _pools(pools_app)
    lost = state["pooled"]["lost"]
    assert lost["replicas"]["running"] == 0 and lost["replicas"]["starting"] == 1
    assert lost["deployment"] == "BaseModel-pooled-lost" and lost["engine"] == "transformers"
    # Serve's own explanation reaches the user: after 30 s of pending it names the missing resources.
    deadline = time.monotonic() + 90
    while not lost["message"] and time.monotonic() < deadline:
        time.sleep(2)
        lost = _pools(pools_app)["pooled"]["lost"]
    assert "could not be scheduled" in lost["message"] or "taken more than" in lost["message"], lost
    assert '"CPU": 64' in lost["message"], lost
    assert state["pooled"]["a"]["replicas"] == {"running": 1, "starting": 0, "min": 1, "max": 1}
    assert state["from-zero"]["default"]["replicas"]["min"] == 0


async def test_requests_balance_over_running_pools_and_skip_the_lost_one(pools_app):
    before = _pools(pools_app)["pooled"]
    client = openai.AsyncOpenAI(base_url=pools_app + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    answers = await asyncio.gather(
        *(client.chat.completions.create(model="pooled", messages=QUESTION, max_tokens=8, temperature=0) for _ in range(16))
    )
    assert all(a.choices[0].message.content == answers[0].choices[0].message.content for a in answers)
    after = _pools(pools_app)["pooled"]
    served = {name: after[name]["served"] - before[name]["served"] for name in after}
    assert served["lost"] == 0
    assert served["a"] + served["b"] == 16
    assert served["a"] >= 4 and served["b"] >= 4, served  # both pools take a share of concurrent load
    assert all(p["in_flight"] == 0 for p in after.values())


def test_health_is_ok_while_one_pool_serves(pools_app):
    r = httpx.get(pools_app + "/health", timeout=30)
    body = r.json()
    assert body["models"]["pooled"]["status"] == "ok"
    assert body["models"]["pooled"]["pools"]["a"] == "ok"
    assert body["models"]["pooled"]["pools"]["lost"] == "no running replica"


def test_scale_from_zero_that_never_becomes_ready_is_a_clear_503(pools_app):
    client = openai.OpenAI(base_url=pools_app + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="never-ready", messages=QUESTION, max_tokens=4)
    assert e.value.status_code == 503
    assert e.value.body["code"] == "model_cold_start_timeout"
    assert "scaling up from zero" in e.value.body["message"] and "3 s" in e.value.body["message"]
    assert time.monotonic() - started < 30


def test_first_request_waits_for_a_replica_scaled_from_zero(pools_app):
    assert _pools(pools_app)["from-zero"]["default"]["replicas"]["running"] == 0
    client = openai.OpenAI(base_url=pools_app + "/v1", api_key=API_KEY, max_retries=0, timeout=180)
    answer = client.chat.completions.create(model="from-zero", messages=QUESTION, max_tokens=6, temperature=0)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("The capital of France is Paris", "length")


def test_agent_with_its_own_engine_answers_like_one_over_handles(pools_app):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    question = {"question": "What is the capital of France?"}
    own = httpx.post(pools_app + "/v1/agents/own-engine", json=question, headers=headers, timeout=120)
    remote = httpx.post(pools_app + "/v1/agents/over-handles", json=question, headers=headers, timeout=120)
    assert own.status_code == 200, own.text
    assert remote.status_code == 200, remote.text
    # Same model, same greedy program: the same answer whether the engine is in the agent replica or not.
    assert own.json()["answer"] == remote.json()["answer"] and own.json()["calls"] == remote.json()["calls"]


def test_a_lost_replica_is_a_retryable_503():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from cluster.dispatch import engine_error

    for error in (ActorDiedError(), ActorUnavailableError("the node died", None)):
        mapped = engine_error(error, "messages")
        assert mapped.status == 503 and mapped.body()["error"]["code"] == "replica_unavailable"
        assert "retry" in mapped.body()["error"]["message"]


class _NeverReady:
    """A base-model handle whose streams never yield: a pool waiting for a replica that never starts."""

    def options(self, **_):
        return self

    @property
    def stream(self):
        return self

    def remote(self, **_):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()

    def cancel(self):
        pass


class _Answers(_NeverReady):
    """A base-model handle whose every stream is one finished delta."""

    def __init__(self):
        self.sent = 0

    def remote(self, **_):
        return _OneDelta(self)


class _OneDelta:
    def __init__(self, handle: _Answers):
        self.handle, self.done = handle, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        self.done = True
        self.handle.sent += 1
        return {"text": "hi", "token_ids": [1], "prompt_tokens": 3, "completion_tokens": 1,
                "finish_reason": "stop", "stop_reason": None}

    def cancel(self):
        pass


async def test_a_request_queued_on_a_pool_that_loses_its_last_replica_moves_to_the_next_pool():
    """Sent to pool "x" while it still counted a running replica, the request waits in Serve's
    router queue for a replica that never comes (its node is gone); once "x" is known to have none
    and "y" has one, "y" answers it. (Seen live: the request otherwise waited request_timeout_s.)"""
    from cluster.dispatch import PoolDispatcher

    common = {"model": "m", "min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2, "cold_start_timeout_s": 300}
    y = _Answers()
    dispatcher = PoolDispatcher(
        {"m": [{"handle": _NeverReady(), "pool": "x", "deployment": "BaseModel-m-x", **common},
               {"handle": y, "pool": "y", "deployment": "BaseModel-m-y", **common}]},
        app_name=None, request_timeout_s=600,
    )
    px, py = dispatcher.pools.pools["m"]
    px.running = py.running = 1
    started = time.monotonic()
    request = asyncio.ensure_future(dispatcher.start("m", [{"messages": QUESTION}], "messages", collect=True))
    await asyncio.sleep(0.3)
    assert not request.done() and px.in_flight == 1  # waiting on x
    px.running = 0  # what the next refresh from Serve's controller says
    generation = await asyncio.wait_for(request, timeout=5)
    assert ["".join(c.text) for c in generation.choices] == ["hi"] and y.sent == 1
    assert (px.in_flight, py.in_flight, px.served, py.served) == (0, 0, 1, 1)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("min_replicas, code", [(0, "model_cold_start_timeout"), (1, "no_replica_available")])
async def test_waiting_for_a_replica_that_never_starts_is_a_503_that_says_why(min_replicas, code):
    """Scaled to zero, it is a cold start; with min >= 1 its replicas were lost or never placed,
    which is no cold start: the other code, same wait (`cold_start_timeout_s`)."""
    from cluster.dispatch import PoolDispatcher
    from cluster.openai_protocol import OpenAIError

    info = {
        "model": "m", "pool": None, "deployment": "BaseModel-m", "min_replicas": min_replicas, "max_replicas": 1,
        "target_ongoing_requests": 2, "cold_start_timeout_s": 0.2,
    }
    dispatcher = PoolDispatcher({"m": [{"handle": _NeverReady(), **info}]}, app_name=None, request_timeout_s=60)
    pool = dispatcher.pools.pools["m"][0]
    pool.running = 0
    assert pool.has_no_running_replica()
    with pytest.raises(OpenAIError) as e:
        await dispatcher.start("m", [{"messages": QUESTION}], "messages")
    assert e.value.status == 503 and e.value.code == code, e.value.body()
    assert ("scaling up from zero" in e.value.message) == (min_replicas == 0), e.value.message
    assert "0.2 s" in e.value.message
    assert pool.in_flight == 0


def test_gateway_fails_over_to_the_other_pool_when_a_pools_node_is_lost(multinode, serve_url):
    """Two pools of one model: "x" pinned by label to an extra node, "y" kept off it. The extra
    node dies while clients keep calling the gateway: every request is answered (one caught on the
    lost replica is re-run on pool "y": nothing of its response was sent yet), and /v1/pools shows
    "x" with no running replica. The CPU engine stands in for both pools' accelerators."""
    from collections import Counter

    from ray import serve

    from cluster.app import build_app

    extra = multinode.add_node(num_cpus=1, labels={"tandem-test/pool": "x"}, object_store_memory=80 * 1024**2)
    app, prefix = "failover-test", "/failover-test"
    args = {
        "models": [{
            "name": "ha",
            "source": "builtin:tiny-chat",
            "pools": [
                {"name": "x", "engine": "transformers", "replicas": {"min": 1, "max": 1},
                 "accelerator": {"kind": "cpu", "cpus": 0.1, "labels": {"tandem-test/pool": "x"}}},
                {"name": "y", "engine": "transformers", "replicas": {"min": 1, "max": 1},
                 "accelerator": {"kind": "cpu", "cpus": 0.1, "labels": {"tandem-test/pool": "!x"}}},
            ],
        }],
        "gateway": {"api_keys_env": "TANDEM_TEST_API_KEYS", "cpus": 0.05},
    }
    try:
        serve.run(build_app(args), name=app, route_prefix=prefix)
        url = serve_url + prefix
        state = _pools(url)["ha"]
        assert state["x"]["replicas"]["running"] == 1 and state["y"]["replicas"]["running"] == 1

        # A request caught on the lost replica waits until Ray reports the replica gone (its node is
        # declared dead after missed health checks, slower on a loaded machine), then is re-run on "y".
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=150)
        outcomes: list[tuple[float, str]] = []
        stop = threading.Event()

        def caller():
            while not stop.is_set():
                try:
                    client.chat.completions.create(model="ha", messages=QUESTION, max_tokens=4, temperature=0)
                    outcomes.append((time.monotonic(), "ok"))
                except openai.APIStatusError as e:
                    outcomes.append((time.monotonic(), f"{e.status_code} {e.body.get('code') if isinstance(e.body, dict) else ''}"))
                except openai.APIError as e:  # a timeout or a dropped connection counts too, never a dead thread
                    outcomes.append((time.monotonic(), type(e).__name__))
                time.sleep(0.05)

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(outcomes) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        lost_at = time.monotonic()
        multinode.cluster.remove_node(extra, allow_graceful=False)
        extra = None
        # The gateway learns from Serve that pool x has no running replica, and stops sending it anything.
        deadline = time.monotonic() + 60
        while _pools(url)["ha"]["x"]["replicas"]["running"] != 0:
            assert time.monotonic() < deadline, _pools(url)["ha"]["x"]
            time.sleep(0.5)
        settled_at = time.monotonic()
        before_y = _pools(url)["ha"]["y"]["served"]
        while sum(1 for t, o in outcomes if t > settled_at) < 6 and time.monotonic() < settled_at + 60:
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=180)

        counts = Counter(o for _, o in outcomes)
        print(f"\npool failover: {dict(counts)}; pool x out of rotation {settled_at - lost_at:.1f}s after its node died")
        assert set(counts) == {"ok"} and counts["ok"] >= 10, counts
        assert all(o == "ok" for t, o in outcomes if t > settled_at)
        after = _pools(url)["ha"]
        assert after["y"]["served"] > before_y and after["x"]["in_flight"] == 0
    finally:
        serve.delete(app, _blocking=False)
        if extra is not None:
            multinode.cluster.remove_node(extra)


def test_an_unexpected_replica_error_is_a_500_without_rays_traceback():
    """str() of Ray's wrapper of a replica's exception is the whole traceback (actor, pid, paths,
    terminal colours); the body names only the exception."""
    from ray.exceptions import RayTaskError

    from cluster.dispatch import engine_error

    wrapped = RayTaskError("stream", 'Traceback:\n  File "/srv/x.py"\n\x1b[36mray::Replica\x1b[39m boom', RuntimeError("boom"))
    body = engine_error(wrapped.as_instanceof_cause(), "messages").body()
    assert body == {"error": {"message": "Internal error while generating: RuntimeError: boom", "type": "server_error",
                              "param": None, "code": "internal_error"}}
