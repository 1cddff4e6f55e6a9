"""The gateway's OpenAPI schema, as it really behaves.

The gateway's routes read the raw `Request` (so that every error, a body that is not JSON included,
comes in OpenAI's shape), so FastAPI sees no request bodies and no responses. `install_openapi`
makes `/openapi.json` say what the routes take and answer: per (method, path) of `ROUTES`, the
request body from the request models (`cluster/openai_protocol.py`, `cluster/sglang_protocol.py`),
the 200 response (JSON, and the SSE stream where the route streams) and each error status the route
can answer, with OpenAI's error body. The response models below are documentation: the gateway builds
its answers as dicts; `tests/test_openapi.py` fuzzes the live gateway against this schema.

Response models leave extra fields allowed (no `additionalProperties: false`): they pin down what a
client may rely on, not every field a later version may add.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from cluster import sglang_protocol
from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

logger = logging.getLogger("ray.serve")

REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


# -- errors --------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description="The request parameter at fault, e.g. `messages[1].content[0].type`.")
    code: str | None = Field(description="e.g. invalid_value, model_not_found, context_length_exceeded, invalid_api_key")


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every error the gateway answers."""

    error: ErrorDetail


# -- OpenAI objects --------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """With `logprobs: true`: each generated token's log-probability under the model (before
    temperature and penalties), with `top_logprobs` alternatives."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """With `logprobs: k`: OpenAI's legacy shape."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class AgentInChat(BaseModel):
    """`model: "agent:<name>"`: the program's run, less its answer (the message's content)."""

    name: str
    variables: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = None
    calls: int | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = Field(default=None, description="Absent for agent models.")
    agent: AgentInChat | None = Field(default=None, description="Agent models only.")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion; with `stream_options.include_usage`, a last one with
    no choices carries the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    agent: AgentInChat | None = Field(default=None, description="Agent models: on the chunk with the finish reason.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class TextCompletion(BaseModel):
    """A completion, and (with `usage` only on the last, optional one) each event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = Field(
        default=None, description="The model's context length in tokens (not for agents; null until a replica has answered)"
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


# -- agents ------------------------------------------------------------------------------------------


class AgentInfo(BaseModel):
    object: Literal["agent"]
    name: str
    program: str
    doc: str
    arguments: list[str]
    required: list[str]


class AgentList(BaseModel):
    object: Literal["list"]
    data: list[AgentInfo]


class AgentRun(BaseModel):
    object: Literal["agent.run"]
    agent: str
    answer: Any = Field(description="The program's `answer` variable.")
    variables: dict[str, Any]
    session_id: str
    calls: int = Field(description="Model calls the run made.")


class AgentArguments(BaseModel):
    """The program's arguments by name (`GET /v1/agents` lists each agent's), plus `stream`."""

    model_config = ConfigDict(extra="allow")
    stream: bool = Field(default=False, description="Stream the run: an event per variable delta, then the result.")


# -- cluster ---------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    models: dict[str, str | dict[str, Any]] = Field(
        description='Per model: "ok", why not ("no running replica", "unavailable: <error>"), or with several '
        'pools {"status", "pools": {pool: state}}.'
    )


class PoolReplicas(BaseModel):
    running: int | None
    starting: int
    min: int
    max: int


class PoolState(BaseModel):
    pool: str
    deployment: str
    engine: str
    accelerator: dict[str, Any]
    replicas: PoolReplicas
    in_flight: int
    served: int
    status: str
    message: str


class ModelPools(BaseModel):
    model: str
    pools: list[PoolState]


class PoolList(BaseModel):
    object: Literal["list"]
    data: list[ModelPools]


class ClusterSnapshot(BaseModel):
    """Everything the console shows (cluster/cluster_state.py); loosely described."""

    object: Literal["cluster"]
    gateway: dict[str, Any]
    models: list[dict[str, Any]]
    agents: list[dict[str, Any]]


# -- SGLang's native API -----------------------------------------------------------------------------


class GenerateMetaInfo(BaseModel):
    id: str
    finish_reason: dict[str, Any] | None = Field(description='SGLang\'s: {"type": "stop", "matched"} | {"type": "length", "length"} | {"type": "abort", ...}')
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int
    input_token_logprobs: list[Any] | None = Field(default=None, description="With return_logprob: [[logprob, token id, text], ...]")
    output_token_logprobs: list[Any] | None = None


class GenerateResult(BaseModel):
    """One prompt's result; a batch (a list of texts or of id lists) is answered with a list of them.
    Each event of a stream is one too, with the text so far."""

    text: str
    meta_info: GenerateMetaInfo


class SGLangModelInfo(BaseModel):
    model_path: str
    tokenizer_path: str
    is_generation: bool
    served_model_name: str
    max_context_length: int


class SGLangServerInfo(BaseModel):
    model_path: str
    served_model_name: str
    engine: str
    context_length: int
    internal_states: list[dict[str, Any]]


class TokenizeResult(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, description="With return_token_strs")


class DetokenizeResult(BaseModel):
    prompt: str = Field(description="The text (vLLM's field name)")
    text: str = Field(description="The same text (SGLang's field name)")


class FlushCacheResult(BaseModel):
    message: str
    replica: str
    freed_blocks: int


# -- the routes --------------------------------------------------------------------------------------

ERRORS = {
    400: "Invalid request: a body that is not a JSON object, an invalid or unknown parameter, a prompt longer than the context.",
    401: "Missing or wrong API key (when the gateway has keys).",
    403: "The API key may not use this admin route.",
    404: "No such model or agent (or one the API key may not use).",
    429: "The API key's tenant is over one of its rate limits; retry after `Retry-After` seconds.",
    500: "The model or the agent's program failed.",
    503: "No replica can take the request now (overloaded, scaling up from zero, lost); retry later.",
    504: "The request (or the agent's run) timed out.",
}
GENERATION_ERRORS = (400, 401, 404, 429, 500, 503, 504)
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (when known).", "schema": {"type": "integer", "minimum": 1}}}


# An agent run's stream: its events are the program's, loosely typed.
AGENT_EVENT_SCHEMA = {
    "type": "object",
    "description": 'A variable\'s delta {"variable", "delta"}, then {"done": true, "answer", "variables", ...}',
}


@dataclass(frozen=True)
class Route:
    ok: Any  # the 200 body: a model, or a JSON schema (dict)
    errors: tuple[int, ...] = (401,)
    body: type[BaseModel] | None = None
    stream: Any = None  # the JSON of each event (a model or a schema), when the route can stream (SSE)
    auth: bool = True
    other: dict[int, Any] = field(default_factory=dict)  # statuses answered with a body other than ErrorResponse
    summary: str = ""


# Every route of cluster/gateway.py in the schema. tests/test_openapi.py checks that the schema has
# exactly these operations.
ROUTES: dict[tuple[str, str], Route] = {
    ("get", "/health"): Route(Health, errors=(), auth=False, other={503: Health}, summary="Each model's state (503 when one has no pool)"),
    ("get", "/v1/pools"): Route(PoolList, summary="Each model's pools: engine, accelerator, replicas, requests"),
    ("get", "/v1/cluster"): Route(ClusterSnapshot, summary="The cluster as the console shows it"),
    ("get", "/v1/models"): Route(ModelList, summary="Models, and agents as agent:<name>"),
    ("post", "/v1/chat/completions"): Route(
        ChatCompletion, GENERATION_ERRORS, body=ChatCompletionRequest, stream=ChatCompletionChunk, summary="OpenAI chat completion"
    ),
    ("post", "/v1/completions"): Route(
        TextCompletion, GENERATION_ERRORS, body=CompletionRequest, stream=TextCompletion, summary="OpenAI (legacy) completion"
    ),
    ("post", "/tokenize"): Route(
        TokenizeResult, (400, 401, 404, 500, 503, 504), body=TokenizeRequest, summary="vLLM / SGLang: a prompt's or messages' token ids"
    ),
    ("post", "/detokenize"): Route(
        DetokenizeResult, (400, 401, 404, 500, 503, 504), body=DetokenizeRequest, summary="vLLM / SGLang: the text of token ids"
    ),
    ("get", "/get_model_info"): Route(SGLangModelInfo, (401, 404, 503), summary="SGLang: the model behind /generate"),
    ("get", "/server_info"): Route(SGLangServerInfo, (401, 404, 503), summary="SGLang: server and engine state"),
    ("post", "/flush_cache"): Route(FlushCacheResult, (401, 403, 404, 503), summary="SGLang: drop one replica's prefix cache (admin)"),
    ("post", "/generate"): Route(
        {"anyOf": [_ref(GenerateResult), {"type": "array", "items": _ref(GenerateResult)}]},
        GENERATION_ERRORS,
        body=sglang_protocol.GenerateRequest,
        stream=GenerateResult,
        summary="SGLang: generate (a prompt, or a batch)",
    ),
    ("get", "/v1/agents"): Route(AgentList, summary="Registered agent programs and their arguments"),
    ("post", "/v1/agents/{name}"): Route(
        AgentRun, GENERATION_ERRORS, body=AgentArguments, stream=AGENT_EVENT_SCHEMA, summary="Run an agent program"
    ),
}

SSE_DONE_SCHEMA = {"const": "[DONE]"}

MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest, CompletionRequest, sglang_protocol.GenerateRequest, AgentArguments, ErrorResponse,
    ChatCompletion, ChatCompletionChunk, TextCompletion, ModelList, AgentList, AgentRun, Health, PoolList,
    ClusterSnapshot, GenerateResult, SGLangModelInfo, SGLangServerInfo, FlushCacheResult,
    TokenizeRequest, DetokenizeRequest, TokenizeResult, DetokenizeResult,
]


def _components() -> dict[str, Any]:
    """Every model's JSON schema (and the models they use), named as `REF` names them."""
    _, top = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    return top["$defs"]


def _sse(event: dict[str, Any]) -> dict[str, Any]:
    """A text/event-stream response: `data: <JSON>` events, an error event if the stream fails
    midway, then `data: [DONE]`. Before OpenAPI 3.2 (`itemSchema`), a streaming media type's
    `schema` describes each event: {"data": <the line after "data: ">} (as Schemathesis reads it);
    `contentSchema` is the JSON in it."""
    json_event = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [event, _ref(ErrorResponse)]}}
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "string", "anyOf": [SSE_DONE_SCHEMA, json_event]}},
            "description": "One server-sent event. The body is the stream: `data: <JSON>` events, then `data: [DONE]`.",
        }
    }


def _error_response(status: int, model: Any = ErrorResponse) -> dict[str, Any]:
    schema = _ref(model) if isinstance(model, type) else model
    response = {"description": ERRORS.get(status, "Error"), "content": {"application/json": {"schema": schema}}}
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def _fill(operation: dict[str, Any], route: Route) -> None:
    if route.summary:
        operation["summary"] = route.summary
    if route.body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(route.body)}}}
    ok = _ref(route.ok) if isinstance(route.ok, type) else route.ok
    content: dict[str, Any] = {"application/json": {"schema": ok}}
    if route.stream is not None:
        content["text/event-stream"] = _sse(_ref(route.stream) if isinstance(route.stream, type) else route.stream)
    description = "OK" + (" (with `stream: true`, a text/event-stream)" if "text/event-stream" in content else "")
    responses: dict[str, Any] = {"200": {"description": description, "content": content}}
    for status in route.errors:
        responses[str(status)] = _error_response(status)
    for status, model in route.other.items():
        responses[str(status)] = {**_error_response(status, model), "description": "Degraded: a model has no pool that answers"}
    operation["responses"] = responses
    if route.auth:
        # Keys are optional (gateway.api_keys_env): either a bearer key or nothing is a valid request.
        operation["security"] = [{"bearerAuth": []}, {}]


def build_openapi(base: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's schema of the app (`base`, not modified) with the operations of `ROUTES` filled in."""
    schema = copy.deepcopy(base)
    components = schema.setdefault("components", {})
    # FastAPI's own models (HTTPValidationError: the gateway never answers 422) go with its responses.
    components["schemas"] = _components()
    components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key of gateway.api_keys_env"}}
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            route = ROUTES.get((method, path))
            if route is None:
                logger.warning("OpenAPI: no description of %s %s in cluster/openapi.py ROUTES", method.upper(), path)
                operation.setdefault("responses", {}).pop("422", None)
                continue
            _fill(operation, route)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (what /openapi.json serves) build `build_openapi`'s schema once, cached
    in `app.openapi_schema` as FastAPI caches its own."""
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            base = fastapi_openapi()  # FastAPI's own (cached in app.openapi_schema): replaced next
            app.openapi_schema = build_openapi(base)
        return app.openapi_schema

    app.openapi = openapi
