"""The transformers engine called directly in process vs. the same engine through the gateway.

Same model, same prompts, same greedy decoding and token counts, at concurrency 1, 8 and 32, in one
run. Prints tokens/s, latency p50/p99 and time to first token (streams) per mode, with the ratio
gateway/direct, and writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/gateway_vs_direct.py [--max-tokens 64] [--requests-per-level 2]

Both modes get the same CPU budget: the direct engine uses `--threads` torch threads, and so does
the single replica behind the gateway (engine_args.num_threads).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import percentile, start_local_ray, write_results  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "你好，请介绍一下你自己。",
    "What color is the sky?",
    "Tell me about the ocean.",
]


def summarize(latencies: list[float], ttfts: list[float], tokens: int, wall: float) -> dict:
    return {
        "tokens_per_s": tokens / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "requests": len(latencies),
        "tokens": tokens,
        "wall_s": wall,
    }


async def run_level(one_request, concurrency: int, total: int) -> dict:
    """Keep `concurrency` requests in flight until `total` are done."""
    latencies, ttfts, tokens = [], [], 0
    counter = iter(range(total))

    async def worker():
        nonlocal tokens
        for i in counter:
            start = time.perf_counter()
            first, n = await one_request(PROMPTS[i % len(PROMPTS)])
            latencies.append(time.perf_counter() - start)
            ttfts.append(first - start)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(latencies, ttfts, tokens, time.perf_counter() - start)


async def bench_direct(model_path: str, engine_args: dict, levels, per_level: int, max_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from deployments.engines.engine import GenerationRequest, SamplingParams
    from deployments.engines.transformers_engine import TransformersEngine

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = TransformersEngine(model_path, engine_args, tokenizer=tokenizer)
    await engine.start()

    async def one(question: str):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        request = GenerationRequest(uuid.uuid4().hex, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), prompt=prompt)
        first, n = None, 0
        async for delta in engine.generate(request):
            if first is None and delta.token_ids:
                first = time.perf_counter()
            n = delta.completion_tokens
        return first, n

    try:
        await run_level(one, 4, 8)  # warm-up
        return {c: await run_level(one, c, max(c, 1) * per_level) for c in levels}
    finally:
        await engine.shutdown()


async def bench_gateway(engine_args: dict, levels, per_level: int, max_tokens: int, threads: int, streaming: dict) -> dict:
    import openai
    import ray
    from ray import serve

    from cluster.app import build_app

    start_local_ray()
    port = 18000 + uuid.uuid4().int % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "models": [
            {
                "name": "tiny-chat",
                "source": "builtin:tiny-chat",
                "engine": "transformers",
                "accelerator": {"kind": "cpu", "cpus": threads},
                "engine_args": engine_args,
                "replicas": {"min": 1, "max": 1, "max_ongoing_requests": 256},
                **streaming,
            }
        ],
        "gateway": {"cpus": 0.5},
    }
    serve.run(build_app(args), name="bench", route_prefix="/")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(question: str):
        stream = await client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        first, n = None, 0
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return first, n

    try:
        await run_level(one, 4, 8)  # warm-up
        return {c: await run_level(one, c, max(c, 1) * per_level) for c in levels}
    finally:
        await client.close()
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=2, help="requests per concurrent slot at each level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the engine (both modes)")
    parser.add_argument("--gateway-threads", type=int, default=None,
                        help="torch threads of the replica behind the gateway, if not --threads (the proxy, the gateway "
                             "and this client share the machine's cores with it)")
    parser.add_argument("--stream-interval-ms", type=float, default=None, help="the model's stream_interval_ms (default: the config default)")
    parser.add_argument("--stream-chunks-per-s", type=float, default=None, help="the model's stream_chunks_per_s (default: the config default)")
    args = parser.parse_args()
    gateway_threads = args.gateway_threads or args.threads
    streaming = {k: v for k, v in (("stream_interval_ms", args.stream_interval_ms), ("stream_chunks_per_s", args.stream_chunks_per_s)) if v is not None}

    from deployments.models.builtin import resolve_model_source

    model_path = str(resolve_model_source("builtin:tiny-chat"))
    engine_args = {"num_threads": args.threads}
    direct = asyncio.run(bench_direct(model_path, engine_args, args.levels, args.requests_per_level, args.max_tokens))
    gateway = asyncio.run(bench_gateway({"num_threads": gateway_threads}, args.levels, args.requests_per_level, args.max_tokens,
                                        gateway_threads, streaming))

    header = f"{'conc':>4} | {'direct tok/s':>12} {'gateway tok/s':>13} {'ratio':>6} | {'lat p50 d/g (s)':>16} {'lat p99 d/g (s)':>16} | {'ttft p50 d/g (s)':>17} {'ttft p99 d/g (s)':>17}"
    print(header)
    print("-" * len(header))
    for c in args.levels:
        d, g = direct[c], gateway[c]
        print(
            f"{c:>4} | {d['tokens_per_s']:>12.1f} {g['tokens_per_s']:>13.1f} {g['tokens_per_s'] / d['tokens_per_s']:>6.2f} | "
            f"{d['latency_p50_s']:>7.3f}/{g['latency_p50_s']:<8.3f} {d['latency_p99_s']:>7.3f}/{g['latency_p99_s']:<8.3f} | "
            f"{d['ttft_p50_s']:>8.3f}/{g['ttft_p50_s']:<8.3f} {d['ttft_p99_s']:>8.3f}/{g['ttft_p99_s']:<8.3f}"
        )
    out = write_results("gateway_vs_direct", {"config": vars(args), "direct": direct, "gateway": gateway})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
