"""`python -m cluster check FILE`: validate a Ray Serve config file without starting Ray."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, load_serve_config


def _check(path: str) -> int:
    from autoscale.policy import describe as describe_replicas
    from cluster.app import model_deployment_name
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
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description="Tandem cluster tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a Ray Serve config file without starting Ray")
    check.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "check":
        return max(_check(f) for f in args.files)
    return 2


if __name__ == "__main__":
    sys.exit(main())
