"""`GET /v1/cluster`: one JSON view of the cluster for the console (`cluster/console/`).

    {"object": "cluster",
     "gateway": {"version", "ray_version", "time", "started", "auth"},
     "models": [{"model", "pools": [{<a /v1/pools entry>, "engine_stats": {...}}]}],
     "agents": [{"name", "program", "doc", "arguments", "required", "replicas", "status", "message",
                 "runs", "errors", "p50_run_s", "replicas_reporting"}]}

A handle call reaches one replica, chosen by Serve's router, and Serve offers no call that reaches
each replica of a deployment. So the view *probes*: a few concurrent `stats()` calls per deployment
with random session ids (base models route by consistent hashing on the session id; agents by
Serve's default router), keeping one answer per replica id, until every running replica has
answered or three rounds have gone by. `replicas_reporting` says how many answered; the numbers
are sums (means for KV-cache use) over those. Pools and agents with no running replica are not
probed: a call would wake a pool that scales from zero. A probe that does not answer within
`PROBE_TIMEOUT_S` (a replica busy at `max_ongoing_requests`) is left out of that refresh.

Views are cached for `CACHE_S`, and concurrent requests share one assembly, so any number of open
consoles cost the replicas a few calls per second.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import statistics
import time
import uuid
from typing import Any

from cluster.dispatch import child_call
from deployments.pools import Pool, PoolBalancer, replica_counts
from deployments.replica import cancel_call

PROBE_TIMEOUT_S = 2.0
PROBE_ROUNDS = 3
CACHE_S = 0.5
# Agent deployments are named as `cluster.app.agent_deployment_name` names them (not imported: the
# app module imports the gateway).
AGENT_DEPLOYMENT_PREFIX = "Agent-"


def _version() -> str:
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _call(handle, method: str) -> Any:
    """One `method()` call under a fresh session id, bounded by PROBE_TIMEOUT_S."""
    response = child_call(getattr(handle.options(session_id=uuid.uuid4().hex), method))
    try:
        return await asyncio.wait_for(response, timeout=PROBE_TIMEOUT_S)
    except BaseException:
        cancel_call(response)
        raise


async def probe_replicas(handle, method: str, running: int | None) -> list[dict]:
    """`method()` answers ({"replica": id, ...}) from as many distinct replicas as are running
    (`None`: not known, one call)."""
    if running == 0:
        return []
    expected = running or 1
    seen: dict[str, dict] = {}
    for _ in range(PROBE_ROUNDS):
        answers = await asyncio.gather(*(_call(handle, method) for _ in range(2 * expected)), return_exceptions=True)
        for a in answers:
            if isinstance(a, dict):
                seen.setdefault(str(a.get("replica")), a)
        if len(seen) >= expected:
            break
    return [seen[k] for k in sorted(seen)]


def engine_totals(replicas: list[dict]) -> dict[str, Any]:
    """A pool's engine numbers from its replicas' `EngineStats.to_dict()` (plus "replica")."""
    n = len(replicas)
    # Prefix cache, from the replicas whose engine can tell (None when none can).
    counting = [r for r in replicas if r.get("cached_prompt_tokens") is not None]
    prompt = sum(int(r.get("prompt_tokens") or 0) for r in counting) if counting else None
    cached = sum(int(r["cached_prompt_tokens"]) for r in counting) if counting else None
    return {
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else None,
        "running": sum(int(r.get("running", 0)) for r in replicas),
        "waiting": sum(int(r.get("waiting", 0)) for r in replicas),
        "kv_cache_usage": round(sum(float(r.get("kv_cache_usage", 0.0)) for r in replicas) / n, 4) if n else 0.0,
        "tokens_per_s": round(sum(float(r.get("tokens_per_s", 0.0)) for r in replicas), 2),
        "replicas_reporting": n,
        "replicas": [
            {
                "replica": r.get("replica"),
                "running": r.get("running", 0),
                "waiting": r.get("waiting", 0),
                "kv_cache_usage": r.get("kv_cache_usage", 0.0),
                "tokens_per_s": r.get("tokens_per_s", 0.0),
                "prompt_tokens": r.get("prompt_tokens"),
                "cached_prompt_tokens": r.get("cached_prompt_tokens"),
                "healthy": r.get("healthy", True),
            }
            for r in replicas
        ],
    }


def agent_totals(replicas: list[dict]) -> dict[str, Any]:
    """An agent's run counts from its replicas' `stats()`; p50 over their recent successful runs."""
    times = [t for r in replicas for t in r.get("run_seconds", [])]
    return {
        "runs": sum(int(r.get("runs", 0)) for r in replicas),
        "errors": sum(int(r.get("errors", 0)) for r in replicas),
        "p50_run_s": round(statistics.median(times), 3) if times else None,
        "replicas_reporting": len(replicas),
    }


class ClusterView:
    """Assembles `/v1/cluster` from the gateway's pool balancer and agent handles."""

    def __init__(self, pools: PoolBalancer, agents: dict[str, Any], auth: bool):
        self.pools = pools
        self.agents = agents
        self.auth = auth
        self.started = time.time()
        self.version = _version()
        self._cached: tuple[float, dict] | None = None
        self._pending: asyncio.Future | None = None
        self._described: dict[str, dict] = {}  # agent name -> describe(): fixed while the app runs

    async def snapshot(self) -> dict:
        if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
            return self._cached[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._assemble())
            self._pending.add_done_callback(self._done)
        return await asyncio.shield(self._pending)

    def _done(self, fut: asyncio.Future) -> None:
        self._pending = None
        if not fut.cancelled() and fut.exception() is None:
            self._cached = (time.monotonic(), fut.result())

    async def _pool(self, pool: Pool) -> dict:
        replicas = await probe_replicas(pool.handle, "stats", pool.running)
        return {**pool.state(), "engine_stats": engine_totals(replicas)}

    async def _agent(self, name: str, handle, status) -> dict:
        running = starting = None
        if status is not None:
            running, starting = replica_counts(status)
        known = self._described.get(name)
        info, replicas = await asyncio.gather(
            _none() if known is not None or running == 0 else _call(handle, "describe"),
            probe_replicas(handle, "stats", running),
            return_exceptions=True,
        )
        if isinstance(info, dict):
            self._described[name] = known = info
        info = known or {"name": name}
        replicas = replicas if isinstance(replicas, list) else []
        return {
            **info,
            "replicas": {"running": running, "starting": starting},
            "status": str(getattr(status.status, "value", status.status)) if status is not None else "UNKNOWN",
            "message": status.message if status is not None else "",
            **agent_totals(replicas),
        }

    async def _assemble(self) -> dict:
        # One call to Serve's controller: the pools' counts, and the agents' statuses from the same answer.
        deployments = await self.pools.refresh() if self.pools.app_name is not None else {}
        models = {
            model: asyncio.gather(*(self._pool(p) for p in pools)) for model, pools in self.pools.pools.items()
        }
        agents = asyncio.gather(
            *(self._agent(name, h, deployments.get(AGENT_DEPLOYMENT_PREFIX + name)) for name, h in self.agents.items())
        )
        pools_of = dict(zip(models, await asyncio.gather(*models.values())))
        from ray import __version__ as ray_version

        return {
            "object": "cluster",
            "gateway": {
                "version": self.version,
                "ray_version": ray_version,
                "time": round(time.time(), 3),
                "started": round(self.started, 3),
                "auth": self.auth,
            },
            "models": [{"model": m, "pools": pools_of[m]} for m in self.pools.pools],
            "agents": list(await agents),
        }


async def _none():
    return None
