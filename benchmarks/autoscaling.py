"""How fast Tandem's autoscaling reacts: load step -> added replica serving, load stop -> scaled
back down, first request -> a replica from zero.

One local Ray cluster, one app with three base models (the built-in tiny model on CPU, engines
batching `--max-num-seqs` requests at a time, 1..2 replicas):

- `engine-signal`: EngineSignalPolicy on the engines' queue (`target_waiting_requests: 1`), with a
  `target_ongoing_requests` so high that Serve's ongoing-requests signal alone would never scale;
- `ongoing`: Serve's default policy on ongoing requests (`target_ongoing_requests: --target-ongoing`);
- `from-zero`: min 0, max 1.

For each of the first two, `--clients` concurrent streaming clients (handles, `--max-tokens`
tokens each, ignore_eos) start at once. Seconds from that step: until the controller starts a
second replica (its decision), until Serve reports it RUNNING, and until a probe request is first
answered by a replica that was not there before the step. Then the load stops, and: seconds until
the deployment is back to one replica. For `from-zero`: seconds from the first request to a
replica starting and to the first streamed delta, then from the answer back to zero replicas.
Delays are `--upscale-delay` / `--downscale-delay`; scaling down also waits for Serve's look-back
window (autoscale.policy.LOOK_BACK_PERIOD_S) to forget the load.

    .venv/bin/python benchmarks/autoscaling.py [--clients 10] [--max-tokens 32]

Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, start_local_ray, write_results  # noqa: E402

APP = "autoscale-bench"
QUESTION = [{"role": "user", "content": "Tell me about the ocean."}]


def app_args(args) -> dict:
    def model(name: str, replicas: dict, max_num_seqs: int | None = None) -> dict:
        engine_args = {"num_threads": 1}
        if max_num_seqs:
            engine_args["max_num_seqs"] = max_num_seqs
        return {
            "name": name,
            "source": "builtin:tiny-chat",
            "engine": "transformers",
            "accelerator": {"kind": "cpu", "cpus": 0.1},
            "engine_args": engine_args,
            "stream_interval_ms": 0,
            "stream_chunks_per_s": 0,
            "replicas": {"upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay, **replicas},
        }

    return {
        "models": [
            model("engine-signal", {"min": 1, "max": 2, "target_ongoing_requests": 64, "max_ongoing_requests": 128,
                                    "target_waiting_requests": 1}, args.max_num_seqs),
            model("ongoing", {"min": 1, "max": 2, "target_ongoing_requests": args.target_ongoing}, args.max_num_seqs),
            model("from-zero", {"min": 0, "max": 1}),
        ],
        "gateway": {"cpus": 0.05},
    }


def replica_states(deployment: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP].deployments[deployment].replica_states)


def running(deployment: str) -> int:
    return replica_states(deployment).get("RUNNING", 0)


async def step_scenario(model: str, args) -> dict:
    from ray import serve

    deployment = f"BaseModel-{model}"
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    before = {(await handle.complete.remote(messages=QUESTION, max_tokens=1))["replica"]}
    ok, failed = 0, 0
    stop = asyncio.Event()

    async def client():
        nonlocal ok, failed
        while not stop.is_set():
            try:
                last = None
                async for delta in handle.options(stream=True).stream.remote(
                    messages=QUESTION, max_tokens=args.max_tokens, ignore_eos=True, temperature=0
                ):
                    last = delta
                ok += last is not None and last["completion_tokens"] == args.max_tokens
            except Exception:  # noqa: BLE001 - counted
                failed += 1

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
    up_started = up_running = up_served = None
    while loop.time() - t0 < args.timeout and up_served is None:
        await asyncio.sleep(0.25)
        states = await asyncio.to_thread(replica_states, deployment)
        if up_started is None and states.get("RUNNING", 0) + states.get("STARTING", 0) >= 2:
            up_started = loop.time() - t0  # the controller decided: a replica is starting
        if up_running is None and states.get("RUNNING", 0) >= 2:
            up_running = loop.time() - t0
        if up_running is not None:
            replica = (await handle.complete.remote(messages=QUESTION, max_tokens=1))["replica"]
            if replica not in before:
                up_served = loop.time() - t0
    stop.set()
    t_stop = loop.time()
    down = None
    while loop.time() - t_stop < args.timeout:
        if await asyncio.to_thread(running, deployment) <= 1:
            down = loop.time() - t_stop
            break
        await asyncio.sleep(0.25)
    await asyncio.gather(*tasks)
    return {"up_started_s": up_started, "up_running_s": up_running, "up_served_s": up_served, "down_s": down, "ok": ok, "failed": failed}


async def zero_scenario(args) -> dict:
    from ray import serve

    deployment = "BaseModel-from-zero"
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    assert await asyncio.to_thread(running, deployment) == 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    started = None

    async def watch():
        nonlocal started
        while started is None:
            if sum((await asyncio.to_thread(replica_states, deployment)).values()):
                started = loop.time() - t0
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    first = None
    async for _ in handle.options(stream=True).stream.remote(messages=QUESTION, max_tokens=4, temperature=0):
        first = first or loop.time() - t0
    await asyncio.wait_for(watcher, 5)
    t_done = loop.time()
    down = None
    while loop.time() - t_done < args.timeout:
        if await asyncio.to_thread(running, deployment) == 0:
            down = loop.time() - t_done
            break
        await asyncio.sleep(0.25)
    return {"up_started_s": started, "up_running_s": None, "up_served_s": first, "down_s": down, "ok": 1, "failed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="concurrent streaming clients in the load step")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=2, help="engine batch size (small: the step queues)")
    parser.add_argument("--target-ongoing", type=float, default=4, help="target_ongoing_requests of the `ongoing` model")
    parser.add_argument("--upscale-delay", type=float, default=1.0)
    parser.add_argument("--downscale-delay", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per phase")
    args = parser.parse_args()

    import ray
    from ray import serve

    from autoscale.policy import LOOK_BACK_PERIOD_S, METRICS_INTERVAL_S
    from cluster.app import build_app
    from deployments.models.builtin import resolve_model_source

    resolve_model_source("builtin:tiny-chat")
    start_local_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_app(app_args(args)), name=APP, route_prefix=None)
        results = {
            "engine-signal": asyncio.run(step_scenario("engine-signal", args)),
            "ongoing": asyncio.run(step_scenario("ongoing", args)),
            "from-zero": asyncio.run(zero_scenario(args)),
        }
    finally:
        serve.shutdown()
        ray.shutdown()

    def fmt(v):
        return f"{v:>8.1f}" if v is not None else f"{'-':>8}"

    print(f"\nload step: {args.clients} streaming clients x {args.max_tokens} tokens; engine batch {args.max_num_seqs}; "
          f"delays up {args.upscale_delay:g}s / down {args.downscale_delay:g}s; look-back {LOOK_BACK_PERIOD_S:g}s, "
          f"metrics pushed every {METRICS_INTERVAL_S:g}s")
    header = (f"{'scenario':<14} | {'replica starting (s)':>20} | {'RUNNING (s)':>11} | {'served by new (s)':>17} | "
              f"{'back down (s)':>13} | {'ok':>4} {'failed':>6}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<14} | {fmt(r['up_started_s']):>20} | {fmt(r['up_running_s']):>11} | {fmt(r['up_served_s']):>17} | "
              f"{fmt(r['down_s']):>13} | {r['ok']:>4} {r['failed']:>6}")
    out = write_results("autoscaling", {"config": vars(args), "look_back_period_s": LOOK_BACK_PERIOD_S,
                               "metrics_interval_s": METRICS_INTERVAL_S, "results": results})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
