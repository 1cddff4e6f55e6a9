"""Tandem's command line.

- `python -m cluster check FILE...`: validate Ray Serve config files without starting Ray, and
  print what each would deploy.
- `python -m cluster run FILE`: check, then hand over to `serve run FILE` (Ray's own runner), so
  that a bad config fails before Ray starts. Ctrl-C stops the cluster it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from cluster.config import ConfigError, load_serve_config


def _check(path: str) -> int:
    from autoscale.policy import describe as describe_replicas
    from cluster.app import agent_deployment_name, model_deployment_name
    from placement.resources import describe as describe_accelerator

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
            engine = m.resolved_engine + (" (auto)" if m.engine == "auto" else "")
            print(f"  {model_deployment_name(m)}: model {m.name!r} from {m.source}")
            print(f"    engine {engine}; per replica: {describe_accelerator(m.accelerator)}; {describe_replicas(m.replicas)}")
            if m.engine_args:
                print(f"    engine_args: {m.engine_args}")
            if m.runtime_env:
                print(f"    runtime_env: {m.runtime_env}")
        for a in cfg.agents:
            print(f"  {agent_deployment_name(a)}: SGLang program {a.program} -> model {a.model!r}")
            print(f"    per replica: {a.cpus:g} CPU; {describe_replicas(a.replicas)}; "
                  f"limits: {a.max_calls} generation calls, {a.timeout_s:g} s per run")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description="Tandem cluster tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a Ray Serve config file without starting Ray")
    check.add_argument("files", nargs="+", metavar="FILE")
    run = sub.add_parser("run", help="check FILE, then run it with `serve run`")
    run.add_argument("file", metavar="FILE")
    run.add_argument("serve_args", nargs=argparse.REMAINDER, help="passed on to `serve run`")
    args = parser.parse_args(argv)
    if args.command == "check":
        return max(_check(f) for f in args.files)
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
