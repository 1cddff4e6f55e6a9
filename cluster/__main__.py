"""Tandem's command line.

- `python -m cluster check FILE...`: validate Ray Serve config files without starting Ray, and
  print what each would deploy.
- `python -m cluster run FILE`: check, build the built-in models the config uses (with progress, on
  this terminal), then run `serve run FILE` (Ray's own runner), so that a bad config fails before
  Ray starts; says when the application answers, and where. Ctrl-C (or SIGTERM) stops the cluster.
- `python -m cluster plan FILE [--address HOST:PORT]`: what each replica needs and, on a running
  Ray cluster, which nodes could host it (see cluster/plan.py; exit 2 when something cannot be placed).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from autoscale.policy import describe as describe_replicas
from cluster.app import agent_deployment_name
from cluster.config import ConfigError
from cluster.plan import run_plan
from cluster.resolve import agent_own_model, load_serve_config, model_pools
from deployments.models.builtin import BUILTIN_PREFIX, resolve_model_source
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


def _check(path: str) -> list | None:
    """Validate and describe FILE; its (application, config) pairs, or None (said why) when invalid."""
    try:
        apps = load_serve_config(path)
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return None
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
    return apps


def _builtin_sources(apps) -> list[str]:
    sources = set()
    for _, cfg in apps:
        plans = [p for m in cfg.models for p in model_pools(m)] + [o for a in cfg.agents if (o := agent_own_model(a))]
        sources |= {p.source for p in plans if p.source.startswith(BUILTIN_PREFIX)}
    return sorted(sources)


def _urls(doc: dict, app: dict) -> dict[str, str]:
    http = doc.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{host}:{http.get('port', 8000)}" + (app.get("route_prefix") or "/").rstrip("/")
    return {"OpenAI API": base + "/v1", "console": base + "/", "health": base + "/health"}


def _answers(health_url: str) -> bool:
    try:
        with urllib.request.urlopen(health_url, timeout=2) as r:  # noqa: S310 - a loopback URL of our own config
            return r.status == 200
    except OSError:
        return False


def _run(path: str, apps: list, serve_args: list[str]) -> int:
    serve = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if serve is None:
        print("`serve` (from ray[serve]) is not installed in this environment", file=sys.stderr)
        return 1
    # Built here, in front of the user, rather than silently inside the first replica (the others wait
    # on its lock); replicas on this machine then find them in the cache.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for source in _builtin_sources(apps):
        print(f"preparing {source} (built once per machine, then cached)", flush=True)
        resolve_model_source(source)
    urls = _urls(yaml.safe_load(Path(path).read_text()), apps[0][0])
    # Its own session: a Ctrl-C reaches it once, from here, not twice (a second one would cut Serve's
    # graceful shutdown short).
    child = subprocess.Popen([serve, "run", path, *serve_args], start_new_session=True)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    announced = False
    while child.poll() is None:
        if not announced and _answers(urls["health"]):
            announced = True
            width = max(map(len, urls))
            lines = [f"  {name:<{width}}  {url}" for name, url in urls.items()]
            print("\nTandem is ready:\n" + "\n".join(lines) + "\nCtrl-C stops the cluster.\n", flush=True)
        time.sleep(1)
    return child.wait()


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
        return max(0 if _check(f) is not None else 1 for f in args.files)
    if args.command == "plan":
        return run_plan(args.file, args.address)
    apps = _check(args.file)
    if apps is None:
        return 1
    return _run(args.file, apps, args.serve_args)


if __name__ == "__main__":
    sys.exit(main())
