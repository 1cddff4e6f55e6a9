"""Reasoning parsers: split ``<think>...</think>`` output into reasoning and content.

Semantics follow SGLang's ``sglang/srt/parser/reasoning_parser.py``
(``DeepSeekR1Detector``, ``Qwen3Detector``), with one rule where SGLang's
streaming and one-shot paths disagree, so that here they cannot:

* ``deepseek-r1``: the model is reasoning from its first token
  (``force_reasoning``): everything before the first ``</think>`` is
  reasoning, the rest content. Leading ``<think>`` tags (R1-0528 emits one,
  R1 does not) are dropped. No ``</think>`` at all: everything is reasoning
  (the answer was cut off while thinking).
* ``qwen3``: reasoning only inside ``<think>...</think>``; text before the
  first ``<think>`` is content (SGLang's streaming behaviour). With
  ``enable_thinking=False`` (the template then puts an empty think block in
  the prompt) there is no reasoning: all text is content.
  Qwen3.5 may open ``<tool_call>`` without closing ``</think>``; as in SGLang
  (``tool_start_token``), a ``<tool_call>`` that no ``</think>`` follows ends
  the reasoning and goes, with all after it, to content. Since only the end
  of the stream proves that no ``</think>`` follows, reasoning text from a
  ``<tool_call>`` on is held until then.
* ``qwen3-thinking``: Qwen3 thinking-only models (the template opens
  ``<think>`` in the prompt): like ``deepseek-r1`` plus the ``<tool_call>`` rule.

Invariants:

* ``split(text)`` equals the concatenation of the streamed pieces for ``text``
  fed in any chunking (decisions depend on the text, never on chunk borders).
* Nothing is stripped but the tags: reasoning + content + the removed tags
  == text. Whitespace (Qwen3's ``"\\n"`` after ``<think>``) is kept; callers
  that want it trimmed trim it.
* Partial tags are held back until decided, never released half.

Pure standard library: the gateway process imports this module.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "REASONING_PARSERS",
    "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser",
    "Qwen3ThinkingReasoningParser",
    "ReasoningParser",
    "get_reasoning_parser",
]


def _partial_len(text: str, tokens: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a token."""
    best = 0
    for token in tokens:
        for n in range(min(len(text), len(token) - 1), best, -1):
            if text.endswith(token[:n]):
                best = n
                break
    return best


class ReasoningParser:
    """Streaming ``<think>`` splitter for one request.

    ``feed(delta)`` and ``finish()`` return ``(reasoning_delta, content_delta)``;
    either may be empty.
    """

    name: ClassVar[str] = ""
    think_start: ClassVar[str] = "<think>"
    think_end: ClassVar[str] = "</think>"
    # The reply begins inside the reasoning block (no <think> needed).
    force_reasoning: ClassVar[bool] = False
    # A token that, when no </think> follows it, ends the reasoning block.
    tool_start: ClassVar[str | None] = None

    def __init__(self, *, enable_thinking: bool = True) -> None:
        self._buf = ""
        self._finished = False
        # open: dropping leading <think>s; before: content until <think>;
        # reasoning; tool_hold: held from a tool_start until </think> or the end;
        # content: everything else is content.
        if not enable_thinking:
            self._state = "content"
        elif self.force_reasoning:
            self._state = "open"
        else:
            self._state = "before"

    @property
    def thinking(self) -> bool:
        """Whether the text so far leaves the model inside its reasoning block (for counting tokens)."""
        return self._state in ("open", "reasoning", "tool_hold")

    def feed(self, text: str) -> tuple[str, str]:
        """``(reasoning, content)`` decided by the text so far, after adding ``text``."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what is held back; the parser is spent afterwards."""
        if self._finished:
            return "", ""
        self._finished = True
        return self._drain(final=True)

    @classmethod
    def split(cls, text: str, *, enable_thinking: bool = True) -> tuple[str, str]:
        """One-shot ``(reasoning, content)``, equal to streaming ``text`` in any chunking."""
        parser = cls(enable_thinking=enable_thinking)
        r1, c1 = parser.feed(text)
        r2, c2 = parser.finish()
        return r1 + r2, c1 + c2

    def _drain(self, *, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            state, buf = self._state, self._buf
            if state == "content":
                content.append(buf)
                self._buf = ""
                break
            if state == "open":
                if buf.startswith(self.think_start):
                    self._buf = buf[len(self.think_start) :]
                    continue
                if not final and self.think_start.startswith(buf):
                    break  # "" or a partial <think>: undecided
                self._state = "reasoning"
                continue
            if state == "before":
                pos = buf.find(self.think_start)
                if pos != -1:
                    content.append(buf[:pos])
                    self._buf = buf[pos + len(self.think_start) :]
                    self._state = "reasoning"
                    continue
                hold = 0 if final else _partial_len(buf, (self.think_start,))
                content.append(buf[: len(buf) - hold])
                self._buf = buf[len(buf) - hold :]
                break
            if state == "reasoning":
                end = buf.find(self.think_end)
                tool = buf.find(self.tool_start) if self.tool_start else -1
                if tool != -1 and (end == -1 or tool < end):
                    reasoning.append(buf[:tool])
                    self._buf = buf[tool:]
                    self._state = "tool_hold"
                    continue
                if end != -1:
                    reasoning.append(buf[:end])
                    self._buf = buf[end + len(self.think_end) :]
                    self._state = "content"
                    continue
                tokens = (self.think_end,) + ((self.tool_start,) if self.tool_start else ())
                hold = 0 if final else _partial_len(buf, tokens)
                reasoning.append(buf[: len(buf) - hold])
                self._buf = buf[len(buf) - hold :]
                break
            # state == "tool_hold": buf starts with tool_start
            end = buf.find(self.think_end)
            if end != -1:
                # A </think> follows: the tool tag was only mentioned while thinking.
                reasoning.append(buf[:end])
                self._buf = buf[end + len(self.think_end) :]
                self._state = "content"
                continue
            if final:
                content.append(buf)
                self._buf = ""
            break
        return "".join(reasoning), "".join(content)


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 (SGLang ``deepseek-r1``): reasoning until the first ``</think>``."""

    name = "deepseek-r1"
    force_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3 hybrid models (SGLang ``qwen3``): reasoning only inside ``<think>...</think>``."""

    name = "qwen3"
    tool_start = "<tool_call>"


class Qwen3ThinkingReasoningParser(ReasoningParser):
    """Qwen3 thinking-only models (SGLang ``qwen3-thinking``): ``<think>`` is in the prompt."""

    name = "qwen3-thinking"
    force_reasoning = True
    tool_start = "<tool_call>"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser, Qwen3ThinkingReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered under ``name``; ValueError lists the known names."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning_parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}"
        ) from None
