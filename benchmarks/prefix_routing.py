"""Multi-turn chats over HTTP with `routing: prefix` vs. Serve's default router, side by side in one run.

    .venv/bin/python benchmarks/prefix_routing.py [--conversations 32] [--turns 4] [--replicas 4] [--parallel 8]

One app serves the built-in tiny-chat twice, `--replicas` replicas each (16-token KV pages, so short
histories fill whole pages): `by-prefix` (routing: prefix, Ray Serve LLM's PrefixCacheAffinityRouter)
and `by-default` (routing: least_loaded, Serve's power-of-two-choices). The same workload runs on each,
one after the other: `--conversations` chats of `--turns` turns, `--parallel` at a time, each turn
resending the whole history (a long opening of its own, then the turns so far), as chat clients do,
with no session id. `--shared-system`: all conversations open with one system prompt instead. Measured per router: the prefix-cache hit rate (prompt tokens served from the engines'
caches / prompt tokens, from GET /v1/cluster) and time to first token p50 / p99 (streamed). Prints a
table and writes JSON and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, free_port, percentile, start_local_ray, write_results  # noqa: E402

SYSTEM = (
    "You are a helpful assistant for a small town library. Answer briefly and politely. The library opens at "
    "nine in the morning and closes at six in the evening, every day but Sunday. Members may borrow up to "
    "five books for three weeks, and renew them twice online or at the desk. Children's books are on the "
    "first floor, novels on the second, and the reading room with newspapers and magazines is on the third. "
) * 3
QUESTIONS = ["What is the capital of France?", "What color is the sky?", "How many days are in a week?",
             "What is 2 + 2?", "Who are you?", "Tell me a joke.", "What is water made of?", "Hello!"]


def app_args(replicas: int) -> dict:
    def model(name: str, routing: str) -> dict:
        return {
            "name": name, "source": "builtin:tiny-chat", "engine": "transformers", "routing": routing,
            "engine_args": {"block_size": 16, "num_threads": 1},
            "accelerator": {"kind": "cpu", "cpus": 0.2}, "replicas": {"min": replicas, "max": replicas},
        }

    return {"models": [model("by-prefix", "prefix"), model("by-default", "least_loaded")], "gateway": {"cpus": 0.2}}


async def conversation(client, model: str, index: int, args, ttfts: list[float], first_turns: list[int]) -> None:
    # Each conversation's own opening (a ticket number first): histories share no prefix, unless
    # --shared-system gives them all the same system prompt (which every replica then caches).
    opening = SYSTEM if args.shared_system else f"Ticket {model}-{index:04d}. " + SYSTEM
    messages = [{"role": "system", "content": opening}]
    turns = args.turns
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[(index + turn) % len(QUESTIONS)]})
        start = time.perf_counter()
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        first, answer = None, []
        async for chunk in stream:
            if chunk.usage and turn == 0:
                first_turns.append(chunk.usage.prompt_tokens)
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                answer.append(chunk.choices[0].delta.content)
        ttfts.append((first or time.perf_counter()) - start)
        messages.append({"role": "assistant", "content": "".join(answer)})


async def cache_counts(http, model: str) -> tuple[int, int]:
    view = (await http.get("/v1/cluster")).json()
    stats = next(m for m in view["models"] if m["model"] == model)["pools"][0]["engine_stats"]
    return stats["prompt_tokens"] or 0, stats["cached_prompt_tokens"] or 0


async def workload(client, http, model: str, args) -> dict:
    before = await cache_counts(http, model)
    ttfts: list[float] = []
    first_turns: list[int] = []
    gate = asyncio.Semaphore(args.parallel)

    async def one(i: int):
        async with gate:
            await conversation(client, model, i, args, ttfts, first_turns)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.conversations)))
    wall = time.perf_counter() - start
    await asyncio.sleep(1.5)  # the engines' stats are read live; let the last requests' counts land
    after = await cache_counts(http, model)
    prompt, cached = after[0] - before[0], after[1] - before[1]
    # A conversation's first turn cannot hit (unless --shared-system): the best rate this workload allows.
    ceiling = 1 - (0 if args.shared_system else sum(first_turns)) / prompt if prompt else 0.0
    return {"hit_rate": cached / prompt if prompt else 0.0, "hit_rate_ceiling": ceiling, "prompt_tokens": prompt, "cached_tokens": cached,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99), "seconds": wall, "ttfts": ttfts}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results)
    left.bar(names, [results[n]["hit_rate"] for n in names], color=["tab:green", "tab:gray"])
    left.set_ylim(0, 1)
    left.set_title("prefix-cache hit rate")
    for n in names:
        right.plot(sorted(1000 * t for t in results[n]["ttfts"]), label=n)
    right.set_title("time to first token (ms), sorted")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main(args) -> None:
    import httpx
    import openai
    from ray import serve

    from cluster.app import build
    from cluster.resolve import parse_args

    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        serve.run(build(parse_args(app_args(args.replicas))), name="prefix-bench", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", timeout=300)
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for model in ("by-prefix", "by-default"):  # warm-up: each replica compiles and fills nothing shared
                await asyncio.gather(*(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                                      max_tokens=2) for _ in range(2 * args.replicas)))
            for model in ("by-prefix", "by-default"):
                results[model] = await workload(client, http, model, args)
    finally:
        serve.shutdown()
    print(f"{'router':<12} {'hit rate':>9} {'ceiling':>8} {'prompt tok':>11} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'wall s':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['hit_rate']:>9.3f} {r['hit_rate_ceiling']:>8.3f} {r['prompt_tokens']:>11} {1000 * r['ttft_p50_s']:>12.1f} "
              f"{1000 * r['ttft_p99_s']:>12.1f} {r['seconds']:>7.1f}")
    ratio = results["by-default"]["ttft_p50_s"] / results["by-prefix"]["ttft_p50_s"]
    print(f"TTFT p50 default / prefix: {ratio:.2f} (goal >= 1.5); prefix hit rate {results['by-prefix']['hit_rate']:.3f} (goal >= 0.8)")
    out = write_results("prefix_routing", {"args": vars(args), "results": results, "ttft_p50_ratio": ratio})
    png = RESULTS / (out.stem + ".png")
    plot(results, png)
    print("wrote", out, "and", png)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--shared-system", action="store_true", help="every conversation opens with the same system prompt")
    asyncio.run(main(parser.parse_args()))
