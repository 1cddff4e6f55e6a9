"""Tandem's command line.

- `python -m cluster check FILE...`: validate Ray Serve config files without starting Ray, and
  print what each would deploy.
- `python -m cluster run FILE`: check, build the built-in models the config uses (with progress, on
  this terminal), then run `serve run FILE` (Ray's own runner), so that a bad config fails before
  Ray starts; says when the application answers, and where. Ctrl-C (or SIGTERM) stops the cluster.
- `python -m cluster hash-key KEY` (or `-` to read it from stdin): the key's SHA-256, for a tenant
  entry of `gateway.keys_file`.
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
from cluster.drain import drain, local_gcs_address
from cluster.plan import run_plan
from cluster.tenants import main_hash_key
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


def _auth(gateway) -> str:
    sources = ([f"API keys from ${gateway.api_keys_env}"] if gateway.api_keys_env else []) + (
        [f"tenants from {gateway.keys_file}"] if gateway.keys_file else []
    )
    return " and ".join(sources) or "none"


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
              f"auth: {_auth(cfg.gateway)}")
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


def _stop(child: subprocess.Popen, apps: list, serve_args: list[str]) -> None:
    """Ctrl-C or SIGTERM: let in-flight requests finish (cluster/drain.py), then stop `serve run`
    (which shuts Serve and its Ray cluster down) as Ctrl-C does. SIGTERM must not reach `serve run`
    itself: it handles only SIGINT gracefully."""
    address = _address_arg(serve_args) or local_gcs_address(child.pid) or os.environ.get("RAY_ADDRESS")
    timeout = max(cfg.gateway.drain_timeout_s for _, cfg in apps)
    if address and address != "local":
        print(f"stopping: in-flight requests finish first (up to {timeout:g} s; Ctrl-C again to stop at once)", flush=True)
        try:
            left = drain(address, [app.get("name", "default") for app, _ in apps], timeout)
            if left:
                print(f"stopping: {', '.join(left)} still draining after {timeout:g} s; stopping anyway", flush=True)
        except Exception as e:  # noqa: BLE001 - stopping goes on regardless
            print(f"stopping: could not drain ({type(e).__name__}: {e}); stopping at once", flush=True)
    if child.poll() is None:
        child.send_signal(signal.SIGINT)


def _address_arg(serve_args: list[str]) -> str | None:
    for i, arg in enumerate(serve_args):
        if arg.startswith("--address="):
            return arg.split("=", 1)[1]
        if arg in ("--address", "-a") and i + 1 < len(serve_args):
            return serve_args[i + 1]
    return None


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
    signals: list[int] = []

    def note(signum, _frame):
        signals.append(signum)
        if len(signals) > 1 and child.poll() is None:
            child.send_signal(signal.SIGINT)  # a second Ctrl-C: stop now, without waiting for the drain

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, note)
    announced = False
    while child.poll() is None:
        if signals:
            _stop(child, apps, serve_args)
            break
        if not announced and _answers(urls["health"]):
            announced = True
            width = max(map(len, urls))
            lines = [f"  {name:<{width}}  {url}" for name, url in urls.items()]
            print("\nTandem is ready:\n" + "\n".join(lines) + "\nCtrl-C stops the cluster.\n", flush=True)
        time.sleep(0.2)
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
    hash_key = sub.add_parser("hash-key", help="print the SHA-256 of an API key, for a gateway.keys_file entry ('-': read it from stdin)")
    hash_key.add_argument("key")
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return main_hash_key([args.key])
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
