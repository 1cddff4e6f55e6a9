"""Overload: where the knee is, and what a request beyond capacity gets.

One model (the built-in tiny model on the `transformers` engine, 1 replica, 0.5 CPU,
`--threads` torch threads) with bounded queues: `max_ongoing_requests: 8` per replica and
`max_queued_requests: 16` in the gateway, and the gateway with its default bounds, no auth; its own
local Ray cluster, on a loopback port.

Closed loop: for each offered concurrency N (`--levels`, default 1 2 4 8 16 24 32 48 64), N clients
each send non-streamed completions of `--max-tokens` (32) tokens (temperature 0, ignore_eos) back
to back for `--step-s` seconds. A refused client waits the `Retry-After` it got (at most 5 s) before
its next request, as a well-behaved client does (`--no-backoff`: it resends at once). Between steps
the requests in flight finish.

Per step: completed requests/s (200s ending within the step), p50/p99 latency of the 200s, the
share of 503s (and 429s, if any), p50/p99 latency of those refusals (they should take
milliseconds, not a queue's minutes) seen by the client and as Serve's proxy and the gateway
replica logged them, and whether every refusal carried `Retry-After`. Other
outcomes (another status, a client error) are counted as errors, with one example each.
Then one line naming the knee: the first concurrency where refusals start, and the throughput
there (and the first level that reaches 95% of the best throughput), and the ERROR / WARNING lines
of Serve's logs. The clients run on the same machine as the cluster: on a small machine they take
CPU from it, most at high concurrency.

    .venv/bin/python benchmarks/overload.py [--step-s 20] [--levels 1 2 4 8 16 24 32 48 64]

Prints a table and writes JSON (benchmarks/results/overload-<time>.json) and a PNG next to it
(throughput and refusal share vs concurrency; latency p50 of 200s and of refusals on a log axis).
Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, percentile, start_local_ray, write_results  # noqa: E402
from benchmarks.soak import (  # noqa: E402
    other_ray_clusters,
    print_log_summary,
    serve_log_summary,
    session_dir,
)

APP = "overload"
MODEL = "tiny-chat"
PROMPTS = ["The capital of France is", "Once upon a time", "The ocean is", "天空是"]
MAX_BACKOFF_S = 5.0


def app_args(args) -> dict:
    return {
        "models": [
            {
                "name": MODEL,
                "source": "builtin:tiny-chat",
                "engine": "transformers",
                "accelerator": {"kind": "cpu", "cpus": 0.5},
                "engine_args": {"num_threads": args.threads},
                "replicas": {"min": 1, "max": 1, "max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued},
            }
        ],
        "gateway": {},
    }


def _error_code(text: str) -> str:
    try:
        return str(json.loads(text)["error"].get("code") or "?")
    except Exception:  # noqa: BLE001 - not OpenAI's error body
        return "no_error_body"


async def one(client, body: dict) -> dict:
    import httpx

    start = time.monotonic()
    try:
        r = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as e:
        end = time.monotonic()
        return {"status": None, "kind": f"client {type(e).__name__}", "latency_s": end - start, "end": end, "detail": repr(e)[:300]}
    end = time.monotonic()
    out = {"status": r.status_code, "latency_s": end - start, "end": end, "retry_after": r.headers.get("retry-after")}
    if r.status_code == 200:
        out["tokens"] = (r.json().get("usage") or {}).get("completion_tokens", 0)
    else:
        out["kind"] = f"{r.status_code} {_error_code(r.text)}"
        out["detail"] = r.text[:300]
    return out


async def step(client, concurrency: int, args) -> dict:
    results: list[dict] = []
    wall_start = time.time()
    start = time.monotonic()
    deadline = start + args.step_s

    async def worker(i: int):
        n = 0
        while time.monotonic() < deadline:
            body = {
                "model": MODEL, "prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True,
            }
            n += 1
            r = await one(client, body)
            results.append(r)
            if r["status"] in (429, 503) and not args.no_backoff:
                try:
                    wait = min(MAX_BACKOFF_S, float(r["retry_after"]))
                except (TypeError, ValueError):
                    wait = 1.0
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
            elif r["status"] != 200 and args.no_backoff:
                await asyncio.sleep(0.01)  # no hot spin on a refusal

    others = [other_ray_clusters()]

    async def watcher():
        while True:
            await asyncio.sleep(5)
            others.append(other_ray_clusters())

    watching = asyncio.create_task(watcher())
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        watching.cancel()
    drain_s = time.monotonic() - deadline

    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]
    other = [r for r in results if r["status"] not in (200, 429, 503)]
    in_step = [r for r in ok if r["end"] <= deadline]
    total = len(results)
    examples = {}
    for r in other:
        examples.setdefault(r["kind"], r.get("detail", ""))
    return {
        "concurrency": concurrency,
        "requests": total,
        "ok": len(ok),
        "ok_per_s": len(in_step) / args.step_s,
        "tokens_per_s": sum(r.get("tokens", 0) for r in in_step) / args.step_s,
        "ok_latency_p50_s": percentile([r["latency_s"] for r in ok], 50),
        "ok_latency_p99_s": percentile([r["latency_s"] for r in ok], 99),
        "refused_503": sum(r["status"] == 503 for r in results),
        "refused_429": sum(r["status"] == 429 for r in results),
        "share_503": sum(r["status"] == 503 for r in results) / total if total else 0.0,
        "share_429": sum(r["status"] == 429 for r in results) / total if total else 0.0,
        "refusal_codes": dict(Counter(r["kind"] for r in refused)),
        "refusal_latency_p50_s": percentile([r["latency_s"] for r in refused], 50),
        "refusal_latency_p99_s": percentile([r["latency_s"] for r in refused], 99),
        "refusal_latency_max_s": max((r["latency_s"] for r in refused), default=float("nan")),
        "refusals_without_retry_after": sum(r.get("retry_after") is None for r in refused),
        "retry_after_values": dict(Counter(str(r.get("retry_after")) for r in refused)),
        "errors": dict(Counter(r["kind"] for r in other)),
        "error_examples": examples,
        "drain_s": drain_s,
        "other_ray_clusters": max(others),
        "wall_start": wall_start,
        "wall_end": time.time(),
    }


async def drive(base_url: str, args) -> list[dict]:
    import httpx

    most = max(args.levels) + 8
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    async with httpx.AsyncClient(base_url=base_url, timeout=args.request_timeout_s, limits=limits) as client:
        warm = await asyncio.gather(*(one(client, {"model": MODEL, "prompt": p, "max_tokens": 8, "temperature": 0}) for p in PROMPTS))
        if any(r["status"] != 200 for r in warm):
            raise RuntimeError(f"warm-up failed: {[(r['status'], r.get('detail')) for r in warm]}")
        rows = []
        for c in args.levels:
            row = await step(client, c, args)
            rows.append(row)
            print(f"[overload] concurrency {c}: {row['ok_per_s']:.2f} ok/s, {row['share_503']:.0%} 503, "
                  f"{row['share_429']:.0%} 429, errors {sum(row['errors'].values())}", file=sys.stderr, flush=True)
        return rows


_ACCESS = re.compile(r"^INFO (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) .* -- POST /v1/completions (\d{3}) ([\d.]+)ms$")


def server_side_refusals(session: Path | None, rows: list[dict]) -> None:
    """Adds to each step the p50 / p99 duration of its 503s as the gateway replica and Serve's
    proxy logged them (their access logs, by timestamp): the rest of a refusal's latency is the
    client's side of the machine."""
    if session is None:
        return
    entries = []  # (unix time, "gateway" | "proxy", ms)
    for path in (session / "logs" / "serve").glob("*.log"):
        if path.name.startswith(f"replica_{APP}_Gateway_"):
            where = "gateway"
        elif path.name.startswith("proxy_"):
            where = "proxy"
        else:
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = _ACCESS.match(line)
            if m and m.group(3) == "503":
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                entries.append((t, where, float(m.group(4)) / 1000))
    for row in rows:
        for where in ("gateway", "proxy"):
            mine = [d for t, w, d in entries if w == where and row["wall_start"] <= t <= row["wall_end"]]
            row[f"{where}_503_p50_s"] = percentile(mine, 50)
            row[f"{where}_503_p99_s"] = percentile(mine, 99)


def fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def knee(rows: list[dict]) -> dict:
    first = next((r for r in rows if r["refused_503"] + r["refused_429"]), None)
    best = max((r["ok_per_s"] for r in rows), default=0.0)
    saturated = next((r for r in rows if best and r["ok_per_s"] >= 0.95 * best), None)
    return {
        "refusals_start_at": first["concurrency"] if first else None,
        "ok_per_s_there": first["ok_per_s"] if first else None,
        "best_ok_per_s": best,
        "saturates_at": saturated["concurrency"] if saturated else None,
    }


def print_report(rows: list[dict], k: dict, args) -> None:
    def ms(r: dict, where: str) -> str:
        p50, p99 = r.get(f"{where}_503_p50_s", float("nan")), r.get(f"{where}_503_p99_s", float("nan"))
        return "-" if math.isnan(p50) else f"{p50 * 1000:.1f}/{p99 * 1000:.1f}"

    header = (f"{'conc':>4} | {'ok/s':>6} {'tok/s':>7} | {'ok p50 (s)':>10} {'ok p99 (s)':>10} | {'503':>5} {'429':>5} | "
              f"{'refusal p50 (ms)':>16} {'p99 (ms)':>9} {'max (ms)':>9} | {'503 at proxy p50/p99':>20} {'at gateway p50/p99':>18} | "
              f"{'Retry-After':>11} | {'errors':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        n_ref = r["refused_503"] + r["refused_429"]
        retry = "-" if not n_ref else ("all" if r["refusals_without_retry_after"] == 0 else f"{r['refusals_without_retry_after']} missing")
        print(
            f"{r['concurrency']:>4} | {r['ok_per_s']:>6.2f} {r['tokens_per_s']:>7.1f} | {fmt(r['ok_latency_p50_s'], '.2f'):>10} "
            f"{fmt(r['ok_latency_p99_s'], '.2f'):>10} | {r['share_503']:>5.0%} {r['share_429']:>5.0%} | "
            f"{fmt(r['refusal_latency_p50_s'] * 1000, '.1f'):>16} {fmt(r['refusal_latency_p99_s'] * 1000, '.1f'):>9} "
            f"{fmt(r['refusal_latency_max_s'] * 1000, '.1f'):>9} | "
            f"{ms(r, 'proxy'):>20} {ms(r, 'gateway'):>18} | {retry:>11} | {sum(r['errors'].values()):>6}"
            + (" *" if r["other_ray_clusters"] else "")
        )
    codes = Counter()
    values = Counter()
    for r in rows:
        codes.update(r["refusal_codes"])
        values.update(r["retry_after_values"])
    if codes:
        print(f"refusals by kind: {dict(codes)}; Retry-After values: {dict(values)}")
    for r in rows:
        for kind, n in r["errors"].items():
            print(f"error at concurrency {r['concurrency']}: {n} x {kind}: {r['error_examples'][kind]}")
    if any(r["other_ray_clusters"] for r in rows):
        print("* another Ray cluster ran on this machine during the step: its numbers are not this app's alone")
    backoff = "resend at once" if args.no_backoff else f"wait Retry-After (at most {MAX_BACKOFF_S:.0f} s)"
    print(f"(closed loop, {args.step_s:.0f} s per step, {args.max_tokens} tokens per request, on refusal: {backoff}; "
          f"max_ongoing_requests {args.max_ongoing}, max_queued_requests {args.max_queued})")
    if k["refusals_start_at"] is None:
        print(f"knee: no refusals up to concurrency {rows[-1]['concurrency']}; best throughput {k['best_ok_per_s']:.2f} requests/s"
              f" (95% of it first at concurrency {k['saturates_at']})")
    else:
        print(f"knee: refusals start at concurrency {k['refusals_start_at']}, with {k['ok_per_s_there']:.2f} requests/s there; "
              f"best throughput {k['best_ok_per_s']:.2f} requests/s (95% of it first at concurrency {k['saturates_at']})")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["concurrency"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    top.plot(xs, [r["ok_per_s"] for r in rows], marker="o", color="tab:blue", label="completed requests/s")
    top.set_ylabel("completed requests/s")
    top.set_title(title)
    top.grid(alpha=0.3)
    share = top.twinx()
    share.plot(xs, [100 * (r["share_503"] + r["share_429"]) for r in rows], marker="s", color="tab:red", label="refused (503 + 429) %")
    share.set_ylabel("refused (%)")
    share.set_ylim(0, 100)
    lines = top.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    top.legend(lines, [line.get_label() for line in lines], loc="upper left")

    def positive(values):
        return [v if not math.isnan(v) and v > 0 else float("nan") for v in values]

    bottom.plot(xs, positive([r["ok_latency_p50_s"] for r in rows]), marker="o", label="p50 of 200s")
    bottom.plot(xs, positive([r["refusal_latency_p50_s"] for r in rows]), marker="s", label="p50 of refusals")
    bottom.set_yscale("log")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(xs, [str(x) for x in xs])
    bottom.set_xlabel("offered concurrency (closed-loop clients)")
    bottom.set_ylabel("latency (s, log)")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--step-s", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica (engine_args.num_threads)")
    parser.add_argument("--max-ongoing", type=int, default=8, help="replicas.max_ongoing_requests")
    parser.add_argument("--max-queued", type=int, default=16, help="replicas.max_queued_requests")
    parser.add_argument("--no-backoff", action="store_true", help="resend at once after a refusal instead of waiting Retry-After")
    parser.add_argument("--request-timeout-s", type=float, default=600)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.app import build_app

    port = free_port()
    start_local_ray()
    session = session_dir()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args(args)), name=APP, route_prefix="/")
        rows = asyncio.run(drive(f"http://127.0.0.1:{port}", args))
    finally:
        serve.shutdown()
        ray.shutdown()

    server_side_refusals(session, rows)
    logs = serve_log_summary(session)
    k = knee(rows)
    print_report(rows, k, args)
    print()
    print_log_summary(logs)
    out = write_results("overload", {"config": {**vars(args), "app": app_args(args)}, "steps": rows, "knee": k, "serve_logs": logs})
    png = out.with_suffix(".png")
    plot(rows, png, f"Tandem overload: 1 replica, max_ongoing {args.max_ongoing}, max_queued {args.max_queued}")
    print(f"\nwrote {out}\nwrote {png}")


if __name__ == "__main__":
    main()
