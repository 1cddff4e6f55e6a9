"""Pools: the base-model deployments that serve one model name, and how the gateway picks one.

A model is served by one or more pools (e.g. TurboMind on H100 and LMDeploy-PyTorch on Ascend
910B), each its own Serve deployment with its own engine, accelerator and autoscaling. Inside a
pool, Serve's request router picks the replica; across pools, the gateway picks:

- only pools with a running replica, while any pool has one (failover: a pool whose replicas are
  all gone, e.g. its nodes were lost, gets no requests);
- among those, the least loaded: this gateway's requests in flight to the pool per running
  replica, relative to the pool's `target_ongoing_requests` (so a pool of fast GPUs with a higher
  target takes proportionally more);
- when no pool has a running replica, the first pool: the request waits for a replica to start
  there (scaling from zero, or replacing replicas it lost), up to the pool's `cold_start_timeout_s`.

Replica counts come from Serve's controller (`serve.status()`), refreshed in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

logger = logging.getLogger("ray.serve")

REFRESH_INTERVAL_S = 1.0


@dataclass
class Pool:
    info: dict[str, Any]  # from cluster.app.pool_info
    handle: Any  # DeploymentHandle
    in_flight: int = 0
    running: int | None = None  # None: not known yet
    starting: int = 0
    status: str = "UNKNOWN"
    message: str = ""
    served: int = 0

    @property
    def name(self) -> str:
        return self.info["pool"] or "default"

    @property
    def deployment(self) -> str:
        return self.info["deployment"]

    def load(self) -> float:
        replicas = max(self.running or 0, 1)
        return (self.in_flight + 1) / (replicas * self.info["target_ongoing_requests"])

    def scales_from_zero(self) -> bool:
        return self.info["min_replicas"] == 0

    def has_no_running_replica(self) -> bool:
        """Known to have none: scaled to zero, or (min >= 1) its replicas lost or not yet placed.
        False while the count is unknown."""
        return self.running == 0

    def state(self) -> dict[str, Any]:
        return {
            "pool": self.name,
            "deployment": self.deployment,
            "engine": self.info["engine"],
            "accelerator": self.info["accelerator"],
            "replicas": {
                "running": self.running,
                "starting": self.starting,
                "min": self.info["min_replicas"],
                "max": self.info["max_replicas"],
            },
            "in_flight": self.in_flight,
            "served": self.served,
            "status": self.status,
            "message": self.message,
        }


class NoPoolAvailable(Exception):
    """No pool of a model can take a request now (a 503 for clients). Plain message: it crosses
    process boundaries (agent replica -> gateway)."""

    @classmethod
    def of(cls, model: str, pools: list[Pool]) -> "NoPoolAvailable":
        described = "; ".join(f"{p.name}: {p.running or 0} running ({p.message or p.status})" for p in pools)
        return cls(f"The model '{model}' has no running replica in any pool ({described}); retry later.")


@dataclass
class PoolBalancer:
    pools: dict[str, list[Pool]]  # model name -> its pools, in config order
    app_name: str | None = None
    _refresher: asyncio.Task | None = field(default=None, repr=False)
    refreshed_at: float = 0.0

    @classmethod
    def from_bound(cls, models: dict[str, list[dict]], app_name: str | None) -> "PoolBalancer":
        pools = {
            model: [Pool(info={k: v for k, v in entry.items() if k != "handle"}, handle=entry["handle"]) for entry in entries]
            for model, entries in models.items()
        }
        return cls(pools=pools, app_name=app_name)

    # -- replica counts from Serve -------------------------------------------------------------

    @cached_property
    def needs_counts(self) -> bool:
        """Counts matter only to choose between pools, or to know that a pool is scaled to zero;
        otherwise Serve's controller is not asked every second."""
        return any(len(pools) > 1 or any(p.scales_from_zero() for p in pools) for pools in self.pools.values())

    def start(self) -> None:
        """Start the background refresh (needs a running event loop: called on first use)."""
        if self._refresher is None and self.app_name is not None and self.needs_counts:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - the controller may be briefly unreachable; keep last counts
                logger.warning("pool status refresh failed: %s", e)
            await asyncio.sleep(REFRESH_INTERVAL_S)

    async def refresh(self) -> dict[str, Any]:
        """Update every pool from Serve's controller; returns the application's deployment statuses
        (name -> Serve's DeploymentStatusOverview), for callers that show other deployments too."""
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        if app is None:
            return {}
        for pools in self.pools.values():
            for pool in pools:
                d = app.deployments.get(pool.deployment)
                if d is None:
                    continue
                pool.running, pool.starting = replica_counts(d)
                pool.status = str(getattr(d.status, "value", d.status))
                pool.message = d.message
        self.refreshed_at = time.monotonic()
        return dict(app.deployments)

    # -- picking ----------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return list(self.pools)

    async def ensure_counts(self) -> None:
        """Fetch replica counts now if none have come in yet (a first request picks with them)."""
        if self.refreshed_at == 0.0 and self.app_name is not None and self.needs_counts:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - pick without counts; the background refresh retries
                logger.warning("pool status refresh failed: %s", e)

    def pick(self, model: str, exclude: tuple[Pool, ...] = ()) -> Pool:
        """The pool for the next request of `model` (see the module docstring)."""
        self.start()
        pools = [p for p in self.pools[model] if p not in exclude]
        if not pools:
            raise NoPoolAvailable.of(model, self.pools[model])
        if len(pools) == 1 and not exclude:
            return pools[0]  # nothing to choose; Serve queues until a replica is ready
        known = [p for p in pools if p.running is not None]
        if len(known) < len(pools):
            # Counts not in yet (the gateway just started): spread by load alone.
            return min(pools, key=Pool.load)
        running = [p for p in pools if p.running]
        if running:
            return min(running, key=Pool.load)
        # None running: the first pool; its replica is starting, or comes on demand (min 0), and the
        # request waits for it (bounded by the pool's cold_start_timeout_s).
        return pools[0]

    def state(self) -> dict[str, list[dict]]:
        return {model: [p.state() for p in pools] for model, pools in self.pools.items()}


def replica_counts(deployment_status) -> tuple[int, int]:
    """(running, starting) replicas of a deployment, from Serve's DeploymentStatusOverview."""
    from ray.serve._private.common import ReplicaState

    states = deployment_status.replica_states
    starting = sum(n for s, n in states.items() if s in (ReplicaState.STARTING, ReplicaState.PENDING_MIGRATION))
    return states.get(ReplicaState.RUNNING, 0), starting
