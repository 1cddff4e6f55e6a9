"""Prometheus metrics: recorded by replicas, agents and the gateway through Ray's metrics system,
scraped from the node's real metrics export endpoint."""

from __future__ import annotations

import asyncio
import collections
import inspect
import time

import httpx
import openai
import pytest

from deployments import metrics
from tests.conftest import API_KEY

MODEL = "tiny-chat"
AGENT = "safe_response"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TINY = {"model": MODEL, "pool": "default"}


# -- without Ray -------------------------------------------------------------------------------------


def test_every_metric_is_tandem_prefixed_with_known_tags():
    for name, (kind, description, tag_keys, boundaries) in metrics.METRICS.items():
        assert name.startswith(metrics.PREFIX) and description
        assert kind in ("counter", "gauge", "histogram") and (boundaries is not None) == (kind == "histogram")
        assert set(tag_keys) <= {"model", "pool", "replica", "status", "error", "agent", "route", "method", "tenant", "kind"}
        if kind == "counter":
            assert name.endswith("_total")


async def test_agent_runs_feed_the_replicas_own_counts_with_the_metrics_status():
    """The console's per-replica agent counts (`RunStats`) come from the same decorators as the
    Prometheus metrics: ok runs add their time, invalid / limit / error runs count as errors,
    cancelled ones as neither."""
    from deployments.agent import RunStats
    from deployments.agents.errors import AgentLimitError

    class Server:
        name = "a"

        def __init__(self):
            self.run_stats = RunStats()

        @metrics.record_agent_run
        async def run(self, outcome):
            if outcome is not None:
                raise outcome
            return {}

    server = Server()
    for outcome in (None, ValueError("bad argument"), AgentLimitError("max_calls", 3), RuntimeError("boom"), asyncio.CancelledError()):
        try:
            await server.run(outcome)
        except BaseException:  # noqa: BLE001 - each outcome is counted, not what it raises
            pass
    st = server.run_stats
    assert (st.runs, st.errors, len(st.run_seconds)) == (5, 3, 1)


class Recorded(list):
    """Stand-in metric objects for every metric (`metrics._objects`): each call appends
    (name, op, value, tags)."""

    def metric(self, name: str):
        recorded = self

        class Metric:
            def inc(self, value, tags):
                recorded.append((name, "inc", value, tags))

            def set(self, value, tags):
                recorded.append((name, "set", value, tags))

            def observe(self, value, tags):
                recorded.append((name, "observe", value, tags))

        return Metric()


@pytest.fixture
def recorded(monkeypatch) -> Recorded:
    calls = Recorded()
    monkeypatch.setattr(metrics, "_objects", {name: calls.metric(name) for name in metrics.METRICS})
    monkeypatch.setattr(metrics, "recording_errors", collections.Counter())
    return calls


def test_recording_outside_ray_is_a_no_op(monkeypatch):
    import ray

    # This process may have joined the session's cluster already (other test modules): not here.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(metrics, "_objects", {})
    monkeypatch.setattr(metrics, "recording_errors", collections.Counter())
    metrics.record_http("/x", "GET", 500)
    metrics.update_engine_gauges("m", None, "r", {"running": 1, "waiting": 2, "kv_cache_usage": 0.5})
    # No metric object was made (Ray's would take the values silently outside a worker), nothing failed.
    assert metrics._objects == {}
    assert metrics.recording_errors == {}


def test_recording_reaches_the_metric_objects(recorded):
    metrics.record_http("/v1/models", "GET", 200)
    metrics.record_http("/v1/chat/completions", "POST", 404)
    metrics.update_engine_gauges("m", None, "r0", {"running": 1, "waiting": 2, "kv_cache_usage": 0.5, "tokens_per_s": 7})
    assert recorded == [
        ("tandem_http_requests_total", "inc", 1, {"route": "/v1/models", "method": "GET", "status": "200"}),
        ("tandem_http_requests_total", "inc", 1, {"route": "/v1/chat/completions", "method": "POST", "status": "404"}),
        ("tandem_http_errors_total", "inc", 1, {"route": "/v1/chat/completions", "status": "404"}),
        ("tandem_engine_requests_running", "set", 1.0, {"model": "m", "pool": "default", "replica": "r0"}),
        ("tandem_engine_requests_waiting", "set", 2.0, {"model": "m", "pool": "default", "replica": "r0"}),
        ("tandem_engine_kv_cache_usage", "set", 0.5, {"model": "m", "pool": "default", "replica": "r0"}),
        ("tandem_engine_tokens_per_second", "set", 7.0, {"model": "m", "pool": "default", "replica": "r0"}),
    ]
    assert metrics.recording_errors == {}
    # Prefix-cache counts, from an engine that can tell (None: it cannot, and nothing is recorded).
    recorded.clear()
    metrics.update_engine_gauges("m", None, "r0", {"prompt_tokens": 120, "cached_prompt_tokens": 96})
    metrics.update_engine_gauges("m", None, "r1", {"prompt_tokens": None, "cached_prompt_tokens": None})
    prefix = [r for r in recorded if r[0] in ("tandem_engine_prompt_tokens", "tandem_engine_prefix_cache_hit_tokens")]
    assert prefix == [
        ("tandem_engine_prompt_tokens", "set", 120.0, {"model": "m", "pool": "default", "replica": "r0"}),
        ("tandem_engine_prefix_cache_hit_tokens", "set", 96.0, {"model": "m", "pool": "default", "replica": "r0"}),
    ]


def test_a_failing_metric_never_fails_the_caller_and_is_counted(recorded, monkeypatch):
    class Broken:
        def inc(self, value, tags):
            raise RuntimeError("metrics agent down")

    monkeypatch.setitem(metrics._objects, "tandem_http_requests_total", Broken())
    warned = []
    monkeypatch.setattr(metrics.logger, "warning", lambda msg, *args, **kwargs: warned.append(msg % args))
    for _ in range(3):
        metrics.record_http("/v1/models", "GET", 503)  # does not raise
    assert metrics.recording_errors == {"tandem_http_requests_total": 3}
    # The other metric of the same request is still recorded; the failure is logged once.
    assert recorded == [("tandem_http_errors_total", "inc", 1, {"route": "/v1/models", "status": "503"})] * 3
    assert warned == ["recording metric tandem_http_requests_total failed; further failures are not logged"]


def test_stream_decorator_keeps_a_generator_and_closes_the_engine_stream_at_once(recorded):
    from deployments.base_model import BaseModelServer

    assert inspect.isasyncgenfunction(BaseModelServer.stream)  # Serve streams it
    closed = []

    class Server:
        model_name, pool = "m", None

        @metrics.record_model_stream
        async def stream(self, n):
            try:
                for i in range(n):
                    yield {"text": "x", "prompt_tokens": 3, "completion_tokens": i + 1}
            finally:
                closed.append(True)

    async def consume():
        gen = Server().stream(100)
        first = await gen.__anext__()
        await gen.aclose()  # the caller went away
        return first

    assert asyncio.run(consume())["completion_tokens"] == 1
    assert closed == [True]
    # Recorded as a cancelled generation of one token: its TTFT and tokens, no TPOT (needs 2 tokens).
    tags = {"model": "m", "pool": "default"}
    (name, op, ttft, ttft_tags), *rest = recorded
    assert (name, op, ttft_tags) == ("tandem_model_time_to_first_token_seconds", "observe", tags) and ttft >= 0
    assert rest == [
        ("tandem_model_requests_total", "inc", 1, {**tags, "status": "cancelled"}),
        ("tandem_model_prompt_tokens_total", "inc", 3, tags),
        ("tandem_model_generation_tokens_total", "inc", 1, tags),
    ]


# -- on the session's cluster --------------------------------------------------------------------------


def scrape() -> list:
    """Every sample from every alive node's Prometheus endpoint (Ray's metrics export port)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
                samples += family.samples
    return samples


def total(samples: list, name: str, **tags) -> float:
    """The sum over processes (Ray tags each series with its worker) of one metric's series."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in tags.items()))


def series(samples: list, name: str, **tags) -> list:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in tags.items())]


# (Prometheus sample name, tags, least increase expected from the traffic below)
EXPECTED = [
    ("ray_tandem_model_requests_total", {**TINY, "status": "ok"}, 2),
    ("ray_tandem_model_requests_total", {**TINY, "status": "invalid"}, 1),
    ("ray_tandem_model_errors_total", {**TINY, "error": "PromptTooLongError"}, 1),
    ("ray_tandem_model_time_to_first_token_seconds_count", TINY, 2),
    ("ray_tandem_model_time_per_output_token_seconds_count", TINY, 2),
    ("ray_tandem_model_prompt_tokens_total", TINY, 10),
    ("ray_tandem_model_generation_tokens_total", TINY, 16),
    ("ray_tandem_agent_runs_total", {"agent": AGENT, "status": "ok"}, 1),
    ("ray_tandem_agent_runs_total", {"agent": AGENT, "status": "invalid"}, 1),
    ("ray_tandem_agent_errors_total", {"agent": AGENT, "error": "AgentArgumentError"}, 1),
    ("ray_tandem_agent_run_seconds_count", {"agent": AGENT, "status": "ok"}, 1),
    ("ray_tandem_http_requests_total", {"route": "/v1/chat/completions", "method": "POST", "status": "200"}, 2),
    ("ray_tandem_http_requests_total", {"route": "/v1/agents/{name}", "method": "POST", "status": "200"}, 1),
    ("ray_tandem_http_errors_total", {"route": "/v1/chat/completions", "status": "404"}, 1),
    ("ray_tandem_http_errors_total", {"route": "/v1/completions", "status": "400"}, 1),
    ("ray_tandem_http_errors_total", {"route": "/v1/agents/{name}", "status": "400"}, 1),
]


def test_metrics_reach_the_prometheus_endpoint(tandem_app, client, model_handle):
    before = scrape()
    max_len = model_handle.model_info.remote().result()["max_model_len"]

    # Traffic: a chat completion and a stream (8 tokens each), a 404 model, a prompt too long,
    # one agent run and one with bad arguments.
    for stream in (False, True):
        r = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stream=stream, extra_body={"ignore_eos": True}
        )
        if stream:
            list(r)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[5] * (max_len + 10), max_tokens=1)
    r = httpx.post(f"{tandem_app}/v1/agents/{AGENT}", json={"question": "What is 2 + 2?"}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{tandem_app}/v1/agents/{AGENT}", json={}, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text

    # Ray exports what processes record every few seconds: poll.
    deadline = time.monotonic() + 90
    while True:
        after = scrape()
        missing = [
            f"{name}{tags}: +{total(after, name, **tags) - total(before, name, **tags):g}, expected +{least}"
            for name, tags, least in EXPECTED
            if total(after, name, **tags) - total(before, name, **tags) < least
        ]
        gauges = series(after, "ray_tandem_engine_requests_waiting", **TINY)
        if not missing and gauges:
            break
        assert time.monotonic() < deadline, "not exported in time:\n" + "\n".join(missing or ["engine gauges"])
        time.sleep(2)

    # Queue depth per replica of the engine: one series per replica. (Other applications of the
    # session serve a model named tiny-chat too, and a gone replica's series stays a while: not
    # only this application's 3.)
    replicas = {s.labels["replica"] for s in gauges}
    assert len(replicas) >= 1 and all(s.value >= 0 for s in gauges)
    kv = series(after, "ray_tandem_engine_kv_cache_usage", **TINY)
    assert kv and all(0 <= s.value <= 1 for s in kv)
    # TTFT lands in the histogram's buckets, with its sum.
    assert total(after, "ray_tandem_model_time_to_first_token_seconds_sum", **TINY) > 0
    # Replica counts are Serve's own gauge, per deployment.
    healthy = series(after, "ray_serve_deployment_replica_healthy", deployment="BaseModel-tiny-chat", application="tandem")
    assert healthy and sum(s.value for s in healthy) >= 1
