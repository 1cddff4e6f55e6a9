"""The application builder: `import_path: cluster.app:build_app` in a Ray Serve config file.

Validates the `args` (failing before any replica starts), then binds one base-model deployment
per model, one agent deployment per registered SGLang program (holding a handle to its base
model), and the gateway in front of them all. Replica resources come from `placement/`, replica
counts and autoscaling from `autoscale/`.
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from autoscale.policy import deployment_scaling_options
from cluster.config import AgentSpec, ModelSpec, TandemConfig, parse_args
from cluster.gateway import Gateway
from deployments.base_model import BaseModelDeployment
from placement.resources import replica_options


def model_deployment_name(model: ModelSpec) -> str:
    # Serve deployment names are also metric tags and log file names: keep them plain.
    return "BaseModel-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model.name)


# Session affinity for base models: every call of one agent run carries the run's session id and
# lands on one replica (its prefix cache is there); the next replicas on the ring take over when that
# one rejects (at max_ongoing_requests). Calls without a session id spread evenly.
BASE_MODEL_ROUTER = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
    request_router_kwargs={"num_fallback_replicas": 2},
)


def model_deployment_options(model: ModelSpec) -> dict[str, Any]:
    options = {**replica_options(model.accelerator), **deployment_scaling_options(model.replicas)}
    if model.runtime_env:
        options["ray_actor_options"]["runtime_env"] = dict(model.runtime_env)
    return {"name": model_deployment_name(model), "request_router_config": BASE_MODEL_ROUTER, **options}


def agent_deployment_name(agent: AgentSpec) -> str:
    return "Agent-" + agent.name


def agent_deployment_options(agent: AgentSpec) -> dict[str, Any]:
    return {
        "name": agent_deployment_name(agent),
        "ray_actor_options": {"num_cpus": agent.cpus},
        **deployment_scaling_options(agent.replicas),
    }


def build(cfg: TandemConfig) -> Application:
    models = {
        m.name: BaseModelDeployment.options(**model_deployment_options(m)).bind(
            m.name, m.source, m.resolved_engine, m.engine_args, stream_interval_ms=m.stream_interval_ms
        )
        for m in cfg.models
    }
    agents = {}
    if cfg.agents:
        from deployments.agent import AgentDeployment  # needs sglang's frontend

        agents = {
            a.name: AgentDeployment.options(**agent_deployment_options(a)).bind(
                a.name, a.program, models[a.model], max_calls=a.max_calls, timeout_s=a.timeout_s
            )
            for a in cfg.agents
        }
    gateway_options = {
        "num_replicas": cfg.gateway.replicas,
        "max_ongoing_requests": cfg.gateway.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.gateway.cpus},
    }
    return Gateway.options(**gateway_options).bind(
        models,
        agents,
        api_keys_env=cfg.gateway.api_keys_env,
        request_timeout_s=cfg.gateway.request_timeout_s,
        sglang_model=cfg.gateway.sglang_model,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder. Raises ConfigError (naming field, value and what is allowed)."""
    return build(parse_args(args))
