"""The OpenAI wire format: request models, response rendering and error bodies.

This is the one place where Tandem speaks OpenAI. Engines and deployments below it speak prompts,
sampling parameters and deltas.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.engines.engine import JSON_OBJECT_SCHEMA

MAX_STOP_SEQUENCES = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20


class OpenAIError(Exception):
    """An error answered in the OpenAI error shape."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        """`Retry-After` (whole seconds, at least 1) for an error worth retrying later: 429 and 503s."""
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # OpenAI answers an unknown argument with 400; so do we, rather than silently ignoring it.
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as in JSON) -> [-100, 100]
    response_format: ResponseFormat | None = None
    # Accepted and not used, as vLLM and SGLang do: nothing is stored, there is one service tier,
    # and these only label the request (README: "Fields accepted and ignored").
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Extensions (as in vLLM / SGLang), sent by the openai client through `extra_body`.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int | None = Field(default=None, ge=0)
    regex: str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        for token, bias in v.items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids (integers as strings), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100], got {bias!r} for token {token}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Top log-probs per token for the engines (0: the chosen token's only); None: none asked for."""
        return None

    def sampling(self, index: int) -> dict[str, Any]:
        """Sampling kwargs for the base-model deployment; choice `index` of n gets seed + index."""
        s: dict[str, Any] = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "stop": list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
        }
        if self.seed is not None:
            s["seed"] = self.seed + index
        if self.response_format is not None:
            s.update(self.response_format.constraint())
        if self.regex is not None:
            if "json_schema" in s:
                raise OpenAIError(400, "give regex or a JSON response_format, not both", param="regex")
            s["regex"] = self.regex
        if self.max_new_tokens() is not None:
            s["max_tokens"] = self.max_new_tokens()
        # Logit adjustments only when given: a plain request stays on the engines' fast path.
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "min_p"):
            if getattr(self, name) is not None:
                s[name] = getattr(self, name)
        if self.logit_bias:
            s["logit_bias"] = {int(token): bias for token, bias in self.logit_bias.items()}
        if self.requested_logprobs() is not None:
            s["logprobs"] = self.requested_logprobs()
        return s


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only allowed with it")
        return self

    def constraint(self) -> dict[str, str]:
        """As the engine's constraint parameter: a JSON schema string (any object for json_object)."""
        if self.type == "json_object":
            return {"json_schema": JSON_OBJECT_SCHEMA}
        if self.type == "json_schema":
            return {"json_schema": json.dumps(self.json_schema.schema_)}
        return {}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextContentPart(BaseModel):
    """The one content part the models take: text."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


def _content_is_required(schema: dict[str, Any]) -> None:
    # The model keeps `content` optional so that its own validator answers a missing one with
    # OpenAI's message; the published schema says what the gateway accepts: content, never null.
    content = schema["properties"]["content"]
    content["anyOf"] = [s for s in content["anyOf"] if s.get("type") != "null"]
    content.pop("default", None)
    schema["required"] = [*schema.get("required", []), "content"]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: takes no arguments
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _FunctionName


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: _CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_content_is_required)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A list's parts are checked first by ChatCompletionRequest._check_content (OpenAI's messages).
    content: str | Annotated[list[TextContentPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer
    # An earlier answer's reasoning, as vLLM and SGLang take it back (templates may render or drop it).
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_given(self):
        # OpenAI refuses a message without content (null or missing); only an assistant message
        # with tool_calls may leave it out.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required for a {self.role!r} message (got null or nothing)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls are only allowed on assistant messages, not on a {self.role!r} message")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("tool_call_id is required on tool messages, and only allowed there")
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError("reasoning_content is only allowed on assistant messages")
        return self

    def text(self) -> str:
        """Content as plain text (the parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# OpenAI's content part types; the models here are text-only, so only "text" is served.
CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal", "audio")


def _json_type(value: Any) -> str:
    """A JSON value's type as OpenAI's messages name it ("an integer", "an object", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _content_error(messages: list, model: Any) -> OpenAIError | None:
    """The first problem with the messages' content, as OpenAI answers it (param `messages[i].content...`);
    None when every content is a string, null/missing (answered by ChatMessage), or text parts."""
    takes = f"The model '{model}'" if isinstance(model, str) else "This model"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("content") is None:
            continue
        content = message["content"]
        where = f"messages[{i}].content"
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            return OpenAIError(
                400, f"Invalid type for '{where}': expected a string or an array of content parts, but got {_json_type(content)} instead.",
                param=where, code="invalid_type",
            )
        if not content:
            return OpenAIError(
                400, f"Invalid '{where}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                param=where, code="empty_array",
            )
        for j, part in enumerate(content):
            at = f"{where}[{j}]"
            if not isinstance(part, dict):
                return OpenAIError(400, f"Invalid type for '{at}': expected an object, but got {_json_type(part)} instead.", param=at, code="invalid_type")
            kind = part.get("type")
            if "type" not in part:
                return OpenAIError(400, f"Missing required parameter: '{at}.type'.", param=f"{at}.type", code="missing_required_parameter")
            if not isinstance(kind, str):
                return OpenAIError(400, f"Invalid type for '{at}.type': expected a string, but got {_json_type(kind)} instead.", param=f"{at}.type", code="invalid_type")
            if kind not in CONTENT_PART_TYPES:
                supported = ", ".join(f"'{t}'" for t in CONTENT_PART_TYPES)
                return OpenAIError(400, f"Invalid value: '{kind}'. Supported values are: {supported}.", param=f"{at}.type", code="invalid_value")
            if kind != "text":
                return OpenAIError(
                    400, f"{takes} takes text only, and '{at}' is a content part of type '{kind}'. Send the content "
                    "as a string or as text parts ({\"type\": \"text\", \"text\": \"...\"}).",
                    param=at, code="unsupported_content",
                )
            if "text" not in part:
                return OpenAIError(400, f"Missing required parameter: '{at}.text'.", param=f"{at}.text", code="missing_required_parameter")
            if not isinstance(part["text"], str):
                return OpenAIError(400, f"Invalid type for '{at}.text': expected a string, but got {_json_type(part['text'])} instead.", param=f"{at}.text", code="invalid_type")
    return None


class _RefusesBadContent(BaseModel):
    """A request with `messages`: content OpenAI would refuse, or that these text-only models cannot
    take, is a 400 naming it as OpenAI does (`messages[1].content[0].type`): raised at validation, as
    the OpenAIError itself (pydantic lets exceptions other than ValueError through)."""

    @model_validator(mode="before")
    @classmethod
    def _check_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            error = _content_error(data["messages"], data.get("model"))
            if error is not None:
                raise error
        return data


class ChatCompletionRequest(_Request, _RefusesBadContent):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Extension (vLLM, SGLang): extra variables for the chat template, e.g. {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _tools_consistent(self):
        _check_tools(self)
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("logprobs must be set to true if top_logprobs is used")
        return self

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict]:
        return chat_message_dicts(self.messages)

    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" with tools, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def template_tools(self) -> list[dict] | None:
        """The tools the chat template renders: none for tool_choice "none" (as SGLang does: the model
        is not shown tools it may not call)."""
        return None if self.effective_tool_choice() == "none" else template_tool_dicts(self.tools)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    # OpenAI allows 5; like vLLM, Tandem allows as many as chat's top_logprobs.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _no_echo_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs together with echo (the prompt's log-probs) is not supported")
        return self

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list[dict]:
        """Each prompt as kwargs for the deployment: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if all(isinstance(x, str) for x in p):
            return [{"prompt": x} for x in p]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        return [{"prompt_token_ids": x} for x in p]


class TokenizeRequest(_RefusesBadContent):
    """vLLM's and SGLang's `POST /tokenize`: a prompt, or chat messages rendered by the model's template."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[ToolDefinition] | None = None  # rendered by the chat template, as chat requests' are
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and (self.tools or self.chat_template_kwargs):
            raise ValueError("tools and chat_template_kwargs go with messages")
        return self

    def job(self) -> dict[str, Any]:
        """The base-model deployment's `tokenize` keyword arguments."""
        job: dict[str, Any] = {"add_special_tokens": self.add_special_tokens, "return_token_strs": self.return_token_strs}
        if self.messages is not None:
            return {**job, "messages": chat_message_dicts(self.messages), "add_generation_prompt": self.add_generation_prompt,
                    "tools": template_tool_dicts(self.tools), "chat_template_kwargs": self.chat_template_kwargs}
        return {**job, "prompt": self.prompt}


class DetokenizeRequest(BaseModel):
    """vLLM's and SGLang's `POST /detokenize`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[int]


# Template variables the gateway sets itself; chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "tokenize", "conversation",
                            "continue_final_message", "return_dict", "chat_template")


def _check_tools(req: ChatCompletionRequest) -> None:
    """What OpenAI checks of tools, tool_choice and the tool turns of the history, each a 400 naming
    its field (raised as the OpenAIError itself: pydantic passes it through)."""
    from jsonschema import SchemaError, validators

    names = [t.function.name for t in req.tools or []]
    for i, tool in enumerate(req.tools or []):
        schema = tool.function.parameters
        if schema is None:
            continue
        where = f"tools[{i}].function.parameters"
        try:
            validators.validator_for(schema).check_schema(schema)
        except SchemaError as e:
            path = "".join(f"[{p!r}]" for p in e.path)
            raise OpenAIError(400, f"Invalid schema for function '{tool.function.name}': {where}{path}: {e.message}",
                              param=where, code="invalid_function_parameters") from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OpenAIError(400, f"Function names must be unique; repeated: {', '.join(dupes)}", param="tools")
    if req.tool_choice is not None and not req.tools:
        raise OpenAIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                          param="tool_choice")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise OpenAIError(
            400, f"Invalid value for 'tool_choice': no function named '{req.tool_choice.function.name}' in 'tools' "
            f"(functions: {', '.join(names)}).", param="tool_choice.function.name",
        )
    if req.parallel_tool_calls is not None and not req.tools:
        raise OpenAIError(400, "'parallel_tool_calls' is only allowed when 'tools' are specified.", param="parallel_tool_calls")
    bad = sorted(set(req.chat_template_kwargs or {}) & set(RESERVED_TEMPLATE_KWARGS))
    if bad:
        raise OpenAIError(400, f"chat_template_kwargs may not set {', '.join(bad)}: the gateway sets them",
                          param="chat_template_kwargs")
    called: set[str] = set()
    for i, m in enumerate(req.messages):
        for j, call in enumerate(m.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                where = f"messages[{i}].tool_calls[{j}].function.arguments"
                raise OpenAIError(400, f"Invalid '{where}': expected a JSON object as a string, got {call.function.arguments!r}.",
                                  param=where)
            called.add(call.id)
        if m.role == "tool" and m.tool_call_id not in called:
            where = f"messages[{i}].tool_call_id"
            raise OpenAIError(
                400, f"Invalid '{where}': no earlier assistant message has a tool call with id '{m.tool_call_id}'. "
                "A 'tool' message must answer a call in 'tool_calls' of an assistant message before it.",
                param=where,
            )


def template_tool_dicts(tools: list[ToolDefinition] | None) -> list[dict] | None:
    """Tools as chat templates take them: OpenAI's objects, unset fields left out (None: no tools)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def chat_message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates take them. "developer" is OpenAI's newer name for the system role;
    a call's arguments are an object (HF templates write them with `tojson`), as vLLM passes them."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
TokenizeRequest.model_rebuild()


# -- rendering -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage; `reasoning_tokens` (the completion's tokens spent thinking) when the model's
    output is split into reasoning and content."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def finish_reason(reason: str | None) -> str | None:
    # An engine-side abort is not an OpenAI finish reason; it only happens when the client left.
    return "stop" if reason == "abort" else reason


class ResponseRenderer:
    """Renders one request's results as a chat.completion / text_completion object or as chunks."""

    def __init__(self, kind: Literal["chat", "completion"], model: str):
        self.kind = kind
        self.model = model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[dict], prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
        """choices: [{"text", "finish_reason", "logprobs" (the engine's entries, or None)}] in index order;
        chat choices may add "reasoning" (text) and "tool_calls" (OpenAI's entries)."""
        rendered = []
        for i, c in enumerate(choices):
            logprobs = self.logprobs(c.get("logprobs"))
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": c["text"]}
                if c.get("tool_calls"):
                    message["tool_calls"] = c["tool_calls"]
                    message["content"] = c["text"] or None  # OpenAI: null content beside calls
                if c.get("reasoning") is not None:
                    message["reasoning_content"] = c["reasoning"]
                rendered.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(c["finish_reason"])})
            else:
                rendered.append({"index": i, "text": c["text"], "logprobs": logprobs, "finish_reason": finish_reason(c["finish_reason"])})
        return {**self._base(False), "choices": rendered, "usage": usage(prompt_tokens, completion_tokens, reasoning_tokens)}

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              logprobs: list | None = None, text_offset: int = 0, reasoning: str | None = None,
              tool_calls: list[dict] | None = None) -> dict:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if reasoning is not None:
                delta["reasoning_content"] = reasoning
            if text is not None:
                delta["content"] = text
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs), "finish_reason": finish_reason(finish)}
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(logprobs, text_offset), "finish_reason": finish_reason(finish)}
        return {**self._base(True), "choices": [choice]}

    def logprobs(self, entries: list | None, text_offset: int = 0) -> dict | None:
        """The engine's log-prob entries ([token id, text, logprob, [[id, text, logprob], ...]] per
        token, see the engine seam's Delta) in OpenAI's shape for this kind of response."""
        if entries is None:
            return None
        if self.kind == "chat":
            return {"content": [_chat_logprob(e) for e in entries], "refusal": None}
        offsets = []
        for _, text, _, _ in entries:
            offsets.append(text_offset)
            text_offset += len(text)
        return {
            "tokens": [text for _, text, _, _ in entries],
            "token_logprobs": [logprob for _, _, logprob, _ in entries],
            "top_logprobs": [{t: lp for _, t, lp in top} for _, _, _, top in entries],
            "text_offset": offsets,
        }

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict:
        return {**self._base(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens, reasoning_tokens)}


def _chat_logprob(entry: list) -> dict:
    _, text, logprob, top = entry
    return {
        "token": text, "logprob": logprob, "bytes": list(text.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for _, t, lp in top],
    }


def sse(obj: dict | str) -> str:
    # orjson: several times faster than json.dumps, and every streamed chunk is dumped once.
    return f"data: {obj if isinstance(obj, str) else orjson.dumps(obj).decode()}\n\n"


SSE_DONE = sse("[DONE]")
