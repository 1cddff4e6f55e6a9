"""A chat answer's text, split into reasoning, content and tool calls, and the constraint that forces calls.

Engines stream text; what of it is reasoning (`<think>...</think>`), what is a tool call and what is
content is decided here, above every engine, with the parsers of `cluster.parsers`:

    text -> reasoning parser -> (reasoning, rest) -> tool-call parser -> (content, tool-call deltas)

How calls are found depends on `tool_choice`:

* "auto": the model's own format, found by the family's parser (`tool_call_parser` in the config);
* "required" or a named function, for a family whose call is a JSON object after an opener (Qwen's
  `<tool_call>\n{"name": ..., "arguments": {...}}`, Llama 3's, InternLM's): the opener is written
  into the prompt, as the start of the answer, and decoding is constrained to that object, its name
  one of the tools' (or the named one) and its arguments held to that function's schema. The model
  writes its own format, as SGLang's structural constraint has it; one call. A named call's
  arguments stream as written; "required" releases the call when its object closes.
* the same for a model without such a parser (as vLLM does it): a named function's whole answer is
  constrained to its `parameters` schema (the arguments stream as written); "required" to a JSON
  array of `{"name", "parameters"}` objects, one per call;
* "none": the tools are not shown to the model, and nothing is parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cluster.openai_protocol import ChatCompletionRequest, NamedToolChoice, OpenAIError
from cluster.parsers import (
    ContentDelta,
    Event,
    ReasoningParser,
    ToolCallDelta,
    ToolCallParser,
    get_reasoning_parser,
    get_tool_call_parser,
)
from cluster.parsers.tool_calls import JSONArrayToolCallParser, NamedFunctionStream, NativeNamedCallStream


@dataclass(frozen=True)
class ReasoningDelta:
    """Text the model wrote while thinking (OpenAI-compatible servers' `reasoning_content`)."""

    text: str


OutputEvent = ReasoningDelta | ContentDelta | ToolCallDelta


def forced_call_constraint(req: ChatCompletionRequest, tool_parser: str | None = None) -> tuple[dict[str, str], str]:
    """For tool_choice "required" or a named function: the engine constraint (sampling kwargs) and the
    text that opens the answer (written after the rendered prompt); ({}, "") otherwise. With the
    model's `tool_parser`, the family's own call format; else vLLM's. A schema-less function takes
    any object."""
    choice = req.effective_tool_choice()
    if choice in ("none", "auto"):
        return {}, ""
    if req.response_format is not None and req.response_format.type != "text" or req.regex is not None:
        raise OpenAIError(400, "a forced tool call (tool_choice) cannot be combined with response_format or regex",
                          param="tool_choice")
    params = {t.function.name: t.function.parameters or {"type": "object"} for t in req.tools or []}
    if isinstance(choice, NamedToolChoice):
        params = {choice.function.name: params[choice.function.name]}
    family = get_tool_call_parser(tool_parser) if tool_parser else None
    if family is not None and family.call_opener is not None:
        return {"json_schema": json.dumps(_any_call(params, family.arguments_key))}, family.call_opener
    if isinstance(choice, NamedToolChoice):
        return {"json_schema": json.dumps(params[choice.function.name])}, ""
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": _any_call(params, "parameters")}
    if req.parallel_tool_calls is False:
        array["maxItems"] = 1
    return {"json_schema": json.dumps(array)}, ""


def _any_call(params: dict[str, dict], arguments_key: str) -> dict:
    """The schema of one call object `{"name": ..., arguments_key: {...}}` of any of the functions."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, arguments_key: schema},
            "required": ["name", arguments_key],
        }
        for name, schema in params.items()
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


@dataclass(frozen=True)
class OutputPlan:
    """How one request's answers are split: fixed per request, one `ChatOutputParser` per choice."""

    tool_parser: str | None = None  # the model family's parser name (for "auto"; the format of forced calls)
    forced: str | NamedToolChoice | None = None  # "required" or the named function
    reasoning_parser: str | None = None
    enable_thinking: bool = True
    max_calls: int | None = None  # 1 with parallel_tool_calls false
    think_end_ids: tuple[int, ...] = ()  # the reasoning end tag's token ids, for counting reasoning tokens

    @property
    def active(self) -> bool:
        return bool(self.tool_parser or self.forced or self.reasoning_parser)

    @property
    def native(self) -> bool:
        """A forced call in the family's own format (see forced_call_constraint)."""
        return bool(self.forced and self.tool_parser and get_tool_call_parser(self.tool_parser).call_opener is not None)

    @property
    def names_function(self) -> bool:
        return isinstance(self.forced, NamedToolChoice)

    def new_parser(self) -> ChatOutputParser:
        tools: ToolCallParser | None = None
        if isinstance(self.forced, NamedToolChoice):
            name = self.forced.function.name
            tools = NativeNamedCallStream(name) if self.native else NamedFunctionStream(name)
        elif self.forced == "required":
            tools = JSONArrayToolCallParser()
        elif self.tool_parser:
            tools = get_tool_call_parser(self.tool_parser)()
        reasoning = None
        # A forced call is constrained JSON from the first token: there is no reasoning to split.
        if self.reasoning_parser and not self.forced:
            reasoning = get_reasoning_parser(self.reasoning_parser)(enable_thinking=self.enable_thinking)
        return ChatOutputParser(reasoning, tools, self.max_calls, self.think_end_ids)


class ChatOutputParser:
    """One choice's streamed text -> reasoning, content and tool-call events, and its reasoning tokens.

    `feed(text, token_ids)` per delta, `finish()` at the end. Streaming equals one-shot parsing, as
    the parsers guarantee. Content right after the reasoning starts at its first non-blank character
    (the blank line a `</think>` is followed by is formatting)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None, max_calls: int | None,
                 think_end_ids: tuple[int, ...] = ()):
        self._reasoning = reasoning
        self._tools = tools
        self._max_calls = max_calls
        self._think_end_ids = list(think_end_ids)
        self._saw_reasoning = False
        self._content_started = False
        self._ids: list[int] = []  # the completion's token ids so far
        self._entered = False  # the model has been inside a reasoning block
        self._ended = False  # ... and has left it
        self._ids_until_end = 0  # tokens of the deltas up to the one that ended the reasoning
        self.calls = 0  # calls released so far

    def feed(self, text: str, token_ids: list[int] | None = None) -> list[OutputEvent]:
        if self._reasoning is None:
            return self._content(text)
        events = self._split(*self._reasoning.feed(text))
        self._ids += token_ids or []
        if not self._ended:
            self._ids_until_end = len(self._ids)
            self._entered |= self._reasoning.thinking or self._saw_reasoning
            self._ended = self._entered and not self._reasoning.thinking
        return events

    def finish(self) -> list[OutputEvent]:
        events = self._split(*self._reasoning.finish()) if self._reasoning else []
        if self._tools is not None:
            events += self._calls_only(self._tools.finish())
        return events

    @property
    def reasoning_tokens(self) -> int:
        """The completion's tokens up to and including the reasoning's end tag (all of them when it
        never came; 0 without reasoning). Exact when the tag's token ids are known and the tag was
        generated as those tokens; otherwise every token of the delta that ended the reasoning counts."""
        if not self._entered:
            return 0
        ids, n = self._ids, len(self._think_end_ids)
        for i in range(len(ids) - n + 1 if n else 0):
            if ids[i : i + n] == self._think_end_ids:
                return i + n
        return self._ids_until_end if self._ended else len(ids)

    def _split(self, reasoning: str, content: str) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        if reasoning:
            self._saw_reasoning = True
            events.append(ReasoningDelta(reasoning))
        return events + self._content(content)

    def _content(self, text: str) -> list[OutputEvent]:
        if self._saw_reasoning and not self._content_started:
            text = text.lstrip()
        if not text:
            return []
        self._content_started = True
        if self._tools is None:
            return [ContentDelta(text)]
        return self._calls_only(self._tools.feed(text))

    def _calls_only(self, events: list[Event]) -> list[OutputEvent]:
        """Drops calls past `max_calls` (parallel_tool_calls false)."""
        out: list[OutputEvent] = []
        for event in events:
            if isinstance(event, ToolCallDelta):
                if self._max_calls is not None and event.index >= self._max_calls:
                    continue
                if event.name is not None:
                    self.calls += 1
            out.append(event)
        return out


def collect_output(events: list[OutputEvent]) -> tuple[str, str | None, list[dict]]:
    """A non-streamed answer's (content, reasoning or None, OpenAI tool_calls entries)."""
    content, reasoning, calls = [], [], {}
    for event in events:
        if isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ContentDelta):
            content.append(event.text)
        elif event.name is not None:
            calls[event.index] = {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": event.arguments}}
        else:
            calls[event.index]["function"]["arguments"] += event.arguments
    return "".join(content), ("".join(reasoning) if reasoning else None), [calls[i] for i in sorted(calls)]


def finish_with_calls(finish: str | None, plan: OutputPlan, calls: int) -> str | None:
    """OpenAI's finish reason once calls were made: "tool_calls" (a named function, which the request
    forced, ends with "stop", as OpenAI answers it); a cut-off answer stays "length"."""
    if calls and finish in ("stop", "abort") and not plan.names_function:
        return "tool_calls"
    return finish


def event_chunks(renderer, index: int, events: list[OutputEvent], logprobs: list | None) -> list[dict]:
    """A streamed delta's events as chat.completion.chunk objects: reasoning and content together,
    then one chunk per tool-call delta (OpenAI's shape: the first carries index, id and name, later
    ones argument fragments). Log-probs go with the first chunk, or alone when the text is held back."""
    chunks: list[dict] = []
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    if reasoning or content or logprobs:
        chunks.append(renderer.chunk(index, text=content or None, reasoning=reasoning or None, logprobs=logprobs))
    for event in events:
        if isinstance(event, ToolCallDelta):
            chunks.append(renderer.chunk(index, tool_calls=[event.to_openai()]))
    return chunks
