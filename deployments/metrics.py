"""Tandem's Prometheus metrics, recorded through Ray's metrics system (`ray.util.metrics`).

Every process records into its own metric objects (created on first use); Ray collects them and
serves them, in Prometheus text format, on each node's metrics export port
(`ray.nodes()[i]["MetricsExportPort"]`, `http://<node>:<port>/metrics`), about 10 s after they
are recorded. Ray prefixes every name with `ray_`: `tandem_model_requests_total` is scraped as
`ray_tandem_model_requests_total`. Base models are tagged `model` and `pool` (`default` for a
model without pools), agents `agent`, the gateway's HTTP metrics `route` (the route's path
template, `unmatched` for a 404), `method` and `status`.

Base-model replicas (`deployments/base_model.py`, every `stream` call, so `complete` / `chat` too):

| name | kind | tags | what |
|---|---|---|---|
| tandem_model_requests_total | counter | model, pool, status | finished generations; status ok, invalid (a bad request: 400), error, cancelled |
| tandem_model_errors_total | counter | model, pool, error | generations that raised, by exception class |
| tandem_model_time_to_first_token_seconds | histogram | model, pool | call to first delta |
| tandem_model_time_per_output_token_seconds | histogram | model, pool | (last - first delta) / (output tokens - 1), once per generation |
| tandem_model_prompt_tokens_total | counter | model, pool | tokens in |
| tandem_model_generation_tokens_total | counter | model, pool | tokens out |
| tandem_engine_requests_running | gauge | model, pool, replica | requests in the engine's running batch |
| tandem_engine_requests_waiting | gauge | model, pool, replica | requests queued in the engine |
| tandem_engine_kv_cache_usage | gauge | model, pool, replica | KV-cache fraction in use, 0..1 |
| tandem_engine_tokens_per_second | gauge | model, pool, replica | recent generation rate |
| tandem_engine_prompt_tokens | gauge | model, pool, replica | prompt tokens the engine prefilled since it started (engines with a prefix cache) |
| tandem_engine_prefix_cache_hit_tokens | gauge | model, pool, replica | of those, tokens served from the prefix cache; hit rate = this / prompt tokens |

The engine gauges are refreshed every `ENGINE_GAUGE_INTERVAL_S` by a task in each replica (Serve
only calls `record_autoscaling_stats` on autoscaled deployments, and fixed-size ones need the
gauges too).

Agent replicas (`deployments/agent.py`, `run` and `run_stream`):

| name | kind | tags | what |
|---|---|---|---|
| tandem_agent_runs_total | counter | agent, status | finished runs; status ok, invalid, limit, error, cancelled |
| tandem_agent_errors_total | counter | agent, error | runs that raised, by exception class |
| tandem_agent_run_seconds | histogram | agent, status | wall-clock time per run |

Gateway (`cluster/http_metrics.py`, an ASGI middleware; one count per HTTP request, when its response
starts, or fails before that):

| name | kind | tags | what |
|---|---|---|---|
| tandem_http_requests_total | counter | route, method, status | every request |
| tandem_http_errors_total | counter | route, status | requests answered with status >= 400 (499: the client went away first) |

Gateway, per tenant (`cluster/tenants.py`: the tenant a request's API key belongs to, by name, never
the key; keys from `api_keys_env` are the tenant `default`):

| name | kind | tags | what |
|---|---|---|---|
| tandem_tenant_requests_total | counter | tenant, status | requests with a valid key; status ok, forbidden (a model or agent it may not use: 404; an admin route: 403), limited (a rate limit: 429), error |
| tandem_tenant_tokens_total | counter | tenant, kind | tokens of the tenant's requests; kind prompt or completion |

Replica counts are Serve's own, tagged with the deployment name (`BaseModel-<model>` or
`BaseModel-<model>-<pool>`, `Agent-<agent>`, see `cluster.resolve.PoolPlan.deployment_name`) and
`application`: `ray_serve_deployment_replica_healthy` (healthy replicas),
`ray_serve_autoscaling_target_replicas` and `ray_serve_autoscaling_desired_replicas` (autoscaled
deployments), `ray_serve_deployment_replica_starts_total`; Tandem does not duplicate them.

Recording never fails a request: outside a Ray worker it does nothing, and an error inside Ray's
metrics code is counted in `recording_errors` (by metric name), logged the first time, and ignored.
What a process records goes to its metric objects in `_objects` (by name, created on first use);
tests put stand-ins there (anything with Ray's `inc` / `set` / `observe`) to see what is recorded.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

logger = logging.getLogger("ray.serve")

PREFIX = "tandem_"
DEFAULT_POOL = "default"
MODEL_TAGS = ("model", "pool")
ENGINE_GAUGE_INTERVAL_S = 5.0

_LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_PER_TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
_RUN_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]

# name -> (kind, description, tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "tandem_model_requests_total": ("counter", "Finished generations by status (ok, invalid, error, cancelled).", MODEL_TAGS + ("status",), None),
    "tandem_model_errors_total": ("counter", "Generations that raised, by exception class.", MODEL_TAGS + ("error",), None),
    "tandem_model_time_to_first_token_seconds": ("histogram", "Seconds from the call to the first delta.", MODEL_TAGS, _LATENCY_S),
    "tandem_model_time_per_output_token_seconds": ("histogram", "Mean seconds per output token after the first, per generation.", MODEL_TAGS, _PER_TOKEN_S),
    "tandem_model_prompt_tokens_total": ("counter", "Prompt tokens of finished generations.", MODEL_TAGS, None),
    "tandem_model_generation_tokens_total": ("counter", "Generated tokens.", MODEL_TAGS, None),
    "tandem_engine_requests_running": ("gauge", "Requests in the engine's running batch.", MODEL_TAGS + ("replica",), None),
    "tandem_engine_requests_waiting": ("gauge", "Requests queued in the engine.", MODEL_TAGS + ("replica",), None),
    "tandem_engine_kv_cache_usage": ("gauge", "Fraction of the KV cache in use (0..1).", MODEL_TAGS + ("replica",), None),
    "tandem_engine_tokens_per_second": ("gauge", "Recent generation rate of the engine.", MODEL_TAGS + ("replica",), None),
    "tandem_engine_prompt_tokens": ("gauge", "Prompt tokens the engine has prefilled since it started.", MODEL_TAGS + ("replica",), None),
    "tandem_engine_prefix_cache_hit_tokens": ("gauge", "Prompt tokens served from the prefix cache since the engine started.", MODEL_TAGS + ("replica",), None),
    "tandem_agent_runs_total": ("counter", "Finished agent runs by status (ok, invalid, limit, error, cancelled).", ("agent", "status"), None),
    "tandem_agent_errors_total": ("counter", "Agent runs that raised, by exception class.", ("agent", "error"), None),
    "tandem_agent_run_seconds": ("histogram", "Wall-clock seconds per agent run.", ("agent", "status"), _RUN_S),
    "tandem_http_requests_total": ("counter", "HTTP requests by route, method and status.", ("route", "method", "status"), None),
    "tandem_http_errors_total": ("counter", "HTTP requests answered with status >= 400.", ("route", "status"), None),
    "tandem_tenant_requests_total": ("counter", "Requests with a valid API key, by tenant and status (ok, forbidden, limited, error).", ("tenant", "status"), None),
    "tandem_tenant_tokens_total": ("counter", "Prompt and completion tokens by tenant.", ("tenant", "kind"), None),
}

# This process's metric objects by name, created on first use (tests swap in stand-ins).
_objects: dict[str, Any] = {}
_lock = threading.Lock()
# Errors raised while recording in this process, by metric name: counted, never raised.
recording_errors: collections.Counter[str] = collections.Counter()


def _metric(name: str):
    """This process's metric object for `name`, created on first use; None outside Ray."""
    found = _objects.get(name)
    if found is not None:
        return found
    import ray

    if not ray.is_initialized():
        return None
    from ray.util.metrics import Counter, Gauge, Histogram

    kind, description, tag_keys, boundaries = METRICS[name]
    with _lock:
        if name not in _objects:
            if kind == "counter":
                _objects[name] = Counter(name, description, tag_keys=tag_keys)
            elif kind == "gauge":
                _objects[name] = Gauge(name, description, tag_keys=tag_keys)
            else:
                _objects[name] = Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys)
    return _objects[name]


def _record(name: str, op: str, value: float, tags: dict[str, str]) -> None:
    try:
        metric = _metric(name)
        if metric is None:
            return
        if op == "inc":
            if value > 0:
                metric.inc(value, tags=tags)
        elif op == "set":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception:  # noqa: BLE001 - metrics must never fail a request
        first = not recording_errors
        recording_errors[name] += 1
        if first:
            logger.warning("recording metric %s failed; further failures are not logged", name, exc_info=True)


def model_tags(model: str, pool: str | None) -> dict[str, str]:
    return {"model": str(model), "pool": pool or DEFAULT_POOL}


# -- base models -----------------------------------------------------------------------------------


def _status_of(e: BaseException) -> str:
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    if isinstance(e, (ValueError, TypeError)):
        return "invalid"
    return "error"


class _Generation:
    """The timings and token counts of one `stream` call."""

    def __init__(self, tags: dict[str, str]):
        self.tags = tags
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def delta(self, delta: dict) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            _record("tandem_model_time_to_first_token_seconds", "observe", now - self.start, self.tags)
        self.last = now
        self.prompt_tokens = delta.get("prompt_tokens") or self.prompt_tokens
        self.completion_tokens = delta.get("completion_tokens") or self.completion_tokens

    def finish(self, status: str, error: BaseException | None = None) -> None:
        tags = self.tags
        _record("tandem_model_requests_total", "inc", 1, {**tags, "status": status})
        if error is not None and status != "cancelled":
            _record("tandem_model_errors_total", "inc", 1, {**tags, "error": type(error).__name__})
        _record("tandem_model_prompt_tokens_total", "inc", self.prompt_tokens, tags)
        _record("tandem_model_generation_tokens_total", "inc", self.completion_tokens, tags)
        if status == "ok" and self.completion_tokens > 1 and self.first is not None:
            tpot = (self.last - self.first) / (self.completion_tokens - 1)
            _record("tandem_model_time_per_output_token_seconds", "observe", tpot, tags)


def record_model_stream(method: Callable[..., AsyncIterator[dict]]):
    """Decorates `BaseModelServer.stream` (an async generator of delta dicts with running
    `prompt_tokens` / `completion_tokens`): requests, errors, TTFT, TPOT and tokens, tagged with
    the replica's `model_name` and `pool`."""

    @functools.wraps(method)
    async def stream(self, *args, **kwargs):
        gen = _Generation(model_tags(self.model_name, getattr(self, "pool", None)))
        deltas = method(self, *args, **kwargs)
        status, error = "cancelled", None
        try:
            async for delta in deltas:
                gen.delta(delta)
                yield delta
            status = "ok"
        except BaseException as e:
            status, error = _status_of(e), e
            raise
        finally:
            await deltas.aclose()  # at once, not at garbage collection: that frees the engine's slot
            gen.finish(status, error)

    return stream


def update_engine_gauges(model: str, pool: str | None, replica: str, stats: dict[str, Any]) -> None:
    """Queue depth and KV cache of one replica's engine, from `EngineStats.to_dict()`."""
    tags = {**model_tags(model, pool), "replica": str(replica)}
    _record("tandem_engine_requests_running", "set", float(stats.get("running", 0)), tags)
    _record("tandem_engine_requests_waiting", "set", float(stats.get("waiting", 0)), tags)
    _record("tandem_engine_kv_cache_usage", "set", float(stats.get("kv_cache_usage", 0.0)), tags)
    _record("tandem_engine_tokens_per_second", "set", float(stats.get("tokens_per_s", 0.0)), tags)
    # Prefix cache (engines that can tell): running totals since the engine started, as gauges of the
    # engine's own counters (a restarted replica starts again from 0, under its new replica tag).
    if stats.get("cached_prompt_tokens") is not None:
        _record("tandem_engine_prompt_tokens", "set", float(stats["prompt_tokens"] or 0), tags)
        _record("tandem_engine_prefix_cache_hit_tokens", "set", float(stats["cached_prompt_tokens"]), tags)


def start_engine_gauges(server, interval_s: float = ENGINE_GAUGE_INTERVAL_S) -> asyncio.Task:
    """A task on the running loop that refreshes `server`'s engine gauges (a BaseModelServer:
    `model_name`, `pool`, `replica_id`, `engine.stats()`) until the replica stops."""

    async def refresh():
        while True:
            try:
                update_engine_gauges(server.model_name, server.pool, server.replica_id, server.engine.stats().to_dict())
            except Exception:  # noqa: BLE001 - an engine that cannot report is the health check's business
                logger.debug("engine stats for metrics failed", exc_info=True)
            await asyncio.sleep(interval_s)

    return asyncio.get_running_loop().create_task(refresh(), name="tandem-engine-gauges")


# -- agents ----------------------------------------------------------------------------------------


def _agent_status(e: BaseException) -> str:
    name = type(e).__name__
    if name == "AgentLimitError":
        return "limit"
    if name == "RunCancelledError":
        return "cancelled"
    return _status_of(e)


def _agent_done(server, start: float, status: str, error: BaseException | None) -> None:
    agent, seconds = server.name, time.monotonic() - start
    _record("tandem_agent_runs_total", "inc", 1, {"agent": agent, "status": status})
    _record("tandem_agent_run_seconds", "observe", seconds, {"agent": agent, "status": status})
    if error is not None and status != "cancelled":
        _record("tandem_agent_errors_total", "inc", 1, {"agent": agent, "error": type(error).__name__})
    # The replica's own counts (what the console shows), from the same status.
    server.run_stats.done(status, seconds)


def record_agent_run(method):
    """Decorates `AgentServer.run` (a coroutine): run counts by status, latency, errors."""

    @functools.wraps(method)
    async def run(self, *args, **kwargs):
        start, status, error = time.monotonic(), "cancelled", None
        try:
            result = await method(self, *args, **kwargs)
            status = "ok"
            return result
        except BaseException as e:
            status, error = _agent_status(e), e
            raise
        finally:
            _agent_done(self, start, status, error)

    return run


def record_agent_stream(method):
    """Decorates `AgentServer.run_stream` (an async generator), as `record_agent_run`."""

    @functools.wraps(method)
    async def run_stream(self, *args, **kwargs):
        start, status, error = time.monotonic(), "cancelled", None
        events = method(self, *args, **kwargs)
        try:
            async for event in events:
                yield event
            status = "ok"
        except BaseException as e:
            status, error = _agent_status(e), e
            raise
        finally:
            await events.aclose()
            _agent_done(self, start, status, error)

    return run_stream


def record_http(route: str, method: str, status: int) -> None:
    """One gateway HTTP request (the gateway's middleware, `cluster/http_metrics.py`, calls it)."""
    _record("tandem_http_requests_total", "inc", 1, {"route": route, "method": method, "status": str(status)})
    if status >= 400:
        _record("tandem_http_errors_total", "inc", 1, {"route": route, "status": str(status)})


def record_tenant_request(tenant: str, status: str) -> None:
    """One request of a tenant (the gateway calls it): status ok, forbidden, limited or error."""
    _record("tandem_tenant_requests_total", "inc", 1, {"tenant": str(tenant), "status": status})


def record_tenant_tokens(tenant: str, prompt: int, completion: int) -> None:
    """The tokens of one finished request of a tenant (zero counts are not recorded)."""
    _record("tandem_tenant_tokens_total", "inc", prompt, {"tenant": str(tenant), "kind": "prompt"})
    _record("tandem_tenant_tokens_total", "inc", completion, {"tenant": str(tenant), "kind": "completion"})
