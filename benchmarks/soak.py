"""Soak: mixed traffic against one Tandem app for a set time; errors by kind, latency over time and
each Ray Serve process's memory (RSS) from start to end.

What it deploys (its own local Ray cluster, gateway on a loopback port): the built-in model
`builtin:tiny-chat` on the `transformers` engine (2 fixed replicas, 0.5 CPU and 1 torch thread
each), the three built-in agents, and a keys file (in a temporary directory) with two tenants:
`ok` (no limits) and `capped` (requests_per_minute: 30).

What it sends, with asyncio + httpx:

- `--concurrency` clients of tenant `ok`, each sending back to back, picked at random from a fixed
  mix: chat completions (streamed and not), completions (streamed and not), agent runs
  (`POST /v1/agents/safe_response`, streamed and not, and chat with `model: "agent:safe_response"`),
  and streams that the client drops after 2 chunks. `max_tokens` 16-64, temperature 0 for most.
- one more client, tenant `capped`, sending a burst of `--burst` concurrent completions every
  `--burst-every-s` seconds: more than 30 a minute, so part of it is refused with 429 by design.

Each outcome is one of: `ok`, `expected_429` (tenant `capped`, with `Retry-After`),
`disconnected_by_client` (the deliberate drops), or an unexpected error named by its kind (HTTP
status + error code, an error event inside a stream, a stream without `[DONE]`, or the client's
exception class). Anything unexpected is a bug.

Per `--window-s` window (30 s): requests done, p50 / p99 latency of the ok ones, unexpected errors,
and the RSS of every `ray::ServeReplica:*`, `ray::ProxyActor` and `ray::ServeController` process
of this cluster. The first sample is taken after `--warmup-s` (20 s) of traffic; the windows start
there. At the end it prints the windows, memory per process (start, end, growth), errors by kind
(with one example request each), ERROR lines of Serve's logs and its WARNINGs by message, then
one verdict line:

    unexpected errors: N; max RSS growth: X% (<process>)

and writes JSON (benchmarks/results/soak-<time>.json) and a PNG next to it (latency p50/p99 over
time; RSS per process over time).

    .venv/bin/python benchmarks/soak.py --duration-s 600      # the soak
    .venv/bin/python benchmarks/soak.py --duration-s 60       # a quick check

`--duration-s` is the measured time after the warm-up; the run takes warm-up + duration + a drain
of the requests still in flight + about a minute of start-up. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, percentile, start_local_ray, write_results  # noqa: E402

APP = "soak"
MODEL = "tiny-chat"
AGENT = "safe_response"
OK_KEY = "sk-soak-ok"
CAPPED_KEY = "sk-soak-capped"
CAPPED_RPM = 30
PROCESS_PREFIXES = ("ray::ServeReplica:", "ray::ProxyActor", "ray::ServeController")

QUESTIONS = [
    "What is the capital of France?",
    "你好，请介绍一下你自己。",
    "What color is the sky?",
    "Tell me about the ocean.",
    "Name three fruits.",
]
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The ocean is",
    "天空是",
]

# scenario -> weight in the `ok` clients' mix
MIX = {
    "chat": 3,
    "chat_stream": 3,
    "completion": 2,
    "completion_stream": 1,
    "agent_run": 1,
    "agent_run_stream": 1,
    "agent_chat": 1,
    "agent_chat_stream": 1,
    "drop_stream": 1,
}


# -- the app -------------------------------------------------------------------------------------


def app_args(keys_file: Path) -> dict:
    return {
        "models": [
            {
                "name": MODEL,
                "source": "builtin:tiny-chat",
                "engine": "transformers",
                "accelerator": {"kind": "cpu", "cpus": 0.5},
                "engine_args": {"num_threads": 1},
                "replicas": {"min": 2, "max": 2},
            }
        ],
        "agents": [
            {"name": name, "program": f"deployments.programs:{name}", "model": MODEL}
            for name in ("multi_step_reasoning", "safe_response", "self_consistency")
        ],
        "gateway": {"keys_file": str(keys_file)},
    }


def write_keys_file(directory: Path) -> Path:
    from cluster.tenants import hash_key

    keys = {
        "tenants": [
            {"name": "ok", "key_sha256": [hash_key(OK_KEY)]},
            {"name": "capped", "key_sha256": [hash_key(CAPPED_KEY)], "requests_per_minute": CAPPED_RPM},
        ]
    }
    path = directory / "keys.json"
    path.write_text(json.dumps(keys, indent=2))
    return path


# -- requests and their outcomes -----------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    tenant: str
    outcome: str  # ok | expected_429 | disconnected_by_client | unexpected
    kind: str  # for unexpected: what went wrong
    latency_s: float
    end: float  # time.monotonic()
    detail: str = ""
    request: dict = field(default_factory=dict)


def _error_code(body: bytes | str) -> str:
    try:
        err = json.loads(body)["error"]
        return str(err.get("code") or err.get("type") or "?")
    except Exception:  # noqa: BLE001 - not OpenAI's error body
        return "no_error_body"


def _scenario_request(scenario: str, rng: random.Random) -> tuple[str, dict]:
    """(path, JSON body) of one request of `scenario`."""
    question = rng.choice(QUESTIONS)
    messages = [{"role": "user", "content": question}]
    greedy = rng.random() < 0.8
    sampling = {"temperature": 0} if greedy else {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1 << 16)}
    max_tokens = rng.choice([16, 32, 48, 64])
    if scenario in ("chat", "chat_stream"):
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **sampling}
        if scenario == "chat_stream":
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return "/v1/chat/completions", body
    if scenario in ("completion", "completion_stream"):
        body = {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, **sampling}
        if scenario == "completion_stream":
            body["stream"] = True
        return "/v1/completions", body
    if scenario in ("agent_run", "agent_run_stream"):
        body = {"question": question, "max_tokens": rng.choice([16, 32])}
        if scenario == "agent_run_stream":
            body["stream"] = True
        return f"/v1/agents/{AGENT}", body
    if scenario in ("agent_chat", "agent_chat_stream"):
        return "/v1/chat/completions", {"model": f"agent:{AGENT}", "messages": messages, "stream": scenario == "agent_chat_stream"}
    if scenario == "drop_stream":
        # Long enough (ignore_eos) that the drop lands mid-stream.
        return "/v1/chat/completions", {
            "model": MODEL, "messages": messages, "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True,
        }
    if scenario == "capped":
        return "/v1/completions", {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": 16, "temperature": 0}
    raise ValueError(scenario)


async def one_request(client, scenario: str, tenant: str, key: str, rng: random.Random) -> Outcome:
    import httpx

    path, body = _scenario_request(scenario, rng)
    headers = {"Authorization": f"Bearer {key}"}
    start = time.monotonic()

    def done(outcome: str, kind: str = "", detail: str = "") -> Outcome:
        end = time.monotonic()
        return Outcome(scenario, tenant, outcome, kind, end - start, end, detail[:300], {"path": path, **body})

    def refused(status: int, text: str, retry_after: str | None) -> Outcome:
        code = _error_code(text)
        if status == 429 and tenant == "capped" and code == "rate_limit_exceeded":
            if retry_after is None:
                return done("unexpected", "429 rate_limit_exceeded without Retry-After", text)
            return done("expected_429")
        return done("unexpected", f"{status} {code}", text)

    try:
        if not body.get("stream"):
            r = await client.post(path, json=body, headers=headers)
            if r.status_code != 200:
                return refused(r.status_code, r.text, r.headers.get("retry-after"))
            data = r.json()
            if path.startswith("/v1/agents/"):
                good = data.get("object") == "agent.run" and "answer" in data
            else:
                good = bool(data.get("choices"))
            return done("ok") if good else done("unexpected", "200 malformed body", r.text)

        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return refused(r.status_code, text, r.headers.get("retry-after"))
            chunks, finished = 0, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    finished = True
                    break
                event = json.loads(payload)
                if isinstance(event, dict) and "error" in event:
                    return done("unexpected", f"stream error event {_error_code(payload)}", payload)
                chunks += 1
                if scenario == "drop_stream" and chunks >= 2:
                    break  # leaving the `async with` closes the connection mid-stream
            if scenario == "drop_stream":
                return done("disconnected_by_client")
            return done("ok") if finished else done("unexpected", "stream ended without [DONE]", f"{chunks} chunks")
    except httpx.HTTPError as e:
        return done("unexpected", f"client {type(e).__name__}", repr(e))
    except (json.JSONDecodeError, ValueError) as e:
        return done("unexpected", f"client {type(e).__name__}", repr(e))


# -- memory --------------------------------------------------------------------------------------


def other_ray_clusters() -> int:
    """Ray clusters on this machine that are not this driver's (their GCS servers): they share
    the CPUs, so numbers taken meanwhile are not this app's alone."""
    import psutil

    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    n = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["pid"] not in mine and cmd and cmd[0].endswith("/gcs_server"):
            n += 1
    return n


def serve_processes() -> dict[int, str]:
    """pid -> title of this cluster's Serve processes (descendants of this driver: another Ray
    cluster on the machine is not ours)."""
    import psutil

    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cmdline and cmdline[0].startswith(PROCESS_PREFIXES):
            # Titles carry the method running at the moment ("ray::ProxyActor.receive_asgi_messages",
            # "ray::ServeReplica:soak:Gateway.handle_request"): drop it (a lowercase identifier;
            # deployment names here are BaseModel-<model>, Agent-<name>, Gateway, TenantLimiter).
            title = cmdline[0].split()[0]
            if title.startswith("ray::ServeReplica:"):
                title = re.sub(r"\.[a-z_][a-z0-9_]*$", "", title)
            else:
                title = title.split(".")[0]
            found[p.pid] = title
    return found


def sample_rss() -> dict[int, tuple[str, float]]:
    """pid -> (title, RSS in MB)."""
    import psutil

    out = {}
    for pid, title in serve_processes().items():
        try:
            out[pid] = (title, psutil.Process(pid).memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def process_labels(pids_titles: dict[int, str]) -> dict[int, str]:
    """A readable label per pid: the title without `ray::`, with the pid where titles repeat."""
    counts = Counter(pids_titles.values())
    labels = {}
    for pid, title in pids_titles.items():
        short = title.removeprefix("ray::").removeprefix("ServeReplica:")
        labels[pid] = f"{short} [{pid}]" if counts[title] > 1 else short
    return labels


# -- the run -------------------------------------------------------------------------------------


async def drive(base_url: str, args) -> dict:
    import httpx

    rng = random.Random(args.seed)
    scenarios, weights = zip(*MIX.items())
    outcomes: list[Outcome] = []
    rss_samples: list[tuple[float, dict[int, tuple[str, float]]]] = []  # (seconds since t0, sample)
    others: list[tuple[float, int]] = []  # (time.monotonic(), other Ray clusters on the machine)
    t_begin = time.monotonic()
    t0 = t_begin + args.warmup_s  # measured windows start here
    deadline = t0 + args.duration_s
    limits = httpx.Limits(max_connections=args.concurrency + args.burst + 8, max_keepalive_connections=args.concurrency + args.burst + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=args.request_timeout_s, limits=limits) as client:

        async def ok_client(i: int):
            my_rng = random.Random(rng.random())
            while time.monotonic() < deadline:
                scenario = my_rng.choices(scenarios, weights)[0]
                outcomes.append(await one_request(client, scenario, "ok", OK_KEY, my_rng))

        async def capped_client():
            my_rng = random.Random(rng.random())
            while time.monotonic() < deadline:
                started = time.monotonic()
                burst = await asyncio.gather(
                    *(one_request(client, "capped", "capped", CAPPED_KEY, my_rng) for _ in range(args.burst))
                )
                outcomes.extend(burst)
                await asyncio.sleep(max(0.0, min(args.burst_every_s - (time.monotonic() - started), deadline - time.monotonic())))

        async def sampler():
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            rss_samples.append((0.0, sample_rss()))
            n = 0
            while True:
                n += 1
                await asyncio.sleep(max(0.0, t0 + n * args.window_s - time.monotonic()))
                if time.monotonic() >= deadline:
                    return
                rss_samples.append((time.monotonic() - t0, sample_rss()))
                progress(outcomes, t0, n, args.window_s)

        async def watcher():
            while True:
                others.append((time.monotonic(), other_ray_clusters()))
                await asyncio.sleep(5)

        clients = [asyncio.create_task(ok_client(i)) for i in range(args.concurrency)]
        clients.append(asyncio.create_task(capped_client()))
        sampling = asyncio.create_task(sampler())
        watching = asyncio.create_task(watcher())
        try:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            # No new requests now; the ones in flight finish (a cancel would be a client disconnect).
            print(f"[soak] {args.duration_s:.0f} s done; waiting for requests in flight ...", file=sys.stderr, flush=True)
            _, pending = await asyncio.wait(clients, timeout=args.request_timeout_s)
            drained_s = time.monotonic() - deadline
            rss_samples.append((time.monotonic() - t0, sample_rss()))
        finally:
            # Also on Ctrl-C: no client may outlive the HTTP client.
            for task in [*clients, sampling, watching]:
                task.cancel()
            await asyncio.gather(*clients, sampling, watching, return_exceptions=True)
    return {
        "outcomes": outcomes, "rss_samples": rss_samples, "t0": t0, "drain_s": drained_s, "stuck_clients": len(pending),
        "others": others,
    }


def progress(outcomes: list[Outcome], t0: float, n: int, window_s: float) -> None:
    lo, hi = t0 + (n - 1) * window_s, t0 + n * window_s
    win = [o for o in outcomes if lo <= o.end < hi]
    ok = [o.latency_s for o in win if o.outcome == "ok"]
    bad = sum(o.outcome == "unexpected" for o in win)
    print(
        f"[soak] t={n * window_s:>5.0f}s  requests {len(win):>4}  p50 {percentile(ok, 50):6.2f}s  p99 {percentile(ok, 99):6.2f}s  unexpected {bad}",
        file=sys.stderr, flush=True,
    )


def summarize(run: dict, args) -> dict:
    outcomes: list[Outcome] = run["outcomes"]
    t0 = run["t0"]
    n_windows = max(1, int(-(-args.duration_s // args.window_s)))
    windows = []
    for w in range(n_windows):
        lo = w * args.window_s
        last = w == n_windows - 1
        # The last window also takes the requests that ended during the drain.
        win = [o for o in outcomes if o.end - t0 >= lo and (last or o.end - t0 < lo + args.window_s)]
        ok = [o.latency_s for o in win if o.outcome == "ok"]
        windows.append({
            "t_end_s": min(lo + args.window_s, args.duration_s),
            "requests": len(win),
            "ok": len(ok),
            "latency_p50_s": percentile(ok, 50),
            "latency_p99_s": percentile(ok, 99),
            "expected_429": sum(o.outcome == "expected_429" for o in win),
            "disconnected_by_client": sum(o.outcome == "disconnected_by_client" for o in win),
            "unexpected": sum(o.outcome == "unexpected" for o in win),
            "other_ray_clusters": max(
                (n for t, n in run["others"] if t - t0 >= lo and (last or t - t0 < lo + args.window_s)), default=0
            ),
        })
    warm = [o for o in outcomes if o.end < t0]
    warm_ok = [o.latency_s for o in warm if o.outcome == "ok"]
    warmup = {
        "requests": len(warm), "ok": len(warm_ok),
        "latency_p50_s": percentile(warm_ok, 50), "latency_p99_s": percentile(warm_ok, 99),
        "expected_429": sum(o.outcome == "expected_429" for o in warm),
        "disconnected_by_client": sum(o.outcome == "disconnected_by_client" for o in warm),
        "unexpected": sum(o.outcome == "unexpected" for o in warm),
        "other_ray_clusters": max((n for t, n in run["others"] if t < t0), default=0),
    }

    # Memory: every process seen, by pid.
    samples = run["rss_samples"]
    titles = {}
    for _, sample in samples:
        for pid, (title, _) in sample.items():
            titles.setdefault(pid, title)
    labels = process_labels(titles)
    first, last = samples[0][1], samples[-1][1]
    memory = []
    for pid in sorted(titles, key=lambda p: labels[p]):
        start = first.get(pid, (None, None))[1]
        end = last.get(pid, (None, None))[1]
        memory.append({
            "process": labels[pid], "pid": pid, "title": titles[pid],
            "start_mb": start, "end_mb": end,
            "growth_pct": (end - start) / start * 100 if start and end is not None else None,
            "note": "" if start is not None and end is not None else ("gone at the end" if end is None else "new after the start"),
            "series": [[t, s[pid][1]] for t, s in samples if pid in s],
        })

    errors = Counter(o.kind for o in outcomes if o.outcome == "unexpected")
    examples = {}
    for o in outcomes:
        if o.outcome == "unexpected" and o.kind not in examples:
            examples[o.kind] = {"scenario": o.scenario, "tenant": o.tenant, "request": o.request, "response": o.detail}
    by_outcome = Counter(o.outcome for o in outcomes)
    by_scenario = {}
    for s in sorted({o.scenario for o in outcomes}):
        mine = [o for o in outcomes if o.scenario == s]
        ok = [o.latency_s for o in mine if o.outcome == "ok"]
        by_scenario[s] = {
            "requests": len(mine), **Counter(o.outcome for o in mine),
            "latency_p50_s": percentile(ok, 50), "latency_p99_s": percentile(ok, 99),
        }
    growths = [m for m in memory if m["growth_pct"] is not None]
    worst = max(growths, key=lambda m: m["growth_pct"]) if growths else None
    return {
        "windows": windows, "warmup": warmup, "memory": memory,
        "errors_by_kind": dict(errors.most_common()), "error_examples": examples,
        "outcomes": dict(by_outcome), "by_scenario": by_scenario,
        "unexpected_errors": sum(errors.values()),
        "max_rss_growth": {"process": worst["process"], "pct": worst["growth_pct"]} if worst else None,
        "drain_s": run["drain_s"], "stuck_clients": run["stuck_clients"],
    }


def session_dir() -> Path | None:
    """This driver's Ray session directory (best effort: Ray's private layout)."""
    try:
        import ray

        return Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


_LOG_LINE = re.compile(r"^(ERROR|WARNING|CRITICAL) \S+ \S+ (\S+) .*? -- (.*)$")
_IDS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b[0-9a-f]{32,}\b")


def serve_log_summary(session: Path | None, limit: int = 20) -> dict:
    """ERROR (and tracebacks) and WARNING lines of the session's Serve logs: the first ERROR lines
    as they are, WARNINGs counted by message (request ids masked)."""
    if session is None:
        return {"dir": None, "count": 0, "lines": [], "warnings": {}}
    directory = session / "logs" / "serve"
    errors, warnings = [], Counter()
    for path in sorted(directory.glob("*.log")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = _LOG_LINE.match(line)
            if m and m.group(1) == "WARNING":
                warnings[f"{m.group(2)} -- {_IDS.sub('<id>', m.group(3))[:200]}"] += 1
            elif m or "Traceback" in line:
                errors.append(f"{path.name}: {line.strip()[:400]}")
    return {"dir": str(directory), "count": len(errors), "lines": errors[:limit], "warnings": dict(warnings.most_common(10))}


def print_log_summary(logs: dict) -> None:
    print(f"ERROR lines in Serve's logs: {logs['count']}" + (f" ({logs['dir']})" if logs.get("dir") else ""))
    for line in logs["lines"]:
        print(f"  {line}")
    if logs["warnings"]:
        print("WARNING lines in Serve's logs, by message:")
        for message, n in logs["warnings"].items():
            print(f"  {n:>5}  {message}")


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def print_report(summary: dict, logs: dict) -> None:
    def row(label: str, w: dict) -> str:
        shared = "*" if w["other_ray_clusters"] else ""
        return (f"{label:>10} | {w['requests']:>8} {w['ok']:>5} | {fmt(w['latency_p50_s']):>8} {fmt(w['latency_p99_s']):>8} | "
                f"{w['expected_429']:>8} {w['disconnected_by_client']:>7} | {w['unexpected']:>6} {shared}")

    print(f"{'window end':>10} | {'requests':>8} {'ok':>5} | {'p50 (s)':>8} {'p99 (s)':>8} | {'429 exp.':>8} {'dropped':>7} | {'errors':>6}")
    print("-" * 80)
    print(row("warm-up", summary["warmup"]))
    for w in summary["windows"]:
        print(row(f"{w['t_end_s']:.0f}s", w))
    print(f"(drain after the end: {summary['drain_s']:.1f} s; its requests are in the last window)")
    if summary["warmup"]["other_ray_clusters"] or any(w["other_ray_clusters"] for w in summary["windows"]):
        print("* another Ray cluster ran on this machine during the window: its numbers are not this app's alone")

    print()
    width = max(len(m["process"]) for m in summary["memory"]) if summary["memory"] else 10
    print(f"{'process':<{width}} | {'start MB':>8} {'end MB':>8} {'growth':>8}")
    print("-" * (width + 30))
    for m in summary["memory"]:
        growth = "-" if m["growth_pct"] is None else f"{m['growth_pct']:+.1f}%"
        print(f"{m['process']:<{width}} | {fmt(m['start_mb'], '.1f'):>8} {fmt(m['end_mb'], '.1f'):>8} {growth:>8}  {m['note']}")

    print()
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items())))
    print("per scenario:")
    for s, d in summary["by_scenario"].items():
        rest = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("requests", "latency_p50_s", "latency_p99_s"))
        print(f"  {s:<18} {d['requests']:>5} requests ({rest}); ok p50 {fmt(d['latency_p50_s'])} s, p99 {fmt(d['latency_p99_s'])} s")
    print()
    if summary["errors_by_kind"]:
        print("unexpected errors by kind:")
        for kind, n in summary["errors_by_kind"].items():
            ex = summary["error_examples"][kind]
            print(f"  {n:>5}  {kind}")
            print(f"         e.g. {ex['scenario']} ({ex['tenant']}): {json.dumps(ex['request'], ensure_ascii=False)}")
            print(f"         -> {ex['response']}")
    else:
        print("unexpected errors by kind: none")
    print_log_summary(logs)
    print()
    worst = summary["max_rss_growth"]
    growth = f"{worst['pct']:.1f}% ({worst['process']})" if worst else "n/a"
    print(f"unexpected errors: {summary['unexpected_errors']}; max RSS growth: {growth}")


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    ts = [w["t_end_s"] for w in summary["windows"]]
    lat.plot(ts, [w["latency_p50_s"] for w in summary["windows"]], marker="o", label="p50")
    lat.plot(ts, [w["latency_p99_s"] for w in summary["windows"]], marker="o", label="p99")
    errs = [(w["t_end_s"], w["unexpected"]) for w in summary["windows"] if w["unexpected"]]
    if errs:
        for t, n in errs:
            lat.axvline(t, color="red", alpha=0.3)
        lat.plot([], [], color="red", alpha=0.3, label="window with unexpected errors")
    lat.set_ylabel("latency of ok requests (s)")
    lat.set_title(title)
    lat.grid(alpha=0.3)
    lat.legend()
    for m in summary["memory"]:
        if m["series"]:
            xs, ys = zip(*m["series"])
            mem.plot(xs, ys, marker=".", label=m["process"])
    mem.set_xlabel("seconds since the warm-up ended")
    mem.set_ylabel("RSS (MB)")
    mem.grid(alpha=0.3)
    mem.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600, help="measured time, after the warm-up")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of tenant 'ok', each sending back to back")
    parser.add_argument("--window-s", type=float, default=30)
    parser.add_argument("--warmup-s", type=float, default=20)
    parser.add_argument("--burst", type=int, default=8, help="concurrent requests per burst of tenant 'capped'")
    parser.add_argument("--burst-every-s", type=float, default=10)
    parser.add_argument("--request-timeout-s", type=float, default=180)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.app import build_app

    port = free_port()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tandem-soak-") as tmp:
        keys_file = write_keys_file(Path(tmp))
        start_local_ray()
        session = session_dir()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(app_args(keys_file)), name=APP, route_prefix="/")
            print(f"[soak] app up in {time.monotonic() - started:.0f} s on 127.0.0.1:{port}; "
                  f"warm-up {args.warmup_s:.0f} s, then {args.duration_s:.0f} s", file=sys.stderr, flush=True)
            run = asyncio.run(drive(f"http://127.0.0.1:{port}", args))
        finally:
            serve.shutdown()
            ray.shutdown()

    logs = serve_log_summary(session)
    summary = summarize(run, args)
    print_report(summary, logs)
    config = {**vars(args), "app": app_args(Path("<tmp>/keys.json")), "capped_requests_per_minute": CAPPED_RPM, "mix": MIX}
    out = write_results("soak", {"config": config, **summary, "serve_logs": logs})
    png = out.with_suffix(".png")
    plot(summary, png, f"Tandem soak: {args.concurrency} clients + bursts of {args.burst}, {args.duration_s:.0f} s")
    print(f"\nwrote {out}\nwrote {png}")


if __name__ == "__main__":
    main()
