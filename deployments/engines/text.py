"""Streaming text out of a growing list of token ids: UTF-8-safe deltas and stop-string cuts."""

from __future__ import annotations

from typing import Sequence

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids, fed a few at a time, into text deltas that never end inside a UTF-8 character.

    Byte-level tokenizers split multi-byte characters (most CJK characters, emoji) across tokens, and
    decoding half a character yields U+FFFD. So instead of decoding new ids alone, this decodes a short
    sliding window (the prefix_offset / read_offset scheme of vLLM and TGI): `ids[prefix:read]` is text
    already emitted, `ids[prefix:]` is that text plus the pending ids, and the difference is emitted
    only once it no longer ends in U+FFFD. The window also keeps tokenizers that drop a leading space
    at the start of a decode (SentencePiece) from losing spaces between deltas.

    The concatenation of all `add()` results and `flush()` equals
    `tokenizer.decode(ids, skip_special_tokens=...)` of the ids added.
    """

    # Prompt tokens decoded as leading context for the first generated tokens.
    _PROMPT_CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids or [])[-self._PROMPT_CONTEXT_TOKENS :]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Adds generated ids; returns the text that became complete (possibly empty)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing visible yet, or an incomplete character: wait for more bytes
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Returns whatever is still held back (an invalid byte sequence decodes to U+FFFD here)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Cuts streamed text just before the earliest stop string (OpenAI semantics: the stop string itself
    is not returned) and holds back any tail that could still grow into one, so that no streamed chunk
    ever contains a stop string or a piece of one."""

    def __init__(self, stop: Sequence[str]):
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Adds text; returns (text safe to emit, the stop string that matched or None). After a match,
        the text from the stop string on is dropped and the caller should finish the request."""
        self._pending += text
        if not self._stop:
            return self.flush(), None
        # Emitted text never holds the start of a stop string (it would have been held back), so
        # searching the pending text is enough.
        hit = min(((i, s) for s in self._stop if (i := self._pending.find(s)) >= 0), key=lambda m: m[0], default=None)
        if hit is not None:
            index, stop = hit
            safe, self._pending = self._pending[:index], ""
            return safe, stop
        held = self._partial_match_len()
        cut = len(self._pending) - held
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe, None

    def flush(self) -> str:
        """Returns the held-back text, once no more text will come."""
        text, self._pending = self._pending, ""
        return text

    def _partial_match_len(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        n = len(self._pending)
        for start in range(max(0, n - self._longest + 1), n):
            tail = self._pending[start:]
            if any(s.startswith(tail) for s in self._stop):
                return n - start
        return 0
