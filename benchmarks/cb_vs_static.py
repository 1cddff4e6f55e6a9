"""The CPU engine vs. the static-batch limit of the same model, side by side in one process.

Three ways to generate the same greedy tokens for the same `--seqs` chat prompts (`--tokens` new
tokens each, EOS ignored), one after the other, each in a fresh process of its own (torch's OpenMP
thread pools of one mode would otherwise slow the next: measured, the engine ran at 0.6x of its
own speed after a static run in the same process), `--repeats` times each (best run kept):

- `static`: one `model.generate` call on the left-padded batch: the model's plain batched limit;
- `cb`: transformers' own continuous batching (`model.generate_batch`) with the engine's settings;
- `engine`: Tandem's `TransformersEngine` (continuous batching plus per-request sampling, streaming
  deltas, stop handling), all sequences submitted at once.

Prints tokens/s of each and the ratios to `static`, writes JSON to benchmarks/results/.

    .venv/bin/python benchmarks/cb_vs_static.py [--seqs 32] [--tokens 64] [--threads 2]
        [--max-batch-tokens N] [--block-size N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_results  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Tell me a story.",
    "What color is the sky?",
    "Describe the ocean.",
    "你好",
    "给我讲一个故事。",
    "Count from 1 to 20.",
    "Who wrote Romeo and Juliet?",
]


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True, tokenize=True, return_dict=False)
        for i in range(n)
    ]


def best_of(repeats: int, run) -> float:
    """The shortest wall time of `repeats` runs (after one warm-up run)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_static(model, tokenizer, inputs: list[list[int]], tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(ids) for ids in inputs)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in inputs])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in inputs])
    out = {}

    def run():
        with torch.inference_mode():
            out["ids"] = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, pad_token_id=pad,
            )

    return best_of(repeats, run), [row[width:].tolist() for row in out["ids"]]


def bench_cb(model, inputs: list[list[int]], tokens: int, engine_args: dict, repeats: int) -> tuple[float, list[list[int]]]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1)  # -1: never stop early
    cb_config = ContinuousBatchingConfig(
        page_size=engine_args["block_size"], num_blocks=engine_args["num_blocks"], max_batch_tokens=engine_args["max_batch_tokens"],
        max_requests_per_batch=engine_args["max_num_seqs"], use_cuda_graph=False, use_async_batching=False, auto_switch_to_flash=False,
    )
    out = {}

    def run():
        out["results"] = model.generate_batch(inputs, generation_config=config, continuous_batching_config=cb_config)

    seconds = best_of(repeats, run)
    by_index = sorted(out["results"].values(), key=lambda r: int(r.request_id.rsplit("_", 1)[-1]) if r.request_id.rsplit("_", 1)[-1].isdigit() else 0)
    return seconds, [list(r.generated_tokens) for r in by_index]


def bench_engine(model_path: str, tokenizer, inputs: list[list[int]], tokens: int, engine_args: dict, repeats: int) -> tuple[float, list[list[int]]]:
    from deployments.engines.engine import GenerationRequest, SamplingParams
    from deployments.engines.transformers_engine import TransformersEngine

    async def main():
        engine = TransformersEngine(model_path, engine_args, tokenizer=tokenizer)
        await engine.start()
        outputs: list[list[int]] = []

        async def one(ids: list[int]) -> list[int]:
            request = GenerationRequest(uuid.uuid4().hex, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), prompt_token_ids=ids)
            got: list[int] = []
            async for delta in engine.generate(request):
                got += delta.token_ids
            return got

        async def run():
            outputs[:] = await asyncio.gather(*(one(ids) for ids in inputs))

        try:
            await run()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                await run()
                times.append(time.perf_counter() - start)
            return min(times), outputs
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="engine_args.max_batch_tokens (default: the engine's)")
    parser.add_argument("--block-size", type=int, default=None, help="engine_args.block_size (default: the engine's)")
    parser.add_argument("--modes", nargs="+", default=["static", "cb", "engine"], choices=["static", "cb", "engine"])
    parser.add_argument("--one-mode", choices=["static", "cb", "engine"], help=argparse.SUPPRESS)  # in a child process
    args = parser.parse_args()
    if args.one_mode is None:
        return run_modes(args)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments.engines.transformers_config import resolve_engine_args
    from deployments.models.builtin import resolve_model_source

    torch.set_num_threads(args.threads)
    model_path = str(resolve_model_source("builtin:tiny-chat"))
    engine_args = {"num_threads": args.threads}
    if args.max_batch_tokens:
        engine_args["max_batch_tokens"] = args.max_batch_tokens
    if args.block_size:
        engine_args["block_size"] = args.block_size
    resolved = resolve_engine_args(model_path, engine_args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    inputs = prompts(tokenizer, args.seqs)
    total = args.seqs * args.tokens

    mode = args.one_mode
    if mode == "static":
        seconds, outputs = bench_static(model, tokenizer, inputs, args.tokens, args.repeats)
    elif mode == "cb":
        seconds, outputs = bench_cb(model, inputs, args.tokens, resolved, args.repeats)
    else:
        seconds, outputs = bench_engine(model_path, tokenizer, inputs, args.tokens, engine_args, args.repeats)
    print(json.dumps({"seconds": seconds, "tokens_per_s": total / seconds, "outputs": outputs, "engine_args": resolved}))


def run_modes(args) -> None:
    """Each mode in a child process of its own; then the table, the ratios and the JSON."""
    from transformers import AutoTokenizer

    from deployments.models.builtin import resolve_model_source

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_source("builtin:tiny-chat")))
    total = args.seqs * args.tokens
    results, outputs = {}, {}
    for mode in args.modes:
        child = [a for a in sys.argv[1:] if a != "--modes" and a not in args.modes]
        done = subprocess.run([sys.executable, __file__, *child, "--one-mode", mode], check=True, capture_output=True, text=True)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        outputs[mode] = got.pop("outputs")
        resolved = got.pop("engine_args")
        results[mode] = got
        print(f"{mode:>7}: {got['tokens_per_s']:8.1f} tokens/s ({got['seconds']:.3f} s for {args.seqs} x {args.tokens} tokens)", flush=True)

    base = results.get("static")
    if base:
        for mode, r in results.items():
            r["ratio_to_static"] = r["tokens_per_s"] / base["tokens_per_s"]
        print("ratios to static: " + ", ".join(f"{m} {r['ratio_to_static']:.2f}x" for m, r in results.items()))
    # Greedy tokens should agree across modes up to each answer's EOS (static generation cannot
    # ignore EOS: min_new_tokens masks it, so its tokens differ after that point).
    if "static" in outputs:
        eos = set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))

        def answer(ids: list[int]) -> list[int]:
            return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]

        for mode in outputs:
            same = sum(answer(b) == a[: len(answer(b))] for a, b in zip(outputs["static"], outputs[mode]))
            results[mode]["sequences_equal_to_static"] = same
        print("sequences equal to static's: " + ", ".join(f"{m} {r['sequences_equal_to_static']}/{args.seqs}" for m, r in results.items()))
    out = write_results("cb_vs_static", {"config": {**vars(args), "engine_args": resolved}, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
