"""Session affinity and load spread over 4 base-model replicas: Tandem's routing (the
ConsistentHashRouter of `cluster.app.BASE_MODEL_ROUTERS["session"]`, one session id per agent program run via
`handle.options(session_id=...)`) against Ray Serve's default power-of-two-choices router, side by
side in one run on a local Ray cluster.

    .venv/bin/python benchmarks/affinity.py [--runs 64] [--calls 6] [--concurrency 8] [--backend stub|engine]

Workloads, the same for both routers:
- agent runs: `--runs` program runs, `--concurrency` at a time, each making `--calls` sequential
  generation calls that carry the run's session id (what an agent replica's SGLang backend does);
- plain requests: `--plain` independent calls without a session id, `--concurrency` at a time.

Measured:
(a) affinity: per run, the share of its calls served by the replica that served most of them
    (1.0: the whole run on one replica, where its prefix cache is); mean, min, runs fully on one;
(b) load spread: calls per replica over the 4 replicas, max/min ratio and coefficient of variation.

`--backend stub` (default) serves each call from a replica that only sleeps `--service-ms`
(routing does not depend on the engine, and 8 engine replicas do not fit a small machine);
`--backend engine` uses the real base-model deployment (CPU engine, builtin:tiny-chat, 2 tokens).
Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import start_local_ray, write_results  # noqa: E402

REPLICAS = 4
PROMPTS = ["What is the capital of France?", "What color is the sky?", "Name a prime number.", "你好"]


def stub_deployment():
    from ray import serve

    class StandIn:
        """A base-model stand-in: the same `complete` call shape, a fixed service time, its replica id."""

        def __init__(self, service_ms: float):
            self.service_s = service_ms / 1000
            self.replica = serve.get_replica_context().replica_id.unique_id

        async def complete(self, prompt: str | None = None, **sampling) -> dict:
            await asyncio.sleep(self.service_s * random.uniform(0.8, 1.2))
            return {"text": "", "replica": self.replica}

    return serve.deployment(StandIn, name="BaseModel-stand-in")


def build_apps(backend: str, service_ms: float) -> dict:
    """{router name: bound application}: identical deployments but for the request router."""
    from autoscale.policy import deployment_scaling_options
    from cluster.app import BASE_MODEL_ROUTERS
    from cluster.config import ReplicaSpec

    scaling = deployment_scaling_options(ReplicaSpec(min=REPLICAS, max=REPLICAS))
    routers = {"tandem_consistent_hash": {"request_router_config": BASE_MODEL_ROUTERS["session"]}, "serve_default_pow2": {}}
    apps = {}
    for name, router in routers.items():
        if backend == "stub":
            apps[name] = stub_deployment().options(ray_actor_options={"num_cpus": 0.05}, **scaling, **router).bind(service_ms)
        else:
            from deployments.base_model import BaseModelDeployment

            apps[name] = BaseModelDeployment.options(
                name="BaseModel-tiny-chat", ray_actor_options={"num_cpus": 0.25}, **scaling, **router
            ).bind("tiny-chat", "builtin:tiny-chat", "transformers", {"num_threads": 1, "max_num_seqs": 8})
    return apps


async def agent_runs(handle, runs: int, calls: int, concurrency: int) -> list[list[str]]:
    """Each run: `calls` sequential calls with one session id. Returns the replica of every call, per run."""
    gate = asyncio.Semaphore(concurrency)

    async def one_run(i: int) -> list[str]:
        async with gate:
            session = handle.options(session_id=f"run-{uuid.uuid4().hex}")
            served = []
            for c in range(calls):
                out = await session.complete.remote(prompt=f"{PROMPTS[i % len(PROMPTS)]} step {c}", max_tokens=2, temperature=0)
                served.append(out["replica"])
            return served

    return await asyncio.gather(*(one_run(i) for i in range(runs)))


async def plain_requests(handle, n: int, concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with gate:
            out = await handle.complete.remote(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=2, temperature=0)
            return out["replica"]

    return await asyncio.gather(*(one(i) for i in range(n)))


def spread(replicas: list[str], all_replicas: list[str]) -> dict:
    counts = Counter(replicas)
    per_replica = [counts.get(r, 0) for r in all_replicas]
    mean = statistics.fmean(per_replica)
    return {
        "per_replica": per_replica,
        "max_min_ratio": max(per_replica) / min(per_replica) if min(per_replica) else float("inf"),
        "cv": statistics.pstdev(per_replica) / mean if mean else 0.0,
    }


def affinity(runs: list[list[str]]) -> dict:
    shares = [Counter(run).most_common(1)[0][1] / len(run) for run in runs]
    return {
        "mean_share_on_top_replica": statistics.fmean(shares),
        "min_share_on_top_replica": min(shares),
        "runs_fully_on_one_replica": sum(1 for s in shares if s == 1.0) / len(shares),
        "mean_replicas_per_run": statistics.fmean(len(set(run)) for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=64, help="agent program runs per router")
    parser.add_argument("--calls", type=int, default=6, help="generation calls per run")
    parser.add_argument("--concurrency", type=int, default=8, help="runs (or plain requests) in flight")
    parser.add_argument("--plain", type=int, default=256, help="independent requests without a session id")
    parser.add_argument("--service-ms", type=float, default=30.0, help="stub backend: time per call")
    parser.add_argument("--backend", choices=["stub", "engine"], default="stub")
    args = parser.parse_args()

    import ray
    from ray import serve

    start_local_ray()
    results: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 18000 + uuid.uuid4().int % 1000})
        apps = build_apps(args.backend, args.service_ms)
        for name, app in apps.items():  # both up before either is measured
            serve.run(app, name=f"affinity-{name}", route_prefix=None)

        async def measure(name: str) -> dict:
            handle = serve.get_app_handle(f"affinity-{name}")
            await plain_requests(handle, 4 * REPLICAS, REPLICAS)  # warm-up: every replica known to the router
            started = time.perf_counter()
            runs = await agent_runs(handle, args.runs, args.calls, args.concurrency)
            runs_s = time.perf_counter() - started
            plain = await plain_requests(handle, args.plain, args.concurrency)
            replicas = sorted(set(r for run in runs for r in run) | set(plain))
            assert len(replicas) <= REPLICAS, replicas
            replicas += [f"unused-{i}" for i in range(REPLICAS - len(replicas))]
            return {
                "affinity": affinity(runs),
                "agent_run_spread": spread([r for run in runs for r in run], replicas),
                "plain_spread": spread(plain, replicas),
                "agent_runs_wall_s": runs_s,
            }

        for name in apps:
            results[name] = asyncio.run(measure(name))
    finally:
        serve.shutdown()
        ray.shutdown()

    header = f"{'router':<24} {'share/run':>9} {'min':>5} {'1-replica runs':>14} {'agent calls per replica':>24} {'max/min':>7} {'CV':>5} {'plain calls per replica':>24} {'max/min':>7} {'CV':>5}"
    print(f"{args.runs} runs x {args.calls} calls, {args.concurrency} in flight; {args.plain} plain calls; {REPLICAS} replicas; backend {args.backend}")
    print(header)
    for name, r in results.items():
        a, s, p = r["affinity"], r["agent_run_spread"], r["plain_spread"]
        print(
            f"{name:<24} {a['mean_share_on_top_replica']:>9.3f} {a['min_share_on_top_replica']:>5.2f} "
            f"{a['runs_fully_on_one_replica']:>13.0%} {str(s['per_replica']):>24} {s['max_min_ratio']:>7.2f} {s['cv']:>5.2f} "
            f"{str(p['per_replica']):>24} {p['max_min_ratio']:>7.2f} {p['cv']:>5.2f}"
        )
    t, d = results["tandem_consistent_hash"], results["serve_default_pow2"]
    print(
        f"ratio tandem/default: affinity {t['affinity']['mean_share_on_top_replica'] / d['affinity']['mean_share_on_top_replica']:.2f}x, "
        f"agent-call spread CV {t['agent_run_spread']['cv']:.2f} vs {d['agent_run_spread']['cv']:.2f}, "
        f"plain-call spread CV {t['plain_spread']['cv']:.2f} vs {d['plain_spread']['cv']:.2f}"
    )
    out = write_results("affinity", {"config": vars(args), "replicas": REPLICAS, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
