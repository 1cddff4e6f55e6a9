"""The HTTP ingress: an OpenAI-compatible gateway in front of the base-model deployments.

It parses and validates requests, checks API keys, hands each to the model's pools by model name
(`cluster.dispatch.PoolDispatcher`: pool choice, failover, cold starts), and renders the results
as OpenAI objects or SSE streams.

(No `from __future__ import annotations` here: FastAPI must see the real `Request` class on the
ingress methods to inject it.)
"""

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster import sglang_protocol
from cluster.chat_output import OutputPlan, collect_output, event_chunks, finish_with_calls, forced_call_constraint
from cluster.cluster_state import ClusterView
from cluster.dispatch import Choice, Generation, PoolDispatcher, child_call, engine_error
from cluster.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    ResponseRenderer,
    TokenizeRequest,
    sse,
)
from cluster.config import AGENT_MODEL_PREFIX
from cluster.parsers import detect_tool_call_parser, get_reasoning_parser
from cluster.http_limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from cluster.http_metrics import HTTPMetricsMiddleware
from cluster.tenants import Tenant, TenantGate, Ticket
from cluster.openapi import install_openapi
from deployments.agents.errors import AgentArgumentError, AgentLimitError, AgentProgramError
from deployments.pools import Pool
from deployments.replica import cancel_call, in_replica

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Tandem", description="OpenAI-compatible gateway of a Tandem cluster")
install_openapi(app)

# The web console: static files, no build step; every URL in them is relative to the page.
CONSOLE_DIR = Path(__file__).resolve().parent / "console"
CONSOLE_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_NO_CACHE = {"Cache-Control": "no-cache"}


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


# Outermost last: metrics see every answer, the concurrency bound refuses before a body is read.
app.add_middleware(BodyLimitMiddleware)
app.add_middleware(ConcurrencyLimitMiddleware)
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


def _sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})


# Response header naming the replica(s) that served a completion: where routing sent it.
REPLICA_HEADER = "x-tandem-replica"


def _replica_headers(generation: Generation) -> dict[str, str]:
    replicas = [c.first.get("replica") for c in generation.choices if c.first]
    replicas = list(dict.fromkeys(r for r in replicas if r))
    return {REPLICA_HEADER: ",".join(replicas)} if replicas else {}


def session_id_of(request: Request, user: str | None) -> str | None:
    """The Serve session id a request's generation carries (models with `routing: session` keep one
    session on one replica): the x-session-id header, as Ray Serve LLM's ingress reads it, else the
    OpenAI `user` field."""
    return request.headers.get("x-session-id") or user or None


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


async def _closing(events: AsyncIterator[str], generation: Generation, ticket: Ticket, n: int) -> AsyncIterator[str]:
    ok = False
    try:
        async for event in events:
            yield event
        ok = True
    finally:
        generation.close()
        ticket.done(*_usage_totals(generation.choices, n), ok=ok)


def _agent_error(e: BaseException) -> OpenAIError:
    """Bad arguments are the client's error (400); a failing or runaway program is the server's.
    Messages are rebuilt from the errors' fields: `str()` of an error raised in a replica is Ray's
    traceback of it (actor names, paths, terminal colours), which is no body for a client."""
    if isinstance(e, AgentLimitError):
        message = str(AgentLimitError(e.limit, e.value, e.detail))
        return OpenAIError(504 if e.limit == "timeout_s" else 500, message, type="server_error", code=f"agent_limit_{e.limit}")
    if isinstance(e, AgentArgumentError):
        return OpenAIError(400, e.message, param=e.argument, code="invalid_agent_argument")
    if isinstance(e, AgentProgramError):
        message = str(AgentProgramError(e.program, e.message, e.error_type))
        return OpenAIError(500, message, type="server_error", code="agent_program_error")
    return engine_error(e, "arguments")


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any undecodable body is the client's error
        raise OpenAIError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    return body


def _usage_totals(choices: list[Choice], n: int) -> tuple[int, int]:
    """Each prompt's tokens count once, however many (n) choices it has, as OpenAI counts them."""
    return sum(c.prompt_tokens for c in choices[::n]), sum(c.completion_tokens for c in choices)


async def _sse_choices(renderer: ResponseRenderer, choices: list[Choice], include_usage: bool, n: int, prompt_param: str,
                       plan: OutputPlan | None = None) -> AsyncIterator[str]:
    """Merge the choices' streams into one SSE stream; with an active `plan`, each choice's text is
    split into reasoning, content and tool calls as it streams."""
    queue: asyncio.Queue = asyncio.Queue()
    parsers = {c.index: plan.new_parser() for c in choices} if plan is not None and plan.active else {}

    async def pump(c: Choice):
        try:
            async for delta in c.deltas():
                await queue.put((c, delta, None))
        except Exception as e:  # noqa: BLE001 - reported in-stream below
            await queue.put((c, None, e))
        finally:
            await queue.put((c, None, None))

    async def one(c: Choice):
        # One stream (n = 1, the common case) needs no merging: no task, no queue hop per chunk.
        try:
            async for delta in c.deltas():
                yield c, delta, None
        except Exception as e:  # noqa: BLE001 - reported in-stream below
            yield c, None, e

    async def merged():
        open_streams = len(choices)
        while open_streams:
            c, delta, error = await queue.get()
            if delta is None and error is None:
                open_streams -= 1
                continue
            yield c, delta, error

    tasks = [asyncio.create_task(pump(c)) for c in choices] if len(choices) > 1 else []
    events = merged() if tasks else one(choices[0])
    try:
        if renderer.kind == "chat":
            for c in choices:
                yield sse(renderer.chunk(c.index, text="", role=True))
        async for c, delta, error in events:
            if error is not None:
                yield sse(engine_error(error, prompt_param).body())
                continue
            text = c.take(delta)
            logprobs = delta.get("logprobs")
            finish = delta["finish_reason"]
            if parsers:
                parser = parsers[c.index]
                parsed = parser.feed(text, delta["token_ids"]) + (parser.finish() if finish else [])
                for chunk in event_chunks(renderer, c.index, parsed, logprobs):
                    yield sse(chunk)
                finish = finish and finish_with_calls(finish, plan, parser.calls)
            # Tokens whose text is held back (part of a character) still send their log-probs.
            elif text or logprobs:
                yield sse(renderer.chunk(c.index, text=text, logprobs=logprobs, text_offset=c.chars))
            if finish:
                yield sse(renderer.chunk(c.index, text=None if renderer.kind == "chat" else "", finish=finish))
        if include_usage:
            reasoning = sum(p.reasoning_tokens for p in parsers.values()) if plan is not None and plan.reasoning_parser else None
            yield sse(renderer.usage_chunk(*_usage_totals(choices, n), reasoning))
        yield SSE_DONE
    finally:
        # The client may have gone away: stop generating for it.
        await events.aclose()
        for t in tasks:
            t.cancel()
        for c in choices:
            cancel_call(c.gen)


def _whole_choice(c: Choice, plan: OutputPlan | None) -> tuple[dict, int]:
    """A collected choice as `ResponseRenderer.full` takes it, split by `plan`; and its reasoning tokens."""
    out = {"text": "".join(c.text), "finish_reason": c.finish_reason, "logprobs": c.logprobs}
    if plan is None or not plan.active:
        return out, 0
    parser = plan.new_parser()
    events = [e for text, ids in zip(c.text, c.token_ids) for e in parser.feed(text, ids)] + parser.finish()
    content, reasoning, calls = collect_output(events)
    finish = finish_with_calls(c.finish_reason, plan, len(calls))
    return {**out, "text": content, "reasoning": reasoning, "tool_calls": calls, "finish_reason": finish}, parser.reasoning_tokens


def _render(renderer: ResponseRenderer, req, generation: Generation, prompt_param: str, ticket: Ticket,
            echo_texts: list[str] | None = None, plan: OutputPlan | None = None):
    """A completion's response: the whole answer (`generation` was collected) or an SSE stream."""
    choices = generation.choices
    if echo_texts:
        for c in choices:
            c.text.insert(0, echo_texts[c.index // req.n])
    if not req.stream:
        totals = _usage_totals(choices, req.n)
        ticket.done(*totals)
        whole = [_whole_choice(c, plan) for c in choices]
        reasoning = sum(tokens for _, tokens in whole) if plan is not None and plan.reasoning_parser else None
        return JSONResponse(renderer.full([out for out, _ in whole], *totals, reasoning), headers=_replica_headers(generation))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    body = _sse_choices(renderer, choices, include_usage, req.n, prompt_param, plan)
    if echo_texts:
        # Echoed prompts go out first, as their own chunks.
        async def with_echo(events: AsyncIterator[str]) -> AsyncIterator[str]:
            for c in choices:
                yield sse(renderer.chunk(c.index, text=c.text[0]))
            async for event in events:
                yield event

        body = with_echo(body)
    return _sse_response(_closing(body, generation, ticket, req.n), _replica_headers(generation))


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
        max_request_bytes: int | None = None,
        max_concurrent_requests: int | None = None,
        keys_file: str | None = None,
        limiter: DeploymentHandle | None = None,
        parsers: dict[str, dict[str, str | None]] | None = None,
    ):
        # Read by the middlewares (cluster/http_limits.py).
        app.state.max_request_bytes = max_request_bytes
        app.state.max_concurrent_requests = max_concurrent_requests
        # model name -> its pools (cluster.app.pool_info plus "handle"); requests go to one of them.
        app_name = serve.get_replica_context().app_name if in_replica() else None
        self.dispatcher = PoolDispatcher(models, app_name, request_timeout_s)
        self.agents = agents or {}
        self.created = int(time.time())
        # model -> its replicas' `model_info` (context length, chat template), asked once (see _model_info)
        self._model_infos: dict[str, dict] = {}
        # model -> {"tool_call_parser", "reasoning_parser"} from the config; `auto` is resolved from the
        # chat template, and the reasoning end tag's token ids are kept in _think_end_ids.
        self.parsers = parsers or {}
        self._think_end_ids: dict[str, tuple[int, ...]] = {}
        self.request_timeout_s = request_timeout_s
        # The model behind SGLang's native API (an SGLang server serves exactly one).
        self.sglang_model = sglang_model or next(iter(models))
        # Keys are read from the replica's environment and the keys file (hashes only), so they never
        # appear in the config file.
        keys = os.environ.get(api_keys_env, "") if api_keys_env else ""
        env_keys = [k.strip() for k in keys.split(",") if k.strip()]
        if api_keys_env and not env_keys and not keys_file:
            logger.warning("gateway.api_keys_env=%s is set but the variable is empty: requests are not authenticated", api_keys_env)
        self.gate = TenantGate(keys_file, env_keys, limiter)
        self.cluster_view = ClusterView(self.dispatcher.pools, self.agents, auth=self.gate.enabled)

    # -- plumbing --------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> Tenant | None:
        """The caller's tenant (None without auth); 401 without a known key."""
        return self.gate.authenticate(request.headers.get("authorization", ""))

    async def _parse(self, request: Request, model_cls) -> tuple[Tenant | None, Any]:
        tenant = self._authorize(request)
        body = await _json_object(request)
        try:
            return tenant, model_cls.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None

    def _check_model(self, tenant: Tenant | None, model: str) -> None:
        """404 for a model that does not exist, or that the tenant may not use (the same answer: a
        key does not learn what others may use)."""
        if model in self.dispatcher.models and not self.gate.allows(tenant, model):
            self.gate.refused(tenant)
        self.dispatcher.check_model(model, visible=lambda m: self.gate.allows(tenant, m))

    async def _start(self, tenant: Tenant | None, model: str, jobs: list[dict], prompt_param: str, stream: bool,
                     session_id: str | None = None) -> tuple[Ticket, Generation]:
        """Admit the tenant's request (429 over a limit), then start its generation on the model."""
        ticket = await self.gate.admit(tenant)
        try:
            return ticket, await self.dispatcher.start(model, jobs, prompt_param, collect=not stream, session_id=session_id)
        except BaseException:
            ticket.done(ok=False)
            raise

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """Each model is "ok" when one of its pools answers; "degraded" overall when a model has none."""

        async def probe(pool: Pool) -> str:
            if pool.has_no_running_replica():
                return "no running replica" + (" (scales from zero)" if pool.scales_from_zero() else "")
            try:
                await asyncio.wait_for(child_call(pool.handle.stats), timeout=5)
                return "ok"
            except Exception as e:  # noqa: BLE001 - any failure means unhealthy
                return f"unavailable: {type(e).__name__}"

        results, healthy = {}, True
        for model, pools in self.dispatcher.pools.pools.items():
            states = await asyncio.gather(*(probe(p) for p in pools))
            ok = any(st == "ok" or (p.has_no_running_replica() and p.scales_from_zero()) for p, st in zip(pools, states))
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
        tenant = self._authorize(request)
        balancer = self.dispatcher.pools
        if balancer.app_name is not None:
            await balancer.refresh()
        data = [{"model": m, "pools": pools} for m, pools in balancer.state().items() if self.gate.allows(tenant, m)]
        return {"object": "list", "data": data}

    @app.get("/v1/cluster")
    async def cluster_state(self, request: Request):
        """Everything the console shows: models and their pools with engine numbers, agents with
        their run counts, and the gateway's own view (cluster/cluster_state.py)."""
        tenant = self._authorize(request)
        view = await self.cluster_view.snapshot()
        if tenant is None:
            return view
        # What the key may use, only.
        models = [m for m in view["models"] if self.gate.allows(tenant, m["model"])]
        agents = [a for a in view["agents"] if tenant.may_use_agent(a["name"])]
        return {**view, "models": models, "agents": agents}

    # -- the web console (cluster/console/; the files need no key, the API calls they make do) ----

    @app.get("/", include_in_schema=False)
    async def console_root(self, request: Request):
        # Under a route prefix without its trailing slash ("/prefix"), the page's relative URLs
        # would resolve against the parent: send the browser to "/prefix/" first.
        if not request.url.path.endswith("/"):
            return RedirectResponse(request.url.path + "/", status_code=307)
        return await self.console_page()

    @app.get("/console", include_in_schema=False)
    async def console_page(self):
        return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)

    @app.get("/console/{asset}", include_in_schema=False)
    async def console_asset(self, asset: str):
        if asset not in CONSOLE_ASSETS:
            raise OpenAIError(404, f"No console file '{asset}'.", code="not_found")
        return FileResponse(CONSOLE_DIR / asset, media_type=CONSOLE_ASSETS[asset], headers=_NO_CACHE)

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        tenant = self._authorize(request)
        models = [m for m in sorted(self.dispatcher.models) if self.gate.allows(tenant, m)]
        agents = [AGENT_MODEL_PREFIX + a for a in sorted(self.agents) if self.gate.allows(tenant, AGENT_MODEL_PREFIX + a)]
        lengths = await self._context_lengths(models)
        data = [
            {"id": m, "object": "model", "created": self.created, "owned_by": "tandem", "max_model_len": lengths.get(m)}
            for m in models
        ]
        data += [{"id": a, "object": "model", "created": self.created, "owned_by": "tandem"} for a in agents]
        return {"object": "list", "data": data}

    async def _context_lengths(self, models: list[str]) -> dict[str, int]:
        """Each model's context length (vLLM's `max_model_len` in /v1/models), asked once of a running
        replica and kept: a model whose pools have none yet is not woken up by a listing (null)."""
        await self.dispatcher.pools.ensure_counts()
        missing = [
            m for m in models
            if m not in self._model_infos and any(not p.has_no_running_replica() for p in self.dispatcher.pools.pools[m])
        ]

        async def ask(model: str) -> None:
            try:
                await asyncio.wait_for(self._model_info(model), timeout=5)
            except Exception:  # noqa: BLE001 - a busy or restarting replica: null now, asked again next time
                logger.warning("no context length for model %s yet", model, exc_info=True)

        await asyncio.gather(*(ask(m) for m in missing))
        return {m: info["max_model_len"] for m, info in self._model_infos.items()}

    async def _model_info(self, model: str) -> dict:
        """A replica's `model_info` of the model (the same for all its replicas), asked once and kept."""
        if model not in self._model_infos:
            self._model_infos[model] = await child_call(self.dispatcher.handle(model).model_info)
        return self._model_infos[model]

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's and SGLang's tokenizer endpoint: {count, max_model_len, tokens[, token_strs]}."""
        tenant, req = await self._parse(request, TokenizeRequest)
        self._check_model(tenant, req.model)
        (out,) = await self.dispatcher.call_each(req.model, "tokenize", [req.job()], "messages" if req.messages else "prompt")
        return out

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """vLLM's and SGLang's: {prompt} (vLLM's name) and {text} (SGLang's), the same text."""
        tenant, req = await self._parse(request, DetokenizeRequest)
        self._check_model(tenant, req.model)
        (out,) = await self.dispatcher.call_each(req.model, "detokenize", [{"tokens": req.tokens}], "tokens")
        return out

    async def _output_plan(self, req: ChatCompletionRequest) -> OutputPlan:
        """How this request's answers are split (cluster/chat_output.py). tool_choice "auto" needs the
        model's tool-call parser: without one it is a 400, as vLLM answers it."""
        config = self.parsers.get(req.model, {})
        reasoning = config.get("reasoning_parser")
        choice = req.effective_tool_choice()
        tool_parser = None
        if choice != "none":
            tool_parser = await self._tool_call_parser(req.model, config.get("tool_call_parser"))
            if tool_parser is None and choice == "auto":
                raise OpenAIError(
                    400, f"The model '{req.model}' has no tool-call parser, so tool_choice 'auto' cannot find calls in its "
                    "text: set tool_call_parser for it in the config (its chat template names no known format), or "
                    "force a call with tool_choice 'required' or a named function.", param="tool_choice",
                )
        forced = choice if choice not in ("auto", "none") else None
        enable_thinking = (req.chat_template_kwargs or {}).get("enable_thinking", True) is not False
        return OutputPlan(
            tool_parser=tool_parser, forced=forced, reasoning_parser=reasoning, enable_thinking=enable_thinking,
            max_calls=1 if req.parallel_tool_calls is False else None,
            think_end_ids=await self._think_end_tokens(req.model, reasoning) if reasoning else (),
        )

    async def _tool_call_parser(self, model: str, configured: str | None) -> str | None:
        """The configured parser; for `auto`, the family the model's chat template names (asked once)."""
        if configured != "auto":
            return configured
        return detect_tool_call_parser((await self._model_info(model)).get("chat_template") or "")

    async def _think_end_tokens(self, model: str, reasoning_parser: str) -> tuple[int, ...]:
        """The token ids of the reasoning parser's end tag in this model's vocabulary (asked once)."""
        if model not in self._think_end_ids:
            tag = get_reasoning_parser(reasoning_parser).think_end
            (out,) = await self.dispatcher.call_each(model, "tokenize", [{"prompt": tag, "add_special_tokens": False}], "messages")
            self._think_end_ids[model] = tuple(out["tokens"])
        return self._think_end_ids[model]

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        tenant, req = await self._parse(request, ChatCompletionRequest)
        if req.model.startswith(AGENT_MODEL_PREFIX):
            return await self._agent_chat(tenant, req)
        self._check_model(tenant, req.model)
        plan = await self._output_plan(req)
        template: dict[str, Any] = {"messages": req.chat_messages()}
        tools = req.template_tools()
        if tools:
            template["tools"] = tools
        if req.chat_template_kwargs:
            template["chat_template_kwargs"] = dict(req.chat_template_kwargs)
        constraint, opener = forced_call_constraint(req, plan.tool_parser)
        if opener:
            template["assistant_prefix"] = opener
        jobs = [{**template, **req.sampling(i), **constraint} for i in range(req.n)]
        renderer = ResponseRenderer("chat", req.model)
        ticket, generation = await self._start(tenant, req.model, jobs, "messages", req.stream, session_id_of(request, req.user))
        return _render(renderer, req, generation, "messages", ticket, plan=plan)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        tenant, req = await self._parse(request, CompletionRequest)
        self._check_model(tenant, req.model)
        prompts = req.prompts()
        jobs = [{**p, **req.sampling(i)} for p in prompts for i in range(req.n)]
        echo = None
        if req.echo:
            if any("prompt" not in p for p in prompts):
                raise OpenAIError(400, "echo is only supported with text prompts", param="echo")
            echo = [p["prompt"] for p in prompts]
        renderer = ResponseRenderer("completion", req.model)
        ticket, generation = await self._start(tenant, req.model, jobs, "prompt", req.stream, session_id_of(request, req.user))
        return _render(renderer, req, generation, "prompt", ticket, echo)

    # -- SGLang's native API (for sgl.RuntimeEndpoint) ------------------------------------------

    def _sglang_tenant(self, request: Request) -> Tenant | None:
        """The caller, who must be allowed the model behind SGLang's API (404 otherwise)."""
        tenant = self._authorize(request)
        self._check_model(tenant, self.sglang_model)
        return tenant

    @app.get("/get_model_info")
    async def sglang_model_info(self, request: Request):
        self._sglang_tenant(request)
        info = await child_call(self.dispatcher.handle(self.sglang_model).model_info)
        return {
            "model_path": info["source"],
            "tokenizer_path": info["source"],
            "is_generation": True,
            "served_model_name": self.sglang_model,
            "max_context_length": info["max_model_len"],
        }

    @app.get("/server_info")
    async def sglang_server_info(self, request: Request):
        self._sglang_tenant(request)
        handle = self.dispatcher.handle(self.sglang_model)
        info, stats = await asyncio.gather(child_call(handle.model_info), child_call(handle.stats))
        return {
            "model_path": info["source"],
            "served_model_name": self.sglang_model,
            "engine": info["engine"],
            "context_length": info["max_model_len"],
            "internal_states": [stats],
        }

    @app.post("/flush_cache")
    async def sglang_flush_cache(self, request: Request):
        """An admin route: with tenants, only keys with `admin: true`."""
        tenant = self._sglang_tenant(request)
        self.gate.require_admin(tenant, "/flush_cache")
        freed = await child_call(self.dispatcher.handle(self.sglang_model).flush_cache)
        return JSONResponse({"message": "Cache flushed.", "replica": freed["replica"], "freed_blocks": freed["freed_blocks"]})

    @app.post("/generate")
    async def sglang_generate(self, request: Request):
        tenant, req = await self._parse(request, sglang_protocol.GenerateRequest)
        self._check_model(tenant, self.sglang_model)
        req.check_supported()
        prompts = req.prompts()
        rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(prompts)
        rids = [r or uuid.uuid4().hex for r in rids]
        if req.sampling_params.max_new_tokens == 0:
            # Prefill only: token counts, and prompt log-probs when asked (SGLang's `select`).
            start = req.logprob_start_len if req.return_logprob else -1
            calls = [{**p, "start": start} for p in prompts]
            ticket = await self.gate.admit(tenant)
            try:
                infos = await self.dispatcher.call_each(self.sglang_model, "prompt_logprobs", calls, "text")
            except BaseException:
                ticket.done(ok=False)
                raise
            ticket.done(sum(info["prompt_tokens"] for info in infos))
            results = []
            for rid, info in zip(rids, infos):
                extra = {"input_token_logprobs": info["input_token_logprobs"], "output_token_logprobs": []} if req.return_logprob else {}
                results.append({"text": "", "meta_info": sglang_protocol.meta_info(rid, info["prompt_tokens"], 0, {"type": "length", "length": 0}, **extra)})
            return results if req.is_batch else results[0]

        sampling = req.sampling_params.to_tandem()
        if req.return_logprob:
            sampling["logprobs"] = req.top_logprobs_num
        ticket, generation = await self._start(tenant, self.sglang_model, [{**p, **sampling} for p in prompts], "text", req.stream)
        choices = generation.choices

        def result(c: Choice, rid: str) -> dict:
            finish = sglang_protocol.finish_reason(c.finish_reason, c.stop_reason, c.completion_tokens)
            meta = sglang_protocol.meta_info(rid, c.prompt_tokens, c.completion_tokens, finish, **req.logprob_meta(c.logprobs))
            return {"text": "".join(c.text), "meta_info": meta}

        if req.stream:
            async def events():
                c = choices[0]
                async for delta in c.deltas():
                    c.take(delta)
                    # SGLang streams the cumulative text with each event.
                    yield sse(result(c, rids[0]))

            def finish():
                generation.close()
                ticket.done(*_usage_totals(choices, 1))

            return _sse_response(_guarded(events(), lambda e: engine_error(e, "text"), finish))
        ticket.done(*_usage_totals(choices, 1))
        results = [result(c, rid) for c, rid in zip(choices, rids)]
        return results if req.is_batch else results[0]

    # -- agents: registered SGLang programs ------------------------------------------------------

    def _agent(self, tenant: Tenant | None, name: str) -> DeploymentHandle:
        """404 for an agent that does not exist or that the tenant may not use."""
        if name in self.agents and tenant is not None and not tenant.may_use_agent(name):
            self.gate.refused(tenant)
        if name not in self.agents or (tenant is not None and not tenant.may_use_agent(name)):
            known = ", ".join(a for a in sorted(self.agents) if tenant is None or tenant.may_use_agent(a)) or "none"
            raise OpenAIError(404, f"The agent '{name}' does not exist. Available agents: {known}.", param="agent", code="agent_not_found")
        return self.agents[name]

    async def _agent_run(self, handle: DeploymentHandle, ticket: Ticket, arguments: dict) -> dict:
        try:
            result = await asyncio.wait_for(child_call(handle.run, arguments), timeout=self.request_timeout_s)
        except Exception as e:  # noqa: BLE001 - mapped to an HTTP error
            ticket.done(ok=False)
            raise _agent_error(e) from None
        ticket.done()  # a run's model calls go over handles; their tokens are the model's, not counted here
        return result

    async def _agent_events(self, handle: DeploymentHandle, ticket: Ticket, arguments: dict) -> tuple[dict, DeploymentResponseGenerator]:
        """Start a streamed program run; its first event arrives before the response starts, so
        bad arguments still get a 400."""
        gen = child_call(handle.options(stream=True).run_stream, arguments)
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.request_timeout_s)
        except BaseException as e:
            cancel_call(gen)
            ticket.done(ok=False)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _agent_error(e) from None
        return first, gen

    @staticmethod
    def _agent_stream(events: AsyncIterator[str], gen: DeploymentResponseGenerator, ticket: Ticket) -> StreamingResponse:
        ended = []

        async def watched():
            async for event in events:
                yield event
            ended.append(True)

        def cleanup():
            cancel_call(gen)
            ticket.done(ok=bool(ended))

        return _sse_response(_guarded(watched(), _agent_error, cleanup))

    @app.get("/v1/agents")
    async def list_agents(self, request: Request):
        tenant = self._authorize(request)
        handles = [h for name, h in self.agents.items() if tenant is None or tenant.may_use_agent(name)]
        infos = await asyncio.gather(*(child_call(h.describe) for h in handles))
        return {"object": "list", "data": [{"object": "agent", **info} for info in infos]}

    @app.post("/v1/agents/{name}")
    async def run_agent(self, name: str, request: Request):
        tenant = self._authorize(request)
        handle = self._agent(tenant, name)
        arguments = await _json_object(request)
        stream = arguments.pop("stream", False)
        if not isinstance(stream, bool):
            raise OpenAIError(400, "stream must be true or false", param="stream")
        ticket = await self.gate.admit(tenant)
        if not stream:
            return {"object": "agent.run", "agent": name, **await self._agent_run(handle, ticket, arguments)}

        first, gen = await self._agent_events(handle, ticket, arguments)

        async def events():
            yield sse(first)
            async for event in gen:
                yield sse(event)

        return self._agent_stream(events(), gen, ticket)

    async def _agent_chat(self, tenant: Tenant | None, req: ChatCompletionRequest):
        """`model: "agent:<name>"`: the program runs on the conversation's last user message
        (its `question`) and answers with its `answer`; all variables go in the `agent` field."""
        name = req.model.removeprefix(AGENT_MODEL_PREFIX)
        handle = self._agent(tenant, name)
        if req.logprobs:
            raise OpenAIError(400, "log-probabilities are not available for agent models: an answer is a whole program's run",
                              param="logprobs")
        if req.tools:
            raise OpenAIError(400, "agent models take no tools: the program makes its own generation calls", param="tools")
        users = [m for m in req.chat_messages() if m["role"] == "user"]
        if not users:
            raise OpenAIError(400, "an agent conversation needs at least one user message", param="messages")
        arguments = {"question": users[-1]["content"]}
        renderer = ResponseRenderer("chat", req.model)
        ticket = await self.gate.admit(tenant)
        if not req.stream:
            result = await self._agent_run(handle, ticket, arguments)
            body = renderer.full([{"text": str(result["answer"]), "finish_reason": "stop"}], 0, 0)
            body.pop("usage")
            return JSONResponse({**body, "agent": {"name": name, **{k: v for k, v in result.items() if k != "answer"}}})

        first, gen = await self._agent_events(handle, ticket, arguments)

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

        return self._agent_stream(chunks(), gen, ticket)
