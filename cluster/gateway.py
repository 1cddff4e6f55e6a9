"""The HTTP ingress: an OpenAI-compatible gateway in front of the base-model deployments.

It parses and validates requests, checks API keys, routes by model name to that model's
deployment handle, and renders results as OpenAI objects or SSE streams.

(No `from __future__ import annotations` here: FastAPI must see the real `Request` class on the
ingress methods to inject it.)
"""

import asyncio
import dataclasses
import hmac
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster import sglang_protocol
from cluster.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    ResponseRenderer,
    sse,
)
from cluster.config import AGENT_MODEL_PREFIX
from cluster.http_metrics import HTTPMetricsMiddleware
from deployments.agents.errors import AgentLimitError, AgentProgramError
from deployments.pools import NoPoolAvailable, Pool, PoolBalancer
from deployments.replica import in_replica
from deployments.engines.engine import PromptTooLongError

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Tandem", description="OpenAI-compatible gateway of a Tandem cluster")


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


# Prometheus counters of HTTP requests and errors by route and status (deployments/metrics.py).
app.add_middleware(HTTPMetricsMiddleware)


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
    if isinstance(e, NoPoolAvailable):
        return OpenAIError(503, str(e), type="server_error", code="no_replica_available")
    if _replica_lost(e):
        return OpenAIError(
            503, "The replica serving this request was lost (its node may have gone down); retry the request.",
            type="server_error", code="replica_unavailable",
        )
    if isinstance(e, BackPressureError):
        return OpenAIError(503, "The model is overloaded; retry later.", type="server_error", code="overloaded")
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return OpenAIError(504, "The request timed out.", type="server_error", code="timeout")
    logger.exception("request failed", exc_info=e)
    return OpenAIError(500, f"Internal error while generating: {type(e).__name__}: {e}", type="server_error", code="internal_error")


def _replica_lost(e: BaseException) -> bool:
    """A failure of the replica (or its node), not of the request: worth trying another pool."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError))


class _PoolFailed(Exception):
    def __init__(self, error: BaseException):
        self.error = error


class _Lease:
    """Counts a request's streams as in flight to a pool until released (once)."""

    def __init__(self, pool: Pool, n: int):
        self.pool, self.n = pool, n
        pool.in_flight += n

    def release(self) -> None:
        if self.n:
            self.pool.in_flight -= self.n
            self.pool.served += self.n
            self.n = 0


class _Choice:
    """One generation stream (one prompt x one of n samples)."""

    def __init__(self, index: int, gen: DeploymentResponseGenerator):
        self.index = index
        self.gen = gen
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stop_reason = None
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
        self.stop_reason = delta["stop_reason"] if delta["finish_reason"] else self.stop_reason
        return delta["text"]


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _guarded(events: AsyncIterator[str], to_error, cleanup) -> AsyncIterator[str]:
    """An SSE body: the events, then [DONE]; a failure mid-stream is sent as an error event (the
    status line is long gone), and `cleanup` (cancelling the upstream call) runs however it ends."""
    try:
        async for event in events:
            yield event
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - reported in-stream
        yield sse(to_error(e).body())
    finally:
        cleanup()


async def _released(events: AsyncIterator[str], lease: "_Lease") -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        lease.release()


def _child_call(method, *args, **kwargs):
    """`method.remote(...)` under a fresh Serve internal request id. Every call the gateway makes to
    a deployment goes through here.

    Calls made while serving a request inherit that request's internal id, and Ray Serve 2.60's
    request router indexes its queued requests by that id: two concurrent calls of one HTTP request
    (n > 1, a batch) queued at the same router collide and one never gets a replica. The gateway
    cancels its child calls itself, so nothing relies on the inherited id.
    """
    from ray.serve import context

    current = context._get_serve_request_context()
    token = context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        return method.remote(*args, **kwargs)
    finally:
        context._serve_request_context.reset(token)


def _agent_error(e: BaseException, name: str) -> OpenAIError:
    """Bad arguments are the client's error (400); a failing or runaway program is the server's."""
    if isinstance(e, AgentLimitError):
        return OpenAIError(504 if e.limit == "timeout_s" else 500, str(e), type="server_error", code=f"agent_limit_{e.limit}")
    if isinstance(e, AgentProgramError):
        return OpenAIError(500, str(e), type="server_error", code="agent_program_error")
    return _engine_error(e, "arguments")


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any undecodable body is the client's error
        raise OpenAIError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    return body


def _usage_totals(choices: list[_Choice], n: int) -> tuple[int, int]:
    """Each prompt's tokens count once, however many (n) choices it has, as OpenAI counts them."""
    return sum(c.prompt_tokens for c in choices[::n]), sum(c.completion_tokens for c in choices)


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    def __init__(
        self,
        models: dict[str, list[dict[str, Any]]],
        agents: dict[str, DeploymentHandle] | None = None,
        api_keys_env: str | None = None,
        request_timeout_s: float = 600.0,
        sglang_model: str | None = None,
    ):
        # model name -> its pools (cluster.app.pool_info plus "handle"), balanced by `self.pools`.
        app_name = serve.get_replica_context().app_name if in_replica() else None
        self.pools = PoolBalancer.from_bound(models, app_name)
        self.models = self.pools.models()
        self.agents = agents or {}
        self.created = int(time.time())
        self.request_timeout_s = request_timeout_s
        # The model behind SGLang's native API (an SGLang server serves exactly one).
        self.sglang_model = sglang_model or next(iter(models))
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
        body = await _json_object(request)
        try:
            return model_cls.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None

    def _check_model(self, model: str) -> None:
        if model not in self.models:
            raise OpenAIError(
                404,
                f"The model '{model}' does not exist. Available models: {', '.join(sorted(self.models))}.",
                param="model",
                code="model_not_found",
            )

    def _pool(self, model: str, exclude: tuple[Pool, ...] = ()) -> Pool:
        self._check_model(model)
        try:
            return self.pools.pick(model, exclude)
        except NoPoolAvailable as e:
            raise OpenAIError(503, str(e), type="server_error", code="no_replica_available") from None

    def _handle(self, model: str) -> DeploymentHandle:
        return self._pool(model).handle

    async def _start(
        self, model: str, jobs: list[dict[str, Any]], prompt_param: str, collect: bool = False
    ) -> tuple[list[_Choice], _Lease]:
        """Start every choice's stream on one of the model's pools and wait for its first delta, so
        that a bad request fails here with a proper status before any response bytes are sent.
        With `collect` (a response sent whole), also wait for the last delta.
        When the pool's replica is lost before the response starts (its first delta, or with
        `collect` its last), the next pool takes the whole request."""
        await self.pools.ensure_counts()  # the first request: know which pools are cold before picking
        tried: tuple[Pool, ...] = ()
        while True:
            pool = self._pool(model, tried)
            tried += (pool,)
            try:
                choices, lease = await self._start_on(pool, jobs, prompt_param)
                if collect:
                    try:
                        await self._collect(choices, prompt_param)
                    finally:
                        lease.release()
                return choices, lease
            except _PoolFailed as failed:
                if len(tried) >= len(self.pools.pools[model]):
                    raise _engine_error(failed.error, prompt_param) from None
                logger.warning("pool %s of %s failed (%s); trying the next pool", pool.name, model, failed.error)

    async def _start_on(self, pool: Pool, jobs: list[dict[str, Any]], prompt_param: str) -> tuple[list[_Choice], _Lease]:
        cold = self.pools.cold(pool)
        timeout = min(pool.info["cold_start_timeout_s"], self.request_timeout_s) if cold else self.request_timeout_s
        lease = _Lease(pool, len(jobs))
        stream = pool.handle.options(stream=True)
        choices = [_Choice(i, _child_call(stream.stream, **job)) for i, job in enumerate(jobs)]
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(c.gen.__anext__() for c in choices)), timeout=timeout)
        except BaseException as e:
            lease.release()
            for c in choices:
                c.gen.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            if cold and isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                raise OpenAIError(
                    503,
                    f"The model '{pool.info['model']}' (pool {pool.name}) is scaling up from zero replicas and none "
                    f"was ready within {timeout:g} s; retry later.",
                    type="server_error",
                    code="model_cold_start_timeout",
                ) from None
            if _replica_lost(e):
                raise _PoolFailed(e) from None
            raise _engine_error(e, prompt_param) from None
        for c, first in zip(choices, firsts):
            c.first = first
        return choices, lease

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
            if _replica_lost(e):
                raise _PoolFailed(e) from None
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
        renderer = ResponseRenderer(kind, req.model)
        choices, lease = await self._start(req.model, jobs, prompt_param, collect=not req.stream)
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
            return _sse_response(_released(body, lease))
        result = renderer.full(
            [{"text": "".join(c.text), "finish_reason": c.finish_reason} for c in choices],
            *_usage_totals(choices, req.n),
        )
        return JSONResponse(result)

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """Each model is "ok" when one of its pools answers; "degraded" overall when a model has none."""

        async def probe(pool: Pool) -> str:
            if pool.running == 0:
                return "no running replica" + (" (scales from zero)" if pool.scales_from_zero() else "")
            try:
                await asyncio.wait_for(_child_call(pool.handle.stats), timeout=5)
                return "ok"
            except Exception as e:  # noqa: BLE001 - any failure means unhealthy
                return f"unavailable: {type(e).__name__}"

        results, healthy = {}, True
        for model, pools in self.pools.pools.items():
            states = await asyncio.gather(*(probe(p) for p in pools))
            ok = any(st == "ok" or (p.running == 0 and p.scales_from_zero()) for p, st in zip(pools, states))
            healthy &= ok
            results[model] = states[0] if len(pools) == 1 else ("ok" if ok else "unavailable")
            if len(pools) > 1:
                results[model] = {"status": results[model], "pools": {p.name: st for p, st in zip(pools, states)}}
        return JSONResponse({"status": "ok" if healthy else "degraded", "models": results}, status_code=200 if healthy else 503)

    @app.get("/v1/pools")
    async def list_pools(self, request: Request):
        """Per model, each pool's engine, accelerator, replicas (running / starting / bounds), this
        gateway's requests in flight and served, and Serve's status message (e.g. why a replica
        cannot be scheduled)."""
        self._authorize(request)
        if self.pools.app_name is not None:
            await self.pools.refresh()
        return {"object": "list", "data": [{"model": m, "pools": pools} for m, pools in self.pools.state().items()]}

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request)
        ids = sorted(self.models) + [AGENT_MODEL_PREFIX + a for a in sorted(self.agents)]
        data = [{"id": i, "object": "model", "created": self.created, "owned_by": "tandem"} for i in ids]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        if req.model.startswith(AGENT_MODEL_PREFIX):
            return await self._agent_chat(req)
        self._check_model(req.model)
        messages = req.chat_messages()
        jobs = [{"messages": messages, **req.sampling(i)} for i in range(req.n)]
        return await self._respond("chat", req, jobs, "messages")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        self._check_model(req.model)
        prompts = req.prompts()
        jobs = [{**p, **req.sampling(i)} for p in prompts for i in range(req.n)]
        echo = None
        if req.echo:
            if any("prompt" not in p for p in prompts):
                raise OpenAIError(400, "echo is only supported with text prompts", param="echo")
            echo = [p["prompt"] for p in prompts]
        return await self._respond("completion", req, jobs, "prompt", echo)

    # -- SGLang's native API (for sgl.RuntimeEndpoint) ------------------------------------------

    @app.get("/get_model_info")
    async def sglang_model_info(self, request: Request):
        self._authorize(request)
        info = await _child_call(self._handle(self.sglang_model).model_info)
        return {
            "model_path": info["source"],
            "tokenizer_path": info["source"],
            "is_generation": True,
            "served_model_name": self.sglang_model,
            "max_context_length": info["max_model_len"],
        }

    @app.get("/server_info")
    async def sglang_server_info(self, request: Request):
        self._authorize(request)
        handle = self._handle(self.sglang_model)
        info, stats = await asyncio.gather(_child_call(handle.model_info), _child_call(handle.stats))
        return {
            "model_path": info["source"],
            "served_model_name": self.sglang_model,
            "engine": info["engine"],
            "context_length": info["max_model_len"],
            "internal_states": [stats],
        }

    @app.post("/flush_cache")
    async def sglang_flush_cache(self, request: Request):
        self._authorize(request)
        freed = await _child_call(self._handle(self.sglang_model).flush_cache)
        return JSONResponse({"message": "Cache flushed.", "replica": freed["replica"], "freed_blocks": freed["freed_blocks"]})

    @app.post("/generate")
    async def sglang_generate(self, request: Request):
        req: sglang_protocol.GenerateRequest = await self._parse(request, sglang_protocol.GenerateRequest)
        req.check_supported()
        handle = self._handle(self.sglang_model)
        prompts = req.prompts()
        rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(prompts)
        rids = [r or uuid.uuid4().hex for r in rids]
        if req.sampling_params.max_new_tokens == 0:
            # Prefill only: token counts, and prompt log-probs when asked (SGLang's `select`).
            start = req.logprob_start_len if req.return_logprob else -1
            try:
                infos = await asyncio.gather(*(_child_call(handle.prompt_logprobs, **p, start=start) for p in prompts))
            except Exception as e:  # noqa: BLE001 - mapped to an HTTP error
                raise _engine_error(e, "text") from None
            results = []
            for rid, info in zip(rids, infos):
                extra = {"input_token_logprobs": info["input_token_logprobs"], "output_token_logprobs": []} if req.return_logprob else {}
                results.append({"text": "", "meta_info": sglang_protocol.meta_info(rid, info["prompt_tokens"], 0, {"type": "length", "length": 0}, **extra)})
            return results if req.is_batch else results[0]

        sampling = req.sampling_params.to_tandem()
        choices, lease = await self._start(self.sglang_model, [{**p, **sampling} for p in prompts], "text", collect=not req.stream)

        def result(c: _Choice, rid: str) -> dict:
            finish = sglang_protocol.finish_reason(c.finish_reason, c.stop_reason, c.completion_tokens)
            return {"text": "".join(c.text), "meta_info": sglang_protocol.meta_info(rid, c.prompt_tokens, c.completion_tokens, finish)}

        if req.stream:
            async def events():
                c = choices[0]
                async for delta in c.deltas():
                    c.take(delta)
                    # SGLang streams the cumulative text with each event.
                    yield sse(result(c, rids[0]))

            def cleanup():
                choices[0].gen.cancel()
                lease.release()

            return _sse_response(_guarded(events(), lambda e: _engine_error(e, "text"), cleanup))
        results = [result(c, rid) for c, rid in zip(choices, rids)]
        return results if req.is_batch else results[0]

    # -- agents: registered SGLang programs ------------------------------------------------------

    def _agent(self, name: str) -> DeploymentHandle:
        if name not in self.agents:
            known = ", ".join(sorted(self.agents)) or "none"
            raise OpenAIError(404, f"The agent '{name}' does not exist. Available agents: {known}.", param="agent", code="agent_not_found")
        return self.agents[name]

    async def _agent_run(self, name: str, arguments: dict) -> dict:
        try:
            return await asyncio.wait_for(_child_call(self._agent(name).run, arguments), timeout=self.request_timeout_s)
        except Exception as e:  # noqa: BLE001 - mapped to an HTTP error
            raise _agent_error(e, name) from None

    async def _agent_events(self, name: str, arguments: dict) -> tuple[dict, DeploymentResponseGenerator]:
        """Start a streamed program run; its first event arrives before the response starts, so
        bad arguments still get a 400."""
        gen = _child_call(self._agent(name).options(stream=True).run_stream, arguments)
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.request_timeout_s)
        except BaseException as e:
            gen.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _agent_error(e, name) from None
        return first, gen

    @app.get("/v1/agents")
    async def list_agents(self, request: Request):
        self._authorize(request)
        infos = await asyncio.gather(*(_child_call(h.describe) for h in self.agents.values()))
        return {"object": "list", "data": [{"object": "agent", **info} for info in infos]}

    @app.post("/v1/agents/{name}")
    async def run_agent(self, name: str, request: Request):
        self._authorize(request)
        self._agent(name)
        arguments = await _json_object(request)
        stream = arguments.pop("stream", False)
        if not isinstance(stream, bool):
            raise OpenAIError(400, "stream must be true or false", param="stream")
        if not stream:
            return {"object": "agent.run", "agent": name, **await self._agent_run(name, arguments)}

        first, gen = await self._agent_events(name, arguments)

        async def events():
            yield sse(first)
            async for event in gen:
                yield sse(event)

        return _sse_response(_guarded(events(), lambda e: _agent_error(e, name), gen.cancel))

    async def _agent_chat(self, req: ChatCompletionRequest):
        """`model: "agent:<name>"`: the program runs on the conversation's last user message
        (its `question`) and answers with its `answer`; all variables go in the `agent` field."""
        name = req.model.removeprefix(AGENT_MODEL_PREFIX)
        self._agent(name)
        users = [m for m in req.chat_messages() if m["role"] == "user"]
        if not users:
            raise OpenAIError(400, "an agent conversation needs at least one user message", param="messages")
        arguments = {"question": users[-1]["content"]}
        renderer = ResponseRenderer("chat", req.model)
        if not req.stream:
            result = await self._agent_run(name, arguments)
            body = renderer.full([{"text": str(result["answer"]), "finish_reason": "stop"}], 0, 0)
            body.pop("usage")
            return JSONResponse({**body, "agent": {"name": name, **{k: v for k, v in result.items() if k != "answer"}}})

        first, gen = await self._agent_events(name, arguments)

        async def chunks():
            streamed = ""
            yield sse(renderer.chunk(0, text="", role=True))
            event = first
            while True:
                if event.get("variable") == "answer" and event.get("delta"):
                    streamed += event["delta"]
                    yield sse(renderer.chunk(0, text=event["delta"]))
                if event.get("done"):
                    answer = str(event["answer"])
                    if answer.startswith(streamed) and len(answer) > len(streamed):
                        yield sse(renderer.chunk(0, text=answer[len(streamed):]))
                    final = renderer.chunk(0, finish="stop")
                    final["agent"] = {"name": name, **{k: v for k, v in event.items() if k not in ("done", "answer")}}
                    yield sse(final)
                    return
                event = await gen.__anext__()

        return _sse_response(_guarded(chunks(), lambda e: _agent_error(e, name), gen.cancel))
