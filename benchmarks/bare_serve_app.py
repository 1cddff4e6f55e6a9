"""The reference for `benchmarks/path_cost.py`: a bare Ray Serve streaming app of Tandem's shape.

What a user would write by hand following Ray Serve's docs (FastAPI ingress, a model deployment,
streaming over a `DeploymentHandle` with `stream=True`, `StreamingResponse`), with no model: the
same path as Tandem's (HTTP proxy -> FastAPI ingress deployment -> replica deployment -> back), and
nothing else: no validation beyond reading the JSON, no pools, tenants, metrics or error mapping.

- `TokenStreamer` (the replica) yields the null engine's token cycle (`null_engine.cycle_ids`: the
  same ids of the tiny model's tokenizer) as text pieces, one item per token, `await
  asyncio.sleep(delay_s)` between tokens (as the null engine). Each id's text is decoded once, at
  start: no incremental detokenizer (Tandem's engines run `DeltaMapper` for each step, so that
  cost is part of Tandem's path here).
- `BareIngress` serves `POST /v1/chat/completions`: `stream: true` gives OpenAI-shaped SSE chunks
  (`data: {...chat.completion.chunk...}`, one per item received, a finish chunk, a usage chunk with
  `stream_options.include_usage`, `data: [DONE]`); otherwise one `chat.completion` object.

`build_bare_app(replica_cpus, ingress_cpus, ...)` returns the bound application.
"""

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

app = FastAPI()


@serve.deployment
class TokenStreamer:
    def __init__(self, delay_s: float = 0.0):
        from transformers import AutoTokenizer

        from benchmarks.null_engine import SOURCE, cycle_ids
        from deployments.models.builtin import resolve_model_source

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_source(SOURCE)))
        self.pieces = [tokenizer.decode([i]) for i in cycle_ids(tokenizer)]
        self.delay_s = delay_s

    async def stream(self, max_tokens: int):
        for i in range(max_tokens):
            await asyncio.sleep(self.delay_s)
            yield self.pieces[i % len(self.pieces)]


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    body = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


@serve.deployment
@serve.ingress(app)
class BareIngress:
    def __init__(self, streamer: DeploymentHandle):
        self.streamer = streamer

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = await request.json()
        model, max_tokens = body.get("model", "bare"), body.get("max_tokens") or 16
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        tokens = self.streamer.options(stream=True).stream.remote(max_tokens)

        if not body.get("stream"):
            text = "".join([t async for t in tokens])
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": max_tokens, "total_tokens": max_tokens},
            })

        async def events():
            yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
            n = 0
            async for text in tokens:
                n += 1
                yield _chunk(cid, created, model, {"content": text})
            yield _chunk(cid, created, model, {}, finish="length")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
                yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_bare_app(replica_cpus: float, ingress_cpus: float, delay_s: float = 0.0, max_ongoing_requests: int = 256,
                   ingress_max_ongoing_requests: int = 1024):
    """The app with the given per-replica CPUs and concurrency bounds (path_cost.py gives the same
    ones as Tandem's replica and gateway)."""
    streamer = TokenStreamer.options(
        ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=max_ongoing_requests
    ).bind(delay_s)
    return BareIngress.options(
        ray_actor_options={"num_cpus": ingress_cpus}, max_ongoing_requests=ingress_max_ongoing_requests
    ).bind(streamer)
