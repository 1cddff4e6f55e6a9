"""Where Tandem's serving path spends CPU: every process of the app, sampled under a set load.

Deploys the Tandem app (its own local Ray cluster, one loopback port, route prefix `/tandem`) with
the compute-free `NullEngine` (`benchmarks/null_engine.py`), or with `--engine transformers` the
real built-in tiny model, then drives `--concurrency` closed-loop streaming chat completions of
`--tokens` tokens (aiohttp, in this process). After `--warmup-s` it opens a window of `--seconds`:

- every Python process of the application is sampled with `py-spy record` (`--rate` Hz,
  `--nonblocking`, `--threads`, `--gil`: only the thread holding the GIL, so samples approximate the
  Python CPU time of the process rather than threads waiting for the GIL or a core; raw collapsed
  stacks: one `frame;frame;... count` line per stack, readable by flamegraph.pl and speedscope):
  the HTTP proxy (`ray::ProxyActor`), the gateway (`ray::ServeReplica:tandem:Gateway`), the
  base-model replica (`ray::ServeReplica:tandem:BaseModel-tiny-chat`) and the Serve controller
  (`ray::ServeController`);
- each of those, plus Ray's raylet and GCS server and this process (the client), has its CPU time
  (user + system, psutil) read at the start and the end of the window.

Content chunks the client receives and requests it completes are counted over the same window.
Per process it reports CPU % (of one core), CPU-ms per streamed chunk and per request, py-spy's
samples, the top `--top` (15) functions by self time (the stack's leaf frame; grouped by function
and file, line numbers dropped; a Python frame as leaf includes the C code it called, e.g. uvloop
or Ray's Cython core worker), and Tandem's own functions by inclusive time. It prints a table, and
writes JSON (benchmarks/results/profile_path-<time>.json) and the raw profiles
(benchmarks/results/profile_path-<time>/<process>.txt).

    .venv/bin/python benchmarks/profile_path.py --concurrency 8 --seconds 20
    .venv/bin/python benchmarks/profile_path.py --engine transformers --tokens 64 --concurrency 4
    .venv/bin/python benchmarks/profile_path.py --no-profile      # CPU time only, no py-spy overhead

py-spy (in the venv: .venv/bin/py-spy) reads other processes' memory: run as root, or allow
ptrace (kernel.yama.ptrace_scope=0). py-spy shares the cores with the cluster; the chunk rate in
the window is the rate under profiling (`--no-profile` shows it without). The CPU used meanwhile by
processes outside this run is reported too (a warning above 15% of a core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, free_port, start_local_ray, write_results  # noqa: E402
from benchmarks.path_cost import (  # noqa: E402
    FOREIGN_WARN,
    MODEL,
    ForeignLoad,
    chat_body,
    client_session,
    deploy,
)

APP = "tandem"
#: Process titles sampled with py-spy (prefixes of the title Ray sets, `ray::...`).
PROFILED = ("ray::ProxyActor", "ray::ServeController", f"ray::ServeReplica:{APP}:")
#: Native processes of the cluster whose CPU time is read too (executable name).
NATIVE = ("raylet", "gcs_server")
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"


# -- processes ------------------------------------------------------------------------------------


def cluster_processes() -> dict[int, str]:
    """pid -> label of this cluster's processes worth measuring: its Serve actors (profiled), its
    raylet and GCS server, and this process (the client). Only descendants of this driver: another
    Ray cluster on the machine is not ours."""
    import psutil

    found = {psutil.Process().pid: "client (this process)"}
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = p.cmdline()
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cmdline and cmdline[0].startswith(PROFILED):
            # Titles carry the method running now ("ray::ServeReplica:tandem:Gateway.handle_request"): drop it.
            title = cmdline[0].split()[0]
            if title.startswith("ray::ServeReplica:"):
                title = re.sub(r"\.[a-z_][a-z0-9_]*$", "", title)
            else:
                title = title.split(".")[0]
            found[p.pid] = title.removeprefix("ray::").removeprefix(f"ServeReplica:{APP}:")
        elif name in NATIVE or (cmdline and Path(cmdline[0]).name in NATIVE):
            found[p.pid] = Path(cmdline[0]).name if cmdline else name
    counts = Counter(found.values())
    return {pid: (f"{label} [{pid}]" if counts[label] > 1 else label) for pid, label in found.items()}


def is_profiled(label: str) -> bool:
    return not label.startswith(("client", *NATIVE))


def cpu_seconds(pids) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") + ".txt"


# -- py-spy output --------------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
#: Where Tandem's own code lives (py-spy names files relative to their sys.path entry).
TANDEM_DIRS = ("cluster/", "deployments/", "benchmarks/", "autoscale/", "placement/")


def split_frame(frame: str) -> tuple[str, str]:
    """`func (path/to/file.py:123)` -> ("func", "path/to/file.py")."""
    m = _FRAME.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def frame_key(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: functions grouped across lines."""
    func, file = split_frame(frame)
    return f"{func} ({Path(file).name or file})" if file else func


def top_functions(raw: Path, rate: int, top: int) -> dict:
    """From py-spy's raw (collapsed) stacks: self time per function (each stack's leaf frame; with
    `--native`, native frames too), time per thread, and the inclusive time of Tandem's own
    functions (every stack that passes through one counts once for it)."""
    self_samples: Counter[str] = Counter()
    tandem: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = in_tandem = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            threads[frames[0].partition(": ")[2] or frames[0]] += n
            frames = frames[1:]
        if not frames:
            continue
        total += n
        self_samples[frame_key(frames[-1])] += n
        ours = {frame_key(f) for f in frames if split_frame(f)[1].startswith(TANDEM_DIRS)}
        in_tandem += n if ours else 0
        for key in ours:
            tandem[key] += n
    ms = 1000 / rate

    def rows(counter: Counter[str], k: int) -> list[dict]:
        return [{"function": f, "ms": n * ms, "share": n / total} for f, n in counter.most_common(k)]

    return {
        "samples": total,
        "sampled_ms": total * ms,
        "threads": {t: n * ms for t, n in threads.most_common()},
        "top_self": rows(self_samples, top),
        "tandem_share": in_tandem / total if total else 0.0,
        "top_tandem_inclusive": rows(tandem, top),
    }


# -- load -----------------------------------------------------------------------------------------


class Load:
    """Closed-loop streaming clients; counts content chunks and completed requests as they come."""

    def __init__(self, url: str, concurrency: int, tokens: int):
        self.url, self.concurrency, self.tokens = url, concurrency, tokens
        self.chunks = self.requests = self.errors = 0
        self.first_error: str | None = None

    async def one(self, session) -> None:
        async with session.post(self.url, json=chat_body(self.tokens, stream=True)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    self.requests += 1
                    return
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    self.chunks += 1
            raise RuntimeError("stream ended without [DONE]")

    async def worker(self, session) -> None:
        while True:
            try:
                await self.one(session)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - counted and shown; the load goes on
                self.errors += 1
                self.first_error = self.first_error or f"{type(e).__name__}: {e}"
                await asyncio.sleep(0.1)


def start_py_spy(pid: int, out: Path, seconds: float, rate: int, native: bool = False, gil: bool = True) -> subprocess.Popen:
    cmd = [
        str(PY_SPY), "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(max(1, round(seconds))),
        "--threads", "--format", "raw", "--output", str(out),
    ]
    if gil:
        cmd.append("--gil")
    # py-spy unwinds native stacks only with the process paused for each sample.
    cmd.append("--native" if native else "--nonblocking")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def measure(url: str, args, profile_dir: Path | None) -> dict:
    load = Load(url, args.concurrency, args.tokens)
    async with client_session(args.concurrency) as session:
        workers = [asyncio.create_task(load.worker(session)) for _ in range(args.concurrency)]
        try:
            await asyncio.sleep(args.warmup_s)
            if load.requests == 0:
                raise RuntimeError(f"no request completed in the {args.warmup_s} s warm-up: {load.first_error}")
            processes = cluster_processes()
            spies = {}
            if profile_dir is not None:
                for pid, label in processes.items():
                    if is_profiled(label):
                        spies[pid] = start_py_spy(
                            pid, profile_dir / file_name(label), args.seconds, args.rate, args.native, gil=not args.all_threads
                        )
            foreign = ForeignLoad()
            foreign.start()
            cpu0, chunks0, requests0, t0 = cpu_seconds(processes), load.chunks, load.requests, time.perf_counter()
            await asyncio.sleep(args.seconds)
            cpu1, chunks1, requests1, t1 = cpu_seconds(processes), load.chunks, load.requests, time.perf_counter()
            foreign_cpu = foreign.stop()
            # py-spy stops on its own after --duration; it may need a moment to write its file.
            spy_errors = {}
            for pid, spy in spies.items():
                try:
                    _, err = await asyncio.to_thread(spy.communicate, timeout=60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
                if spy.returncode != 0:
                    spy_errors[pid] = (err or "").strip()[-500:]
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    wall = t1 - t0
    chunks, requests = chunks1 - chunks0, requests1 - requests0
    rows = []
    for pid, label in processes.items():
        if pid not in cpu0 or pid not in cpu1:
            continue
        cpu_ms = (cpu1[pid] - cpu0[pid]) * 1000
        row = {
            "process": label,
            "pid": pid,
            "cpu_ms": cpu_ms,
            "cpu_percent": cpu_ms / (wall * 1000) * 100,
            "cpu_ms_per_chunk": cpu_ms / chunks if chunks else float("nan"),
            "cpu_ms_per_request": cpu_ms / requests if requests else float("nan"),
        }
        raw = profile_dir / file_name(label) if profile_dir is not None and pid in spies else None
        if raw is not None and raw.exists():
            row["profile"] = str(raw.relative_to(ROOT))
            row.update(top_functions(raw, args.rate, args.top))
        elif pid in spy_errors:
            row["profile_error"] = spy_errors[pid]
        rows.append(row)
    rows.sort(key=lambda r: -r["cpu_ms"])
    return {
        "window_s": wall,
        "chunks": chunks,
        "requests": requests,
        "chunks_per_s": chunks / wall,
        "requests_per_s": requests / wall,
        "tokens_per_chunk_approx": (requests * args.tokens / chunks) if chunks else float("nan"),
        "errors": load.errors,
        "first_error": load.first_error,
        "foreign_cpu_percent": foreign_cpu,
        "processes": rows,
    }


# -- report ---------------------------------------------------------------------------------------


def print_report(result: dict, args) -> None:
    print(
        f"\nengine {args.engine}, concurrency {args.concurrency}, {args.tokens}-token streams, "
        f"stream_interval_ms {args.stream_interval_ms:g}, window {result['window_s']:.1f} s"
        + (f", py-spy at {args.rate} Hz{'' if args.all_threads else ' --gil'}{' --native' if args.native else ''}"
           if not args.no_profile else ", no profiler")
    )
    print(
        f"client received {result['chunks']} content chunks ({result['chunks_per_s']:.0f}/s), "
        f"{result['requests']} requests ({result['requests_per_s']:.1f}/s; about {result['tokens_per_chunk_approx']:.1f} "
        f"tokens per chunk), errors {result['errors']}"
        + (f" (first: {result['first_error']})" if result["first_error"] else "")
    )
    print(f"other processes on the machine (not this run's) used {result['foreign_cpu_percent']:.0f}% of a core meanwhile")
    if result["foreign_cpu_percent"] > FOREIGN_WARN:
        print(f"WARNING: more than {FOREIGN_WARN:.0f}%: the numbers are not this app's alone (rerun on a quiet machine)")
    header = f"{'process':<34} | {'CPU %':>6} {'CPU ms':>8} | {'ms/chunk':>8} {'ms/request':>10} | {'py-spy samples':>14}"
    print(header)
    print("-" * len(header))
    total = 0.0
    for r in result["processes"]:
        total += r["cpu_ms"]
        samples = str(r.get("samples", "")) if "samples" in r else ("error" if "profile_error" in r else "-")
        print(f"{r['process']:<34} | {r['cpu_percent']:>6.1f} {r['cpu_ms']:>8.0f} | {r['cpu_ms_per_chunk']:>8.3f} "
              f"{r['cpu_ms_per_request']:>10.2f} | {samples:>14}")
    chunks, requests = result["chunks"], result["requests"]
    print(f"{'all of the above':<34} | {total / (result['window_s'] * 10):>6.1f} {total:>8.0f} | "
          f"{total / chunks if chunks else float('nan'):>8.3f} {total / requests if requests else float('nan'):>10.2f} |")

    for r in result["processes"]:
        if "top_self" not in r:
            if "profile_error" in r:
                print(f"\n{r['process']}: py-spy failed: {r['profile_error']}")
            continue
        print(f"\n{r['process']}: top {len(r['top_self'])} functions by self time "
              f"({r['samples']} samples = {r['sampled_ms']:.0f} ms {'sampled' if args.all_threads else 'holding the GIL'}; raw: {r['profile']})")
        threads = ", ".join(f"{t} {ms:.0f} ms" for t, ms in list(r["threads"].items())[:4])
        if threads:
            print(f"  threads: {threads}")
        for i, f in enumerate(r["top_self"], 1):
            print(f"  {i:>2}. {f['share'] * 100:5.1f}% {f['ms']:7.0f} ms  {f['function']}")
        if r["top_tandem_inclusive"]:
            print(f"  Tandem's code (cluster/, deployments/, benchmarks/) is on the stack in {r['tandem_share'] * 100:.1f}% "
                  f"of the samples; its functions by inclusive time:")
            for f in r["top_tandem_inclusive"][:8]:
                print(f"      {f['share'] * 100:5.1f}% {f['ms']:7.0f} ms  {f['function']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["null", "transformers"], default="null")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop streaming clients")
    parser.add_argument("--seconds", type=float, default=20, help="the measured (and profiled) window")
    parser.add_argument("--warmup-s", type=float, default=5, help="load before the window opens")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--stream-interval-ms", type=float, default=20.0, help="the model's stream_interval_ms (config default 20)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="the null engine's per-token delay")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--gateway-cpus", type=float, default=0.25)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions shown per process")
    parser.add_argument("--native", action="store_true",
                        help="py-spy --native: C/Cython frames too (uvloop, Ray's _raylet); py-spy then pauses "
                             "each process for every sample (no --nonblocking), which slows the app several times")
    parser.add_argument("--all-threads", action="store_true",
                        help="sample every non-idle thread, not only the one holding the GIL (py-spy's default: "
                             "threads waiting for the GIL or a busy core then count as active)")
    parser.add_argument("--no-profile", action="store_true", help="CPU times only, without py-spy")
    args = parser.parse_args()

    if not args.no_profile and not PY_SPY.exists():
        found = shutil.which("py-spy")
        if found is None:
            parser.error(f"py-spy not found ({PY_SPY}); install it in the venv or use --no-profile")
        globals()["PY_SPY"] = Path(found)

    import ray
    from ray import serve

    stamp = time.strftime("%Y%m%dT%H%M%S")
    profile_dir = None if args.no_profile else RESULTS / f"profile_path-{stamp}"
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    started = time.monotonic()
    start_local_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy({APP: args.stream_interval_ms}, args.replica_cpus, args.gateway_cpus, args.delay_s, engine=args.engine)
        print(f"[profile_path] app up in {time.monotonic() - started:.0f} s on 127.0.0.1:{port}; warm-up "
              f"{args.warmup_s:g} s, window {args.seconds:g} s", file=sys.stderr, flush=True)
        result = asyncio.run(measure(f"http://127.0.0.1:{port}/{APP}/v1/chat/completions", args, profile_dir))
    finally:
        serve.shutdown()
        ray.shutdown()

    print_report(result, args)
    out = write_results("profile_path", {"config": {**vars(args), "model": MODEL}, "profiles_dir": str(profile_dir.relative_to(ROOT)) if profile_dir else None, **result})
    print(f"\nwrote {out}" + (f"\nwrote {profile_dir}/" if profile_dir else ""))


if __name__ == "__main__":
    main()
