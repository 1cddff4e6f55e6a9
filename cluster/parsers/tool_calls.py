"""Tool-call parsers: turn a model's streamed text into OpenAI tool calls.

The engines stream plain text deltas; the tool-call markup of each model
family is recognised here, above the engines, so every engine gets the same
behaviour. Parser names follow SGLang's ``--tool-call-parser`` and LMDeploy's
``--tool-call-parser`` where they exist.

One parser object per request::

    parser = get_tool_call_parser("qwen")()
    for delta in engine_stream:
        for event in parser.feed(delta):
            ...  # ContentDelta or ToolCallDelta
    for event in parser.finish():
        ...

Invariants (the tests check them for every family):

* Streaming equals one-shot parsing: feeding a text in any chunking and
  concatenating the events gives exactly ``parse(text)``; the decision about
  each piece of text depends on the text only, never on where chunks split.
* Text that cannot belong to a call marker is released as content at once;
  text that might start a marker is held back until it is decided (as a
  stop-string matcher does), and whitespace just before a marker is held with
  it, since it is formatting when a call follows.
* A call is released whole, once its closing marker arrives (or the stream
  ends): its first delta carries ``index``, ``id`` and ``name``, the next its
  ``arguments``. Only then can malformed JSON be told apart, and a call once
  announced cannot be taken back.
* Malformed calls never raise: a block whose JSON does not decode to a call
  (``name`` string, object ``arguments``) is released verbatim, markers
  included, as content. So when no call is recognised, content == text.
* Whitespace around a recognised call block is dropped (it separates calls);
  all other text is kept byte for byte.
* ``arguments`` is ``json.dumps(args, ensure_ascii=False)`` of the decoded
  object, as SGLang's ``parse_base_json`` does: the concatenated argument
  fragments of a call are valid JSON equal to the model's arguments.

Pure standard library: the gateway process imports this module.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "TOOL_CALL_PARSERS",
    "ContentDelta",
    "DeepSeekV3ToolCallParser",
    "Event",
    "InternLMToolCallParser",
    "JSONArrayToolCallParser",
    "Llama3ToolCallParser",
    "NamedFunctionStream",
    "NativeNamedCallStream",
    "QwenToolCallParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "collect",
    "detect_tool_call_parser",
    "get_tool_call_parser",
    "new_call_id",
]


@dataclass(frozen=True)
class ToolCall:
    """A complete call: ``arguments`` is a JSON object as a string (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ContentDelta:
    """Assistant text that is not part of a tool call."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One OpenAI streaming tool-call delta.

    The first delta of a call has ``id`` and ``name`` (and ``arguments == ""``);
    the following ones have only ``arguments`` fragments.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The ``choices[].delta.tool_calls[]`` entry of a chat-completion chunk."""
        if self.name is not None:
            return {
                "index": self.index,
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": self.arguments},
            }
        return {"index": self.index, "function": {"arguments": self.arguments}}


Event = ContentDelta | ToolCallDelta


def new_call_id() -> str:
    """An OpenAI-style call id: ``call_`` + 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def _call_from_obj(obj: Any, *, require_arguments: bool = False) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name": ..., "arguments"|"parameters": {...}}``.

    None when the object is not a call. ``arguments`` that is itself a JSON
    string of an object is accepted (some fine-tunes double-encode it).
    """
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    # LMDeploy's llama3/internlm parsers read "parameters", Qwen's read
    # "arguments"; SGLang accepts both, and so do we.
    for key in ("arguments", "parameters"):
        if key in obj:
            args = obj[key]
            break
    else:
        if require_arguments:
            return None
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _calls_from_json(body: str) -> list[ToolCall] | None:
    """Calls from a JSON body holding one call object or a list of them."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) and obj else [obj]
    calls = [_call_from_obj(o) for o in objs]
    if any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _partial_marker_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(text), len(marker) - 1), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def _find_first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """Position and marker of the earliest marker in ``text``; (-1, "") if none."""
    best_pos, best = -1, ""
    for marker in markers:
        pos = text.find(marker)
        if pos != -1 and (best_pos == -1 or pos < best_pos or (pos == best_pos and len(marker) > len(best))):
            best_pos, best = pos, marker
    return best_pos, best


def _json_object_end(text: str, start: int) -> int:
    """End offset of the JSON object opening at ``text[start] == "{"``; -1 if not closed yet.

    Counts brackets outside strings only, so braces inside argument strings
    do not end the object early.
    """
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


class ToolCallParser:
    """Streaming tool-call parser for one request (see the module docstring).

    Subclasses implement ``_step``: consume a decided prefix of ``self._buf``
    and return True, or return False when more text is needed (with
    ``final=True`` they must consume everything eventually).
    """

    name: ClassVar[str] = ""
    # Any of these strings in a chat template identifies the family, for
    # detect_tool_call_parser.
    template_markers: ClassVar[tuple[str, ...]] = ()
    # Families whose call is a JSON object {"name", ARGUMENTS_KEY} after an
    # opener: a forced call (tool_choice "required" or named) is the opener,
    # written into the prompt, then that object under a JSON-schema
    # constraint. None: the call is not such an object (DeepSeek V3).
    call_opener: ClassVar[str | None] = None
    arguments_key: ClassVar[str] = "arguments"

    def __init__(self, *, id_factory: Callable[[], str] = new_call_id) -> None:
        self._id_factory = id_factory
        self._buf = ""
        self._events: list[Event] = []
        self._calls = 0
        self._finished = False
        # Whitespace right after a recognised call is dropped.
        self._after_call = False

    def feed(self, text: str) -> list[Event]:
        """Events decided by the text so far, after adding ``text``."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        """Events for all text still held back; the parser is spent afterwards."""
        if self._finished:
            return []
        self._finished = True
        return self._drain(final=True)

    @classmethod
    def parse(cls, text: str) -> tuple[str, list[ToolCall]]:
        """One-shot parse: ``(content, calls)``, equal to streaming ``text`` in any chunking."""
        parser = cls()
        return collect(parser.feed(text) + parser.finish())

    # -- helpers for subclasses ------------------------------------------------

    def _drain(self, *, final: bool) -> list[Event]:
        if final:
            # At the end every step must consume or flush; False means done.
            while self._step(True):
                pass
        else:
            while self._buf and self._step(False):
                pass
        events, self._events = self._events, []
        return _merge_content(events)

    def _step(self, final: bool) -> bool:
        raise NotImplementedError

    def _content(self, text: str) -> None:
        if text:
            self._events.append(ContentDelta(text))

    def _call(self, call: ToolCall) -> None:
        index = self._calls
        self._calls += 1
        self._events.append(ToolCallDelta(index, id=self._id_factory(), name=call.name))
        self._events.append(ToolCallDelta(index, arguments=call.arguments))
        self._after_call = True

    def _skip_whitespace_after_call(self) -> bool:
        """Drop whitespace that follows a call; True while the buffer is all whitespace."""
        if not self._after_call:
            return False
        stripped = self._buf.lstrip()
        self._buf = stripped
        if stripped:
            self._after_call = False
            return False
        return True

    def _text_until(self, markers: Sequence[str], final: bool) -> tuple[str, str] | None:
        """Release content up to the first marker in the buffer.

        Returns ``(held_whitespace, marker)`` with the buffer advanced past
        the marker, or None when no marker is found (decided content is
        released and a possible marker prefix, with the whitespace before it,
        is kept in the buffer).
        """
        buf = self._buf
        pos, marker = _find_first(buf, markers)
        if pos == -1:
            if final:
                self._content(buf)
                self._buf = ""
                return None
            hold = _partial_marker_len(buf, markers)
            safe = buf[: len(buf) - hold]
            text = safe.rstrip()
            self._content(text)
            self._buf = buf[len(text) :]
            return None
        head = buf[:pos]
        text = head.rstrip()
        self._content(text)
        self._buf = buf[pos + len(marker) :]
        return head[len(text) :], marker


class _TaggedToolCallParser(ToolCallParser):
    """One call per ``START body END`` block; the body is JSON (Qwen, InternLM)."""

    starts: ClassVar[tuple[str, ...]] = ()
    end: ClassVar[str] = ""

    def __init__(self, *, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory=id_factory)
        self._in_block = False
        # Raw text of the open block (held whitespace + start marker): released
        # as content if the block turns out not to be a call.
        self._raw = ""

    def _decode(self, body: str) -> list[ToolCall] | None:
        return _calls_from_json(body.strip())

    def _step(self, final: bool) -> bool:
        if not self._in_block:
            if self._skip_whitespace_after_call():
                if final:
                    self._buf = ""
                return False
            found = self._text_until(self.starts, final)
            if found is None:
                return False
            ws, marker = found
            self._raw = ws + marker
            self._in_block = True
            return True
        pos = self._buf.find(self.end)
        if pos == -1 and not final:
            return False
        body = self._buf if pos == -1 else self._buf[:pos]
        rest = "" if pos == -1 else self._buf[pos + len(self.end) :]
        raw = self._raw + body + ("" if pos == -1 else self.end)
        # An unterminated block at the end of the stream is still a call when
        # its body decodes (the model may stop right after the JSON).
        calls = self._decode(body)
        if calls is None:
            self._content(raw)
            self._after_call = False
        else:
            for call in calls:
                self._call(call)
        self._buf = rest
        self._raw = ""
        self._in_block = False
        return True


class QwenToolCallParser(_TaggedToolCallParser):
    """Qwen2.5 / Qwen3 / Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

    Several blocks in a row are parallel calls. Source: SGLang
    ``function_call/qwen25_detector.py`` (bot ``<tool_call>\\n``, eot
    ``\\n</tool_call>``) and ``hermes_detector.py`` (no newlines, a JSON list
    accepted); LMDeploy ``serve/parsers/tool_parser/qwen3_tool_parser.py``.
    The newlines are matched as optional whitespace, so one parser serves all.
    """

    name = "qwen"
    starts = ("<tool_call>",)
    end = "</tool_call>"
    template_markers = ("<tool_call>",)
    call_opener = "<tool_call>\n"


class InternLMToolCallParser(_TaggedToolCallParser):
    """InternLM2 / 2.5 / Intern-S1: ``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>``.

    Source: LMDeploy ``serve/parsers/tool_parser/internlm2_tool_parser.py``
    (open ``<|action_start|><|plugin|>``, close ``<|action_end|>``, field
    ``parameters``) and SGLang ``function_call/internlm_detector.py``, which
    sees ``<|action_start|> <|plugin|>`` (a space, when special tokens are
    decoded with spaces between them); both spellings are accepted, and
    ``arguments`` as well as ``parameters``. ``<|action_start|><|interpreter|>``
    (code interpreter) is not a function call and stays content.
    """

    name = "internlm"
    starts = ("<|action_start|><|plugin|>", "<|action_start|> <|plugin|>")
    end = "<|action_end|>"
    template_markers = ("<|action_start|>",)
    call_opener = "<|action_start|><|plugin|>\n"
    arguments_key = "parameters"


class DeepSeekV3ToolCallParser(ToolCallParser):
    """DeepSeek-V3: a section of calls, each with a fenced JSON argument block::

        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
        ```json
        {...}
        ```<｜tool▁call▁end｜>\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

    Source: SGLang ``function_call/deepseekv3_detector.py`` (same tokens and
    ``func_detail_regex``). Each call is released when its
    ``<｜tool▁call▁end｜>`` arrives. A malformed call inside the section is
    released verbatim as content; text other than calls inside the section
    ends it (the section opener is then content unless a call came first).
    """

    name = "deepseekv3"
    section_begin: ClassVar[str] = "<｜tool▁calls▁begin｜>"
    section_end: ClassVar[str] = "<｜tool▁calls▁end｜>"
    call_begin: ClassVar[str] = "<｜tool▁call▁begin｜>"
    call_end: ClassVar[str] = "<｜tool▁call▁end｜>"
    template_markers = ("<｜tool▁calls▁begin｜>",)
    _detail = re.compile(r"(?P<type>[^<\n]*)<｜tool▁sep｜>(?P<name>[^\n]+)\n```json\n(?P<args>.*)\n```", re.DOTALL)

    def __init__(self, *, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory=id_factory)
        self._state = "text"  # text | section | call
        self._raw = ""  # section opener (and whitespace) not yet backed by a call
        self._section_has_call = False

    def _decode(self, body: str) -> ToolCall | None:
        m = self._detail.fullmatch(body)
        if m is None or m["type"] != "function":
            return None
        try:
            args = json.loads(m["args"])
        except ValueError:
            return None
        return _call_from_obj({"name": m["name"].strip(), "arguments": args})

    def _step(self, final: bool) -> bool:
        if self._state == "text":
            if self._skip_whitespace_after_call():
                if final:
                    self._buf = ""
                return False
            found = self._text_until((self.section_begin,), final)
            if found is None:
                return False
            ws, marker = found
            self._raw = ws + marker
            self._section_has_call = False
            self._state = "section"
            return True
        if self._state == "section":
            stripped = self._buf.lstrip()
            if not self._section_has_call:
                self._raw += self._buf[: len(self._buf) - len(stripped)]
            self._buf = stripped
            if stripped.startswith(self.call_begin):
                self._buf = stripped[len(self.call_begin) :]
                self._state = "call"
                return True
            if stripped.startswith(self.section_end):
                self._buf = stripped[len(self.section_end) :]
                if self._section_has_call:
                    self._after_call = True
                else:
                    self._content(self._raw + self.section_end)
                self._raw = ""
                self._state = "text"
                return True
            if not final and (
                not stripped or self.call_begin.startswith(stripped) or self.section_end.startswith(stripped)
            ):
                return False
            # Anything else leaves the section; an unclosed section at the end
            # of the stream simply ends.
            self._content(self._raw)
            self._raw = ""
            self._after_call = False
            self._state = "text"
            return bool(self._buf)
        # state == "call"
        pos = self._buf.find(self.call_end)
        if pos == -1 and not final:
            return False
        body = self._buf if pos == -1 else self._buf[:pos]
        self._buf = "" if pos == -1 else self._buf[pos + len(self.call_end) :]
        call = self._decode(body)
        if call is None:
            self._content(self._raw + self.call_begin + body + ("" if pos == -1 else self.call_end))
            self._after_call = False
        else:
            self._call(call)
            self._after_call = False  # whitespace inside a section is handled there
            self._section_has_call = True
        self._raw = ""
        self._state = "section"
        return True


class Llama3ToolCallParser(ToolCallParser):
    """Llama 3.1 / 3.2 / 3.3 JSON tool calls: ``<|python_tag|>{"name": ..., "parameters": {...}}``.

    The ``<|python_tag|>`` token is optional (engines that skip special
    tokens drop it, and the JSON-tool prompts of the templates do not ask
    for it), so a reply that starts (after whitespace) with ``{`` is read as
    calls too; several calls are separated by ``;``. Source: SGLang
    ``function_call/llama32_detector.py`` (``has_tool_call``: python tag or
    ``text.startswith("{")``; separator ``;``) and LMDeploy
    ``serve/parsers/tool_parser/llama3_tool_parser.py`` (field ``parameters``).

    An object is a call only with a ``name`` string and an object under
    ``parameters`` or ``arguments``; any other JSON reply stays content, and
    so does the built-in tools' Python syntax (``brave_search.call(...)``).
    A reply that starts with ``{`` is held until that object closes.
    Python-dict syntax (single quotes) is not accepted.
    """

    name = "llama3"
    python_tag: ClassVar[str] = "<|python_tag|>"
    template_markers = ("<|python_tag|>", "ipython")
    call_opener = ""  # the JSON-tool prompts of the templates ask for the bare object
    arguments_key = "parameters"

    def __init__(self, *, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory=id_factory)
        self._state = "start"  # start | text | calls
        self._raw = ""  # text of the call run not yet backed by a call
        self._run_has_call = False

    def _step(self, final: bool) -> bool:
        if self._state == "start":
            # Only a reply that opens with "{" is a marker-less call.
            stripped = self._buf.lstrip()
            if stripped.startswith("{"):
                self._raw = self._buf[: len(self._buf) - len(stripped)]
                self._buf = stripped
                self._run_has_call = False
                self._state = "calls"
                return True
            if not stripped and not final:
                return False
            self._state = "text"
            return True
        if self._state == "text":
            if self._skip_whitespace_after_call():
                if final:
                    self._buf = ""
                return False
            found = self._text_until((self.python_tag,), final)
            if found is None:
                return False
            ws, marker = found
            self._raw = ws + marker
            self._run_has_call = False
            self._state = "calls"
            return True
        # state == "calls": ws* OBJ (ws* ; ws* OBJ)*
        buf = self._buf
        i = 0
        while i < len(buf) and (buf[i].isspace() or (buf[i] == ";" and self._run_has_call)):
            i += 1
        if not self._run_has_call:
            self._raw += buf[:i]
        buf = self._buf = buf[i:]
        if not buf:
            if final:
                self._content(self._raw)
                self._raw = ""
            return False
        if buf[0] != "{":
            self._content(self._raw)
            self._raw = ""
            self._after_call = False
            self._state = "text"
            return True
        end = _json_object_end(buf, 0)
        if end == -1:
            if not final:
                return False
            end = len(buf)
        obj_text, self._buf = buf[:end], buf[end:]
        try:
            call = _call_from_obj(json.loads(obj_text), require_arguments=True)
        except ValueError:
            call = None
        if call is None:
            self._content(self._raw + obj_text)
            self._raw = ""
            self._after_call = False
            self._state = "text"
            return True
        self._call(call)
        self._raw = ""
        self._run_has_call = True
        return True


class NamedFunctionStream(ToolCallParser):
    """``tool_choice`` naming a function: decoding is constrained to that function's arguments (a JSON
    object, as vLLM does it), so the whole text is the one call's ``arguments``. Unlike the family
    parsers, the arguments stream as they are written: the first event carries the id and name, each
    later one a fragment of the text."""

    def __init__(self, function: str, *, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory=id_factory)
        self._function = function

    def _step(self, final: bool) -> bool:
        if self._calls == 0:
            self._events.append(ToolCallDelta(0, id=self._id_factory(), name=self._function))
            self._calls = 1
        # Trailing whitespace is held: after the object it is no part of the arguments.
        text = self._buf.rstrip()
        if text:
            self._events.append(ToolCallDelta(0, arguments=text))
        self._buf = "" if final else self._buf[len(text):]
        return False


class NativeNamedCallStream(ToolCallParser):
    """A named forced call in the family's own format: the constrained text is the call's JSON body
    ``{"name": NAME, "arguments"|"parameters": {...}}`` (name first, as the schema orders it). The
    call is announced once its arguments key arrives, and the arguments then stream as written, up
    to the object that closes them. Text that never reaches the key (an engine that ignored the
    constraint) is released as content."""

    _KEY = re.compile(r'"(?:arguments|parameters)"\s*:\s*')

    def __init__(self, function: str, *, id_factory: Callable[[], str] = new_call_id) -> None:
        super().__init__(id_factory=id_factory)
        self._function = function
        self._state = "head"  # head -> arguments -> done
        self._args = ""  # the arguments written so far

    def _step(self, final: bool) -> bool:
        if self._state == "head":
            key = self._KEY.search(self._buf)
            if key is None:
                if final:
                    self._content(self._buf)
                    self._buf = ""
                return False
            self._buf = self._buf[key.end() :]
            self._events.append(ToolCallDelta(0, id=self._id_factory(), name=self._function))
            self._calls, self._state = 1, "arguments"
            return True
        if self._state == "arguments":
            if not self._args:
                self._buf = self._buf.lstrip()  # before the object: the key's separator
            # Where the arguments object closes, counted over all of it (earlier fragments included).
            seen = self._args + self._buf
            end = _json_object_end(seen, 0) if seen.startswith("{") else -1
            if end != -1:
                text = seen[len(self._args) : end]
            else:  # all of it is theirs so far (trailing whitespace held until more comes)
                text = self._buf if final else self._buf.rstrip()
            if text:
                self._events.append(ToolCallDelta(0, arguments=text))
                self._args += text
            self._buf = self._buf[len(text) :]
            if end == -1 and not final:
                return False
            self._state = "done"
        self._buf = ""  # the body's closing brace (and a newline) after the arguments
        return False


class JSONArrayToolCallParser(ToolCallParser):
    """A forced call's constrained JSON: one ``{"name", "arguments"|"parameters"}`` object (the family's
    own call body, its opener in the prompt), or a JSON array of ``{"name", "parameters"}`` objects
    (vLLM's schema, for a model without a parser). Each call is released once its object closes."""

    def _step(self, final: bool) -> bool:
        stripped = self._buf.lstrip(" \t\r\n[,]")
        end = _json_object_end(stripped, 0) if stripped.startswith("{") else -1
        if end == -1:  # an object not closed yet; at the end, text that is not the constrained shape
            if final:
                self._content(stripped)
                self._buf = ""
            else:
                self._buf = stripped
            return False
        try:
            call = _call_from_obj(json.loads(stripped[:end]), require_arguments=True)
        except ValueError:
            call = None
        if call is None:
            self._content(stripped[:end])
        else:
            self._call(call)
        self._buf = stripped[end:]
        return True


def collect(events: Sequence[Event]) -> tuple[str, list[ToolCall]]:
    """Fold streamed events into ``(content, calls)``, as a non-streaming reply needs."""
    content: list[str] = []
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        else:
            if event.name is not None:
                names[event.index] = event.name
            args.setdefault(event.index, []).append(event.arguments)
    calls = [ToolCall(names[i], "".join(args[i])) for i in sorted(names)]
    return "".join(content), calls


def _merge_content(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if isinstance(event, ContentDelta) and out and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    # SGLang names: qwen, qwen25, hermes, llama3, deepseekv3, interns1;
    # LMDeploy names: qwen, qwen2d5, qwen3, llama3, internlm, intern-s1.
    "qwen": QwenToolCallParser,
    "qwen25": QwenToolCallParser,
    "qwen2d5": QwenToolCallParser,
    "qwen3": QwenToolCallParser,
    "hermes": QwenToolCallParser,
    "llama3": Llama3ToolCallParser,
    "internlm": InternLMToolCallParser,
    "intern-s1": InternLMToolCallParser,
    "interns1": InternLMToolCallParser,
    "deepseekv3": DeepSeekV3ToolCallParser,
}


def get_tool_call_parser(name: str) -> type[ToolCallParser]:
    """The parser class registered under ``name``; ValueError lists the known names."""
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool_call_parser {name!r}; known: {', '.join(sorted(TOOL_CALL_PARSERS))}"
        ) from None


def detect_tool_call_parser(chat_template: str) -> str | None:
    """The parser name for ``tool_call_parser: auto``, from markers in the chat template text.

    None when no family's marker is present (the template cannot render
    tool calls we know how to parse).
    """
    # Order matters: DeepSeek and InternLM tokens are unambiguous; Qwen's
    # <tool_call> is also used by Hermes-style fine-tunes of Llama, whose
    # templates mention neither python_tag nor ipython.
    for name in ("deepseekv3", "internlm", "qwen", "llama3"):
        if any(m in chat_template for m in TOOL_CALL_PARSERS[name].template_markers):
            return name
    return None
