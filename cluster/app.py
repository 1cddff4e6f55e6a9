"""The application builder: `import_path: cluster.app:build_app` in a Ray Serve config file.

Validates the `args` (failing before any replica starts), then binds one base-model deployment
per model and the gateway in front of them. Replica resources come from `placement/`, replica
counts and autoscaling from `autoscale/`.
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application

from autoscale.policy import deployment_scaling_options
from cluster.config import ModelSpec, TandemConfig, parse_args
from cluster.gateway import Gateway
from deployments.base_model import BaseModelDeployment
from placement.resources import replica_options


def model_deployment_name(model: ModelSpec) -> str:
    # Serve deployment names are also metric tags and log file names: keep them plain.
    return "BaseModel-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model.name)


def model_deployment_options(model: ModelSpec) -> dict[str, Any]:
    options = {**replica_options(model.accelerator), **deployment_scaling_options(model.replicas)}
    if model.runtime_env:
        options["ray_actor_options"]["runtime_env"] = dict(model.runtime_env)
    return {"name": model_deployment_name(model), **options}


def build(cfg: TandemConfig) -> Application:
    models = {
        m.name: BaseModelDeployment.options(**model_deployment_options(m)).bind(
            m.name, m.source, m.resolved_engine, m.engine_args
        )
        for m in cfg.models
    }
    gateway_options = {"num_replicas": cfg.gateway.replicas, "ray_actor_options": {"num_cpus": cfg.gateway.cpus}}
    return Gateway.options(**gateway_options).bind(models, cfg.gateway.api_keys_env, cfg.gateway.request_timeout_s)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder. Raises ConfigError (naming field, value and what is allowed)."""
    return build(parse_args(args))
