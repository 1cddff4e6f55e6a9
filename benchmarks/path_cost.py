"""What Tandem's serving path costs over a bare Ray Serve app of the same shape, with no model.

Both run in one local Ray cluster, behind one Serve HTTP proxy on a loopback port, on different
route prefixes, with the same replica resources (`--replica-cpus` for the model replica,
`--gateway-cpus` for the ingress, the same `max_ongoing_requests`), and get the same workload:

- `/bare`: `benchmarks/bare_serve_app.py`: proxy -> FastAPI ingress -> token replica over a
  `DeploymentHandle` (stream=True), OpenAI-shaped SSE chunks, what a user writes by hand;
- `/tandem`: Tandem's own gateway and base-model deployment (`cluster/app.py`'s graph, built by
  `null_engine.build_null_app`) with the compute-free `NullEngine` (`benchmarks/null_engine.py`),
  at the config default `stream_interval_ms: 20` (deltas produced within 20 ms go out merged);
- `/tandem0`: the same with `stream_interval_ms: 0` (one message per token, as the bare app).

Both token sources stream the same token ids with no delay (`--delay-s`, default 0), yielding to
the event loop between tokens. Measured, with an aiohttp client in this process:

1. streams of `--tokens` tokens (256; `ignore_eos`) at concurrency `--levels` (1, 8, 32), each
   level `max(--min-streams, concurrency * --streams-per-slot)` streams per app, closed loop: content
   chunks received per second (SSE events with non-empty `delta.content`, as the client gets them),
   tokens per second (from each stream's usage chunk), stream latency p50;
2. 1-token chat completions (non-streamed, `max_tokens: 1`), `--latency-requests` (300) per app,
   sequential, the apps interleaved request by request: latency p50 / p99.

It prints a table with the ratios Tandem / bare and the goals next to them (chunks/s >= 0.8x bare,
1-token p50 <= 1.2x bare), and writes JSON and a PNG to benchmarks/results/ (path_cost-<time>).
Each phase also records the CPU that processes outside this run used meanwhile ("other CPU", % of
one core) and warns above 15%: another test suite or Ray cluster on the machine skews the numbers.

    .venv/bin/python benchmarks/path_cost.py
    .venv/bin/python benchmarks/path_cost.py --levels 1 8 --streams-per-slot 2 --latency-requests 100   # quicker

The client shares the machine's cores with the cluster: on a small machine, numbers at high
concurrency are the whole machine's (client included) and best read as ratios.
Needs matplotlib (the `bench` extra) for the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, percentile, start_local_ray, write_results  # noqa: E402

MODEL = "tiny-chat"
APPS = ("bare", "tandem", "tandem0")
LABELS = {"bare": "bare Serve", "tandem": "Tandem (interval 20 ms)", "tandem0": "Tandem (interval 0)"}
CHUNK_GOAL = 0.8  # Tandem chunks/s >= 0.8x bare
P50_GOAL = 1.2  # Tandem 1-token p50 <= 1.2x bare
MESSAGES = [{"role": "user", "content": "Tell me about the fox."}]


class ForeignLoad:
    """CPU used on this machine by processes outside this run (this process and its descendants:
    the Ray cluster it started) between `start()` and `stop()`, in % of one core. Another test
    suite or Ray cluster running meanwhile makes the numbers not this app's alone."""

    def __init__(self):
        self._t0 = self._busy0 = 0.0
        self._ours0: dict[int, float] = {}

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)

    @staticmethod
    def _ours() -> dict[int, float]:
        import psutil

        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def start(self) -> None:
        self._t0, self._busy0, self._ours0 = time.perf_counter(), self._busy(), self._ours()

    def stop(self) -> float:
        wall, busy, ours = time.perf_counter() - self._t0, self._busy() - self._busy0, self._ours()
        mine = sum(cpu - self._ours0.get(pid, 0.0) for pid, cpu in ours.items())
        return max(0.0, busy - mine) / wall * 100 if wall > 0 else 0.0


FOREIGN_WARN = 15.0  # % of a core used by other processes: above it, a phase's numbers are suspect


# -- deploying ------------------------------------------------------------------------------------


def deploy(apps: dict[str, float | None], replica_cpus: float, gateway_cpus: float, delay_s: float,
           max_ongoing_requests: int = 256, engine: str = "null") -> None:
    """Deploys each app of `apps` (route prefix name -> Tandem's stream_interval_ms, None for the
    bare app) on `/<name>`. `engine`: "null" (NullEngine) or "transformers" (the real tiny model)."""
    from ray import serve

    from benchmarks.bare_serve_app import build_bare_app
    from benchmarks.null_engine import build_null_app, tandem_args
    from cluster.app import build_app
    from cluster.config import GatewaySpec, ModelSpec

    gateway_max_ongoing = GatewaySpec().max_ongoing_requests
    for name, interval_ms in apps.items():
        if interval_ms is None:
            app = build_bare_app(replica_cpus, gateway_cpus, delay_s, max_ongoing_requests, gateway_max_ongoing)
        else:
            # interval 0: one message per token, so no message budget either (as the bare app).
            args = tandem_args(MODEL, replica_cpus, gateway_cpus, interval_ms, max_ongoing_requests,
                               stream_chunks_per_s=0 if interval_ms == 0 else ModelSpec.model_fields["stream_chunks_per_s"].default)
            app = build_null_app(args, delay_s) if engine == "null" else build_app(args)
        serve.run(app, name=name, route_prefix=f"/{name}")


# -- the client -----------------------------------------------------------------------------------


def chat_body(max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def stream_one(session, url: str, max_tokens: int) -> tuple[int, int]:
    """One streamed chat completion: (content chunks received, completion tokens from usage)."""
    chunks = tokens = 0
    async with session.post(url, json=chat_body(max_tokens, stream=True)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        done = False
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{url}: error event: {event['error']}")
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                chunks += 1
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError(f"{url}: stream ended without [DONE]")
    return chunks, tokens


async def complete_one(session, url: str, max_tokens: int = 1) -> int:
    """One non-streamed chat completion; returns its completion tokens."""
    async with session.post(url, json=chat_body(max_tokens, stream=False)) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {body}")
        return body["usage"]["completion_tokens"]


def client_session(concurrency: int):
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(concurrency, 1) + 4),
        timeout=aiohttp.ClientTimeout(total=600),
    )


async def stream_level(session, url: str, concurrency: int, total: int, max_tokens: int) -> dict:
    """`total` streams, `concurrency` in flight at a time."""
    counter = iter(range(total))
    chunks = tokens = 0
    latencies: list[float] = []

    async def worker():
        nonlocal chunks, tokens
        for _ in counter:
            start = time.perf_counter()
            c, t = await stream_one(session, url, max_tokens)
            latencies.append(time.perf_counter() - start)
            chunks += c
            tokens += t

    foreign = ForeignLoad()
    foreign.start()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "foreign_cpu_percent": foreign.stop(),
        "chunks_per_s": chunks / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_chunk": tokens / chunks if chunks else float("nan"),
        "stream_p50_s": percentile(latencies, 50),
        "stream_p99_s": percentile(latencies, 99),
        "streams": total,
        "chunks": chunks,
        "tokens": tokens,
        "wall_s": wall,
    }


async def drive(base: str, args) -> dict:
    urls = {name: f"{base}/{name}/v1/chat/completions" for name in APPS}
    streams: dict[str, dict[int, dict]] = {name: {} for name in APPS}
    async with client_session(max(args.levels)) as session:
        for name in APPS:  # warm-up: connections, replicas' first requests, the gateway's pool counts
            await stream_level(session, urls[name], 4, 8, args.tokens)
            for _ in range(10):
                await complete_one(session, urls[name])
        for i, c in enumerate(args.levels):
            total = max(args.min_streams, c * args.streams_per_slot)
            order = APPS[i % len(APPS):] + APPS[: i % len(APPS)]  # rotate who goes first
            for name in order:
                streams[name][c] = r = await stream_level(session, urls[name], c, total, args.tokens)
                print(f"[path_cost] {name:>8} c={c:<3} {r['chunks_per_s']:8.0f} chunks/s {r['tokens_per_s']:8.0f} tok/s "
                      f"(other processes: {r['foreign_cpu_percent']:.0f}% of a core)", file=sys.stderr, flush=True)

        latencies: dict[str, list[float]] = {name: [] for name in APPS}
        foreign = ForeignLoad()
        foreign.start()
        for _ in range(args.latency_requests):
            for name in APPS:  # interleaved: drift over the run hits every app alike
                start = time.perf_counter()
                await complete_one(session, urls[name])
                latencies[name].append(time.perf_counter() - start)
        foreign_latency = foreign.stop()
    one_token = {
        name: {"p50_s": percentile(v, 50), "p99_s": percentile(v, 99), "mean_s": sum(v) / len(v), "requests": len(v),
               "foreign_cpu_percent": foreign_latency}
        for name, v in latencies.items()
    }
    return {"streams": streams, "one_token": one_token}


# -- report ---------------------------------------------------------------------------------------


def ratio_rows(result: dict, levels: list[int]) -> dict:
    """Tandem / bare per Tandem row: chunks/s and tokens/s per level, 1-token p50 and p99."""
    s, lat = result["streams"], result["one_token"]
    out = {}
    for name in APPS[1:]:
        out[name] = {
            "chunks_per_s": {c: s[name][c]["chunks_per_s"] / s["bare"][c]["chunks_per_s"] for c in levels},
            "tokens_per_s": {c: s[name][c]["tokens_per_s"] / s["bare"][c]["tokens_per_s"] for c in levels},
            "one_token_p50": lat[name]["p50_s"] / lat["bare"]["p50_s"],
            "one_token_p99": lat[name]["p99_s"] / lat["bare"]["p99_s"],
        }
    return out


def print_report(result: dict, ratios: dict, levels: list[int]) -> None:
    s, lat = result["streams"], result["one_token"]
    print(f"\nStreams of {result['config']['tokens']} tokens (NullEngine delay {result['config']['delay_s']} s)")
    header = (f"{'app':<24} {'conc':>4} | {'chunks/s':>9} {'tokens/s':>9} {'tok/chunk':>9} {'stream p50':>10} {'other CPU':>9} | "
              f"{'chunks/s vs bare':>16} {'tokens/s vs bare':>16}")
    print(header)
    print("-" * len(header))
    for c in levels:
        for name in APPS:
            r = s[name][c]
            ratio = "" if name == "bare" else f"{ratios[name]['chunks_per_s'][c]:>16.2f} {ratios[name]['tokens_per_s'][c]:>16.2f}"
            print(f"{LABELS[name]:<24} {c:>4} | {r['chunks_per_s']:>9.0f} {r['tokens_per_s']:>9.0f} {r['tokens_per_chunk']:>9.2f} "
                  f"{r['stream_p50_s'] * 1000:>8.0f}ms {r['foreign_cpu_percent']:>8.0f}% | {ratio}")
    print(f"goal: chunks/s >= {CHUNK_GOAL}x bare")
    for name in APPS[1:]:
        met = [c for c in levels if ratios[name]["chunks_per_s"][c] >= CHUNK_GOAL]
        print(f"  {LABELS[name]:<24} met at concurrency {met or 'none'} of {levels}")

    n = result["config"]["latency_requests"]
    print(f"\n1-token chat completions (non-streamed), {n} sequential per app")
    header = f"{'app':<24} | {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>8} | {'p50 vs bare':>11} {'p99 vs bare':>11}"
    print(header)
    print("-" * len(header))
    for name in APPS:
        r = lat[name]
        ratio = "" if name == "bare" else f"{ratios[name]['one_token_p50']:>11.2f} {ratios[name]['one_token_p99']:>11.2f}"
        print(f"{LABELS[name]:<24} | {r['p50_s'] * 1000:>7.2f} {r['p99_s'] * 1000:>7.2f} {r['mean_s'] * 1000:>8.2f} | {ratio}")
    print(f"goal: 1-token p50 <= {P50_GOAL}x bare")
    for name in APPS[1:]:
        ok = ratios[name]["one_token_p50"] <= P50_GOAL
        print(f"  {LABELS[name]:<24} {ratios[name]['one_token_p50']:.2f}x: {'met' if ok else 'missed'}")
    print(f"(other processes on the machine used {lat['bare']['foreign_cpu_percent']:.0f}% of a core meanwhile)")
    suspect = [f"{name} c={c}" for c in levels for name in APPS if s[name][c]["foreign_cpu_percent"] > FOREIGN_WARN]
    if lat["bare"]["foreign_cpu_percent"] > FOREIGN_WARN:
        suspect.append("1-token latency")
    if suspect:
        print(f"\nWARNING: other processes used more than {FOREIGN_WARN:.0f}% of a core during: {', '.join(suspect)}; "
              "those numbers are not these apps' alone (rerun on a quiet machine)")


def plot(result: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, lat = result["streams"], result["one_token"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(APPS)
    for ax, key, title in ((axes[0], "chunks_per_s", "content chunks / s"), (axes[1], "tokens_per_s", "tokens / s")):
        for j, name in enumerate(APPS):
            xs = [i + (j - 1) * width for i in range(len(levels))]
            ax.bar(xs, [s[name][c][key] for c in levels], width, label=LABELS[name])
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.set_title(f"{title}, streams of {result['config']['tokens']} tokens")
        ax.legend(fontsize=8)
    ax = axes[2]
    xs = range(len(APPS))
    ax.bar([x - 0.2 for x in xs], [lat[n]["p50_s"] * 1000 for n in APPS], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [lat[n]["p99_s"] * 1000 for n in APPS], 0.4, label="p99")
    ax.set_xticks(list(xs), [LABELS[n].replace(" (", "\n(") for n in APPS], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("1-token chat completion latency")
    ax.legend(fontsize=8)
    fig.suptitle("Tandem's serving path vs. bare Ray Serve (no model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="stream concurrency levels")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--streams-per-slot", type=int, default=4, help="streams per concurrent slot at each level")
    parser.add_argument("--min-streams", type=int, default=16, help="at least this many streams per level")
    parser.add_argument("--latency-requests", type=int, default=300, help="1-token requests per app")
    parser.add_argument("--delay-s", type=float, default=0.0, help="per-token delay of both token sources")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus of each model replica")
    parser.add_argument("--gateway-cpus", type=float, default=0.25, help="num_cpus of each ingress (Tandem's default)")
    args = parser.parse_args()

    import ray
    from ray import serve

    port = free_port()
    started = time.monotonic()
    start_local_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy({"bare": None, "tandem": 20.0, "tandem0": 0.0}, args.replica_cpus, args.gateway_cpus, args.delay_s)
        print(f"[path_cost] apps up in {time.monotonic() - started:.0f} s on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        result = asyncio.run(drive(f"http://127.0.0.1:{port}", args))
    finally:
        serve.shutdown()
        ray.shutdown()

    result["config"] = {**vars(args), "apps": {n: LABELS[n] for n in APPS}}
    ratios = ratio_rows(result, args.levels)
    result["ratios"] = ratios
    result["goals"] = {"chunks_per_s_min_ratio": CHUNK_GOAL, "one_token_p50_max_ratio": P50_GOAL}
    print_report(result, ratios, args.levels)
    out = write_results("path_cost", result)
    png = out.with_suffix(".png")
    plot(result, args.levels, png)
    print(f"\nwrote {out}\nwrote {png}")


if __name__ == "__main__":
    main()
