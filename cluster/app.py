"""The application builder: `import_path: cluster.app:build_app` in a Ray Serve config file.

Validates the `args` (failing before any replica starts), then binds one base-model deployment
per model, one agent deployment per registered SGLang program (holding a handle to its base
model), and the gateway in front of them all. Replica resources come from `placement/`, replica
counts and autoscaling from `autoscale/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from autoscale.policy import deployment_scaling_options
from cluster.config import AgentSpec, ReplicaSpec, TandemConfig
from cluster.resolve import PoolPlan, ServingPlan, agent_own_model, model_pools, parse_args
from cluster.gateway import Gateway
from cluster.tenants import TenantLimiter
from deployments.agent import AgentDeployment
from deployments.base_model import BaseModelDeployment
from placement.resources import replica_options


# How a model's requests pick a replica (`routing:` in the config), with Ray Serve's own routers:
# - session: consistent hashing on the Serve session id. Every call of one agent run carries the run's
#   session id, and so do HTTP requests with an x-session-id header (or the OpenAI `user` field): they
#   land on one replica, whose prefix cache holds their history; the next replicas on the ring take
#   over when that one rejects (at max_ongoing_requests). Requests without a session spread evenly.
# - prefix: Ray Serve LLM's PrefixCacheAffinityRouter, reading Tandem's request arguments
#   (deployments/routing.py). Its default never thinks replicas imbalanced, so prompts sharing a
#   system prompt would all pile onto one replica: here a replica more than target_ongoing_requests
#   busier than the least busy one loses its affinity (power of two choices decides).
# - least_loaded: Serve's default power-of-two-choices router.
BASE_MODEL_ROUTERS = {
    "session": RequestRouterConfig(
        request_router_class="ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
        request_router_kwargs={"num_fallback_replicas": 2},
    ),
    "prefix": RequestRouterConfig(request_router_class="deployments.routing:PromptPrefixRouter"),
    "least_loaded": RequestRouterConfig(),
}


def request_router_config(pool: PoolPlan) -> RequestRouterConfig:
    router = BASE_MODEL_ROUTERS[pool.routing]
    if pool.routing == "prefix":
        kwargs = {"imbalanced_threshold": float(pool.replicas.target_ongoing_requests)}
        return RequestRouterConfig(request_router_class=router.request_router_class, request_router_kwargs=kwargs)
    return router


# Ray Serve's own knobs for replicas whose user code is all async and never blocks its loop (the
# gateway's and the base models'): run that code on the replica's main event loop, and route handle
# calls on the caller's loop, instead of hopping between threads per request and per streamed
# message. Measured (benchmarks/profile_path.py, null engine, 16 streams): +16% requests/s, -14%
# CPU per request. Not for agent replicas, whose programs call handles from worker threads. A
# deployment's own runtime_env env_vars win over these.
SERVE_FAST_PATH_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def with_fast_path_env(options: dict[str, Any]) -> dict[str, Any]:
    actor = options.setdefault("ray_actor_options", {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**SERVE_FAST_PATH_ENV, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    return options


def _serving_options(plan: ServingPlan, replicas: ReplicaSpec) -> dict[str, Any]:
    options = {
        **replica_options(plan.accelerator, max_replicas_per_node=replicas.max_replicas_per_node),
        **deployment_scaling_options(replicas),
    }
    if plan.runtime_env:
        options["ray_actor_options"]["runtime_env"] = plan.runtime_env
    return options


def model_deployment_options(pool: PoolPlan) -> dict[str, Any]:
    return with_fast_path_env({
        "name": pool.deployment_name,
        "request_router_config": request_router_config(pool),
        **_serving_options(pool, pool.replicas),
    })


def pool_info(pool: PoolPlan) -> dict[str, Any]:
    """What the gateway knows about a pool: for load balancing, cold starts and `/v1/pools`."""
    r = pool.replicas
    return {
        "model": pool.model,
        "pool": pool.pool,
        "deployment": pool.deployment_name,
        "engine": pool.engine,
        "accelerator": {"kind": pool.accelerator.kind, "count": pool.accelerator.count, "type": pool.accelerator.type},
        "min_replicas": r.min,
        "max_replicas": r.max,
        "target_ongoing_requests": r.target_ongoing_requests,
        "cold_start_timeout_s": r.cold_start_timeout_s,
    }


def agent_deployment_name(agent: AgentSpec) -> str:
    return "Agent-" + agent.name


def agent_deployment_options(agent: AgentSpec) -> dict[str, Any]:
    own = agent_own_model(agent)
    if own is not None:
        # The agent replica hosts its own engine: it needs that engine's accelerator and environment.
        return {"name": agent_deployment_name(agent), **_serving_options(own, agent.replicas)}
    return {
        "name": agent_deployment_name(agent),
        "ray_actor_options": {"num_cpus": agent.cpus},
        **deployment_scaling_options(agent.replicas),
    }


def _own_model_args(agent: AgentSpec) -> dict[str, Any] | None:
    own = agent_own_model(agent)
    if own is None:
        return None
    return {"source": own.source, "engine": own.engine, "engine_args": own.engine_args, "device_count": own.accelerator.count}


def gateway_deployment_options(cfg: TandemConfig) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": cfg.gateway.cpus}
    if any(m.routing == "prefix" for m in cfg.models):
        # The prefix router asks its prefix-tree actor with blocking ray.get calls: on the gateway's
        # own loop (the fast path) they would stall every other request; give routing its own loop.
        actor["runtime_env"] = {"env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}}
    return with_fast_path_env({
        "num_replicas": cfg.gateway.replicas,
        "max_ongoing_requests": cfg.gateway.max_ongoing_requests,
        "ray_actor_options": actor,
        # serve deploy replaces gateway replicas when the app changes: in-flight streams finish first.
        "graceful_shutdown_timeout_s": cfg.gateway.drain_timeout_s,
    })


def build(cfg: TandemConfig, base_model: Deployment = BaseModelDeployment, engine: tuple[str, dict] | None = None) -> Application:
    """The application graph of `cfg`. `base_model` and `engine` (name, engine_args) replace every
    model's deployment class and engine: the seam `benchmarks/null_engine.py` uses to run this
    very graph with a compute-free engine."""
    # model name -> its pools: [{"handle": bound deployment, **pool_info}], in config order.
    models = {
        m.name: [
            {
                "handle": base_model.options(**model_deployment_options(p)).bind(
                    m.name, p.source, *(engine or (p.engine, p.engine_args)),
                    stream_interval_ms=p.stream_interval_ms, stream_chunks_per_s=p.stream_chunks_per_s,
                    pool=p.pool, device_count=p.accelerator.count,
                ),
                **pool_info(p),
                **({"engine": engine[0]} if engine else {}),
            }
            for p in model_pools(m)
        ]
        for m in cfg.models
    }
    agents = {}
    if cfg.agents:
        agents = {
            a.name: AgentDeployment.options(**agent_deployment_options(a)).bind(
                a.name,
                a.program,
                # Each run goes to one pool of the model (one pool keeps a run's prefix cache warm).
                models[a.model] if a.model else None,
                max_calls=a.max_calls,
                timeout_s=a.timeout_s,
                own_model=_own_model_args(a),
            )
            for a in cfg.agents
        }
    limiter = None
    if cfg.gateway.keys_file is not None:
        # One limiter for all gateway replicas; leases outlive the longest request.
        limiter = TenantLimiter.bind(lease_ttl_s=cfg.gateway.request_timeout_s + 60)
    return Gateway.options(**gateway_deployment_options(cfg)).bind(
        models,
        agents,
        api_keys_env=cfg.gateway.api_keys_env,
        request_timeout_s=cfg.gateway.request_timeout_s,
        sglang_model=cfg.gateway.sglang_model,
        max_request_bytes=cfg.gateway.max_request_bytes,
        max_concurrent_requests=cfg.gateway.max_concurrent_requests,
        # Absolute: replicas do not run in the directory the config was read from.
        keys_file=str(Path(cfg.gateway.keys_file).resolve()) if cfg.gateway.keys_file else None,
        limiter=limiter,
        parsers={m.name: {"tool_call_parser": m.tool_call_parser, "reasoning_parser": m.reasoning_parser} for m in cfg.models},
    )


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder. Raises ConfigError (naming field, value and what is allowed)."""
    return build(parse_args(args))
