"""`python -m cluster plan FILE`: the config's deployments as placement requirements (from the very
options the app builder hands to Ray Serve), planned by `placement/plan.py` against the live cluster.
Exit codes: 0 everything placeable (or no cluster reachable: requirements only); 1 the config is
invalid; 2 something cannot be placed on the current nodes.
"""

from __future__ import annotations

import sys

import cluster.app as app
from cluster.config import ConfigError, TandemConfig
from cluster.resolve import load_serve_config, model_pools
from placement.plan import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNPLACEABLE,
    Requirement,
    format_report,
    format_requirement,
    live_nodes,
    plan_placement,
    requirement_from_options,
)


def config_requirements(cfg: TandemConfig, application: str = "default") -> list[Requirement]:
    """One Requirement per deployment the app builder makes from `cfg`: pools, agents, gateway."""
    reqs = []
    for m in cfg.models:
        for pool in model_pools(m):
            what = f"model {m.name}" + (f", pool {pool.pool}" if pool.pool else "")
            reqs.append(requirement_from_options(
                pool.deployment_name, what, app.model_deployment_options(pool), pool.replicas.min, pool.replicas.max, application
            ))
    for a in cfg.agents:
        reqs.append(requirement_from_options(
            app.agent_deployment_name(a), f"agent {a.name}", app.agent_deployment_options(a), a.replicas.min, a.replicas.max, application
        ))
    options = app.gateway_deployment_options(cfg)
    reqs.append(requirement_from_options("Gateway", "gateway", options, cfg.gateway.replicas, cfg.gateway.replicas, application))
    return reqs


def run_plan(path: str, address: str | None = None, out=None) -> int:
    """The `plan` command. Returns the exit code (see the module docstring)."""
    out = out or sys.stdout
    try:
        apps = load_serve_config(path)
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return EXIT_INVALID
    reqs = [r for app, cfg in apps for r in config_requirements(cfg, app.get("name", "default"))]
    print(f"{path}: config OK", file=out)
    nodes, where = live_nodes(address, {app.get("name", "default") for app, _ in apps})
    if nodes is None:
        app = None
        for req in reqs:
            if req.application != app:
                app = req.application
                print(f"application {app!r}:", file=out)
            print("\n".join(format_requirement(req)), file=out)
        print(f"{where}: printed the requirements only; pass --address host:port to check placement", file=out)
        return EXIT_OK
    report = plan_placement(reqs, nodes)
    print(format_report(report, where), file=out)
    return EXIT_OK if report.placeable else EXIT_UNPLACEABLE
