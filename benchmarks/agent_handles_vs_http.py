"""The same 3-call SGLang program, (a) run in-cluster by an agent replica whose calls reach the base
model over Ray Serve handles, and (b) run from outside with SGLang's own RuntimeEndpoint against the
gateway's native API (one HTTP round trip per call). One run, same model, same prompts, greedy.

    .venv/bin/python benchmarks/agent_handles_vs_http.py [--runs 20]

Prints latency per program run (mean, p50, p99) per path and the ratio outside/in-cluster, and
writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import sglang as sgl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import percentile, start_local_ray, write_results  # noqa: E402


@sgl.function
def three_calls(s, question: str, max_tokens: int = 16):
    """Three generation calls: answer, critique, final answer."""
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("draft", max_tokens=max_tokens, temperature=0))
    s += sgl.user("Check the answer.")
    s += sgl.assistant(sgl.gen("check", max_tokens=max_tokens, temperature=0))
    s += sgl.user("Give the final answer.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))


QUESTIONS = ["What is the capital of France?", "What color is the sky?", "你好", "What is the capital of Italy?"]


def summarize(latencies: list[float]) -> dict:
    return {
        "runs": len(latencies),
        "mean_s": statistics.fmean(latencies),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="tokens per gen call: the fewer, the more of a run is the path rather than the model")
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.app import build_app

    start_local_ray()
    port = 18000 + uuid.uuid4().int % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "models": [{"name": "tiny-chat", "source": "builtin:tiny-chat", "engine": "transformers",
                    "accelerator": {"kind": "cpu", "cpus": 1}, "replicas": {"min": 1, "max": 1}}],
        "agents": [{"name": "three_calls", "program": "benchmarks.agent_handles_vs_http:three_calls", "model": "tiny-chat"}],
    }
    serve.run(build_app(config), name="bench", route_prefix="/")
    try:
        agent = serve.get_deployment_handle("Agent-three_calls", app_name="bench")
        endpoint = sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}", chat_template_name="chatml")

        def in_cluster(q):
            return agent.run.remote({"question": q, "max_tokens": args.max_tokens}).result()["variables"]["answer"]

        def outside(q):
            return three_calls.run(question=q, max_tokens=args.max_tokens, backend=endpoint)["answer"]

        results = {}
        answers = {}
        for name, fn in (("in_cluster_handles", in_cluster), ("outside_runtime_endpoint", outside)):
            for q in QUESTIONS:  # warm-up
                fn(q)
            latencies = []
            for i in range(args.runs):
                start = time.perf_counter()
                answers.setdefault(name, []).append(fn(QUESTIONS[i % len(QUESTIONS)]))
                latencies.append(time.perf_counter() - start)
            results[name] = summarize(latencies)
        same = answers["in_cluster_handles"] == answers["outside_runtime_endpoint"]
    finally:
        serve.shutdown()
        ray.shutdown()

    a, b = results["in_cluster_handles"], results["outside_runtime_endpoint"]
    print(f"{'path':<28} {'runs':>5} {'mean (s)':>9} {'p50 (s)':>9} {'p99 (s)':>9}")
    for name, r in results.items():
        print(f"{name:<28} {r['runs']:>5} {r['mean_s']:>9.4f} {r['p50_s']:>9.4f} {r['p99_s']:>9.4f}")
    print(f"ratio outside/in-cluster: mean {b['mean_s'] / a['mean_s']:.2f}, p50 {b['p50_s'] / a['p50_s']:.2f}, p99 {b['p99_s'] / a['p99_s']:.2f}")
    print(f"same answers on both paths: {same}")
    out = write_results("agent_handles_vs_http", {"config": vars(args), "results": results, "same_answers": same})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
