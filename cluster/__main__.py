"""Tandem's command line.

- `python -m cluster check FILE...`: validate Ray Serve config files without starting Ray, and
  print what each would deploy.
- `python -m cluster run FILE`: check, then hand over to `serve run FILE` (Ray's own runner), so
  that a bad config fails before Ray starts. Ctrl-C stops the cluster it started.
- `python -m cluster plan FILE [--address HOST:PORT]`: what each replica needs and, on a running
  Ray cluster, which nodes could host it (see cluster/plan.py; exit 2 when something cannot be placed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from autoscale.policy import describe as describe_replicas
from cluster.app import agent_deployment_name
from cluster.config import ConfigError
from cluster.plan import run_plan
from cluster.resolve import agent_own_model, load_serve_config, model_pools
from placement.resources import describe as describe_accelerator


def _serving_lines(plan, replicas_line: str) -> list[str]:
    engine = plan.engine + (" (auto)" if plan.auto else "")
    env = plan.runtime_env
    env_line = f"{env}" if env else "the node's own Python environment"
    if plan.spec.runtime_env is None and env:
        env_line += f" (default for {plan.engine})"
    lines = [f"    engine {engine}; per replica: {describe_accelerator(plan.accelerator)}; {replicas_line}"]
    if plan.engine_args:
        lines.append(f"    engine_args: {plan.engine_args}")
    lines.append(f"    runtime_env: {env_line}")
    return lines


def _check(path: str) -> int:
    try:
        apps = load_serve_config(path)
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    for app, cfg in apps:
        print(f"application {app.get('name', 'default')!r} at route {app.get('route_prefix', '/')!r}:")
        print(f"  Gateway: {cfg.gateway.replicas} replica(s), {cfg.gateway.cpus:g} CPU each, "
              f"auth: {'API keys from $' + cfg.gateway.api_keys_env if cfg.gateway.api_keys_env else 'none'}")
        for m in cfg.models:
            for pool in model_pools(m):
                what = f"model {m.name!r}" + (f" pool {pool.pool!r}" if pool.pool else "")
                print(f"  {pool.deployment_name}: {what} from {pool.source}")
                print("\n".join(_serving_lines(pool, describe_replicas(pool.replicas))))
        for a in cfg.agents:
            own = agent_own_model(a)
            backend = f"its own engine, model from {own.source}" if own else f"model {a.model!r} over handles"
            print(f"  {agent_deployment_name(a)}: SGLang program {a.program} -> {backend}")
            if own:
                print("\n".join(_serving_lines(own, describe_replicas(a.replicas))))
            else:
                print(f"    per replica: {a.cpus:g} CPU; {describe_replicas(a.replicas)}")
            print(f"    limits: {a.max_calls} generation calls, {a.timeout_s:g} s per run")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description="Tandem cluster tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a Ray Serve config file without starting Ray")
    check.add_argument("files", nargs="+", metavar="FILE")
    run = sub.add_parser("run", help="check FILE, then run it with `serve run`")
    run.add_argument("file", metavar="FILE")
    run.add_argument("serve_args", nargs=argparse.REMAINDER, help="passed on to `serve run`")
    plan = sub.add_parser("plan", help="what each replica needs and where it fits on a running Ray cluster "
                          "(exit 0: placeable or no cluster, 1: invalid config, 2: something cannot be placed)")
    plan.add_argument("file", metavar="FILE")
    plan.add_argument("--address", default=None, help="Ray cluster GCS address host:port (default: $RAY_ADDRESS, else 'auto')")
    args = parser.parse_args(argv)
    if args.command == "check":
        return max(_check(f) for f in args.files)
    if args.command == "plan":
        return run_plan(args.file, args.address)
    if _check(args.file) != 0:
        return 1
    serve = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if serve is None:
        print("`serve` (from ray[serve]) is not installed in this environment", file=sys.stderr)
        return 1
    sys.stdout.flush()
    os.execv(serve, [serve, "run", args.file, *args.serve_args])


if __name__ == "__main__":
    sys.exit(main())
