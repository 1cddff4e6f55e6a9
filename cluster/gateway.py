"""The HTTP ingress: an OpenAI-compatible gateway in front of the base-model deployments.

It parses and validates requests, checks API keys, routes by model name to that model's
deployment handle, and renders results as OpenAI objects or SSE streams.

(No `from __future__ import annotations` here: FastAPI must see the real `Request` class on the
ingress methods to inject it.)
"""

import asyncio
import hmac
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    ResponseRenderer,
    sse,
)
from deployments.engine import PromptTooLongError

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Tandem", description="OpenAI-compatible gateway of a Tandem cluster")


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _validation_error(e: ValidationError) -> OpenAIError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unrecognized_argument")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "field required"
    return OpenAIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _engine_error(e: BaseException, prompt_param: str) -> OpenAIError:
    """Map an exception raised by a replica (Ray wraps it, keeping the original class) to OpenAI."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, PromptTooLongError):
        return OpenAIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)):
        cause = getattr(e, "cause", None) or e
        return OpenAIError(400, str(cause), code="invalid_value")
    if isinstance(e, BackPressureError):
        return OpenAIError(503, "The model is overloaded; retry later.", type="server_error", code="overloaded")
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return OpenAIError(504, "The request timed out.", type="server_error", code="timeout")
    logger.exception("request failed", exc_info=e)
    return OpenAIError(500, f"Internal error while generating: {type(e).__name__}: {e}", type="server_error", code="internal_error")


class _Choice:
    """One generation stream (one prompt x one of n samples)."""

    def __init__(self, index: int, gen: DeploymentResponseGenerator):
        self.index = index
        self.gen = gen
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first: dict | None = None  # the first delta, received before the response starts

    async def deltas(self) -> AsyncIterator[dict]:
        if self.first is not None:
            yield self.first
        async for delta in self.gen:
            yield delta

    def take(self, delta: dict) -> str:
        self.text.append(delta["text"])
        self.prompt_tokens = delta["prompt_tokens"]
        self.completion_tokens = delta["completion_tokens"]
        self.finish_reason = delta["finish_reason"] or self.finish_reason
        return delta["text"]


def _usage_totals(choices: list[_Choice], n: int) -> tuple[int, int]:
    """Each prompt's tokens count once, however many (n) choices it has, as OpenAI counts them."""
    return sum(c.prompt_tokens for c in choices[::n]), sum(c.completion_tokens for c in choices)


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    def __init__(self, models: dict[str, DeploymentHandle], api_keys_env: str | None = None, request_timeout_s: float = 600.0):
        self.models = models
        self.created = int(time.time())
        self.request_timeout_s = request_timeout_s
        # Keys are read from the replica's environment, so they never appear in the config file.
        keys = os.environ.get(api_keys_env, "") if api_keys_env else ""
        self.api_keys = [k.strip() for k in keys.split(",") if k.strip()]
        if api_keys_env and not self.api_keys:
            logger.warning("gateway.api_keys_env=%s is set but the variable is empty: requests are not authenticated", api_keys_env)

    # -- plumbing --------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not any(hmac.compare_digest(token.strip(), k) for k in self.api_keys):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _parse(self, request: Request, model_cls):
        self._authorize(request)
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any undecodable body is the client's error
            raise OpenAIError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body must be a JSON object.")
        try:
            return model_cls.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None

    def _handle(self, model: str) -> DeploymentHandle:
        if model not in self.models:
            raise OpenAIError(
                404,
                f"The model '{model}' does not exist. Available models: {', '.join(sorted(self.models))}.",
                param="model",
                code="model_not_found",
            )
        return self.models[model]

    async def _start(self, handle: DeploymentHandle, jobs: list[dict[str, Any]], prompt_param: str) -> list[_Choice]:
        """Start every choice's stream and wait for its first delta, so that a bad request fails
        here with a proper status before any response bytes are sent."""
        stream = handle.options(stream=True)
        choices = [_Choice(i, stream.stream.remote(**job)) for i, job in enumerate(jobs)]
        try:
            firsts = await asyncio.wait_for(
                asyncio.gather(*(c.gen.__anext__() for c in choices)), timeout=self.request_timeout_s
            )
        except BaseException as e:
            for c in choices:
                c.gen.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _engine_error(e, prompt_param) from None
        for c, first in zip(choices, firsts):
            c.first = first
        return choices

    async def _collect(self, choices: list[_Choice], prompt_param: str) -> None:
        async def drain(c: _Choice):
            async for delta in c.deltas():
                c.take(delta)

        try:
            await asyncio.wait_for(asyncio.gather(*(drain(c) for c in choices)), timeout=self.request_timeout_s)
        except BaseException as e:
            for c in choices:
                c.gen.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _engine_error(e, prompt_param) from None

    async def _sse(self, renderer: ResponseRenderer, choices: list[_Choice], include_usage: bool, n: int, prompt_param: str) -> AsyncIterator[str]:
        """Merge the choices' streams into one SSE stream."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice):
            try:
                async for delta in c.deltas():
                    await queue.put((c, delta, None))
            except Exception as e:  # noqa: BLE001 - reported in-stream below
                await queue.put((c, None, e))
            finally:
                await queue.put((c, None, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            if renderer.kind == "chat":
                for c in choices:
                    yield sse(renderer.chunk(c.index, text="", role=True))
            open_streams = len(choices)
            while open_streams:
                c, delta, error = await queue.get()
                if error is not None:
                    yield sse(_engine_error(error, prompt_param).body())
                    continue
                if delta is None:
                    open_streams -= 1
                    continue
                text = c.take(delta)
                if text or delta["finish_reason"]:
                    if text:
                        yield sse(renderer.chunk(c.index, text=text))
                    if delta["finish_reason"]:
                        yield sse(renderer.chunk(c.index, text=None if renderer.kind == "chat" else "", finish=delta["finish_reason"]))
            if include_usage:
                yield sse(renderer.usage_chunk(*_usage_totals(choices, n)))
            yield SSE_DONE
        finally:
            # The client may have gone away: stop generating for it.
            for t in tasks:
                t.cancel()
            for c in choices:
                c.gen.cancel()

    async def _respond(self, kind: str, req, jobs: list[dict], prompt_param: str, echo_texts: list[str] | None = None):
        handle = self._handle(req.model)
        renderer = ResponseRenderer(kind, req.model)
        choices = await self._start(handle, jobs, prompt_param)
        if echo_texts:
            for c in choices:
                c.text.insert(0, echo_texts[c.index // req.n])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if echo_texts:
                # Echoed prompts go out first, as their own chunks.
                async def with_echo():
                    for c in choices:
                        yield sse(renderer.chunk(c.index, text=c.text[0]))
                    async for s in self._sse(renderer, choices, include_usage, req.n, prompt_param):
                        yield s

                body = with_echo()
            else:
                body = self._sse(renderer, choices, include_usage, req.n, prompt_param)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await self._collect(choices, prompt_param)
        result = renderer.full(
            [{"text": "".join(c.text), "finish_reason": c.finish_reason} for c in choices],
            *_usage_totals(choices, req.n),
        )
        return JSONResponse(result)

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        async def probe(name: str, handle: DeploymentHandle):
            try:
                await asyncio.wait_for(handle.stats.remote(), timeout=5)
                return name, "ok"
            except Exception as e:  # noqa: BLE001 - any failure means unhealthy
                return name, f"unavailable: {type(e).__name__}"

        results = dict(await asyncio.gather(*(probe(n, h) for n, h in self.models.items())))
        healthy = all(v == "ok" for v in results.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", "models": results}, status_code=200 if healthy else 503)

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request)
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "tandem"} for name in sorted(self.models)]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        self._handle(req.model)
        messages = req.chat_messages()
        jobs = [{"messages": messages, **req.sampling(i)} for i in range(req.n)]
        return await self._respond("chat", req, jobs, "messages")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        self._handle(req.model)
        prompts = req.prompts()
        jobs = [{**p, **req.sampling(i)} for p in prompts for i in range(req.n)]
        echo = None
        if req.echo:
            if any("prompt" not in p for p in prompts):
                raise OpenAIError(400, "echo is only supported with text prompts", param="echo")
            echo = [p["prompt"] for p in prompts]
        return await self._respond("completion", req, jobs, "prompt", echo)
