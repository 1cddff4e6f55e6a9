"""Streaming text out of a growing list of token ids: UTF-8-safe deltas, stop-string cuts, and `DeltaMapper`,
which turns an engine's per-step token ids into the seam's `Delta`s the same way for every engine."""

from __future__ import annotations

from typing import Sequence

from deployments.engines.engine import Delta, FinishReason, SamplingParams

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


def logprob_entry(tokenizer, token_id: int, logprob: float, top_ids: Sequence[int], top_logprobs: Sequence[float]) -> list:
    """One `Delta.logprobs` entry, `[token_id, token_text, logprob, [[id, text, logprob], ...]]`, its texts
    `tokenizer.decode([id])` (special tokens included, as vLLM shows them)."""
    top = [[int(t), tokenizer.decode([int(t)]), float(lp)] for t, lp in zip(top_ids, top_logprobs)]
    return [int(token_id), tokenizer.decode([int(token_id)]), float(logprob), top]


class DeltaMapper:
    """Maps one request's generated token ids, step by step, to `Delta`s: the one place where ids become
    text (with `IncrementalDetokenizer`, so every engine streams the same text for the same tokens), stop
    strings are cut (`StopStringMatcher`), stop token ids end the request, and usage is counted.

    Each `feed` takes the ids an engine step added and, when the engine ended the request, why:

    - "stop" with `matched` the token id it stopped on (EOS or a stop token id), which is counted but is
      not part of the text; or the stop string it matched, whose token's text is kept and cut here. With
      `matched` None (LMDeploy does not say) the last token is that stop token, unless its text holds a
      stop string (LMDeploy stops on tokens that contain a stop word).
    - "length" or "abort".

    A requested stop token id ends the request wherever it comes, even in a step the engine did not end
    (engines run with ignore_eos do not stop on them): the ids after it are dropped. A stop string ends it
    in the step whose text completes it. Once a Delta has a finish_reason the request is over; when the
    engine had not ended it, the caller aborts it there.

    When the request asked for log-probs (`SamplingParams.logprobs` not None), each `feed` takes them too,
    one entry per id (see `Delta.logprobs`), and every Delta carries those of its ids, cut like the ids.
    """

    def __init__(self, tokenizer, sampling: SamplingParams, prompt_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._stop_strings = [s for s in sampling.stop if s]
        self._stop_ids = set(sampling.stop_token_ids)
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
        self._stopper = StopStringMatcher(self._stop_strings)
        self.prompt_tokens = len(prompt_token_ids)
        self.completion_tokens = 0
        self.finished = False
        self._wants_logprobs = sampling.logprobs is not None
        self._logprobs: list = []

    def feed(
        self,
        token_ids: Sequence[int],
        finish: FinishReason | None = None,
        matched: str | int | None = None,
        logprobs: Sequence | None = None,
    ) -> Delta | None:
        """The Delta for one step, or None when the step adds nothing (no ids, no text). `logprobs`: one
        entry per id of `token_ids`, required when the request asked for log-probs (ignored otherwise)."""
        if self.finished:
            raise RuntimeError("the request already finished")
        ids = list(token_ids)
        if self._wants_logprobs:
            self._logprobs = list(logprobs or [])
            if len(self._logprobs) != len(ids):
                raise RuntimeError(f"{len(self._logprobs)} log-prob entries for {len(ids)} token ids")
        cut = next((i for i, t in enumerate(ids) if t in self._stop_ids), None)
        if cut is not None:
            ids = ids[: cut + 1]
            self.completion_tokens += len(ids)
            return self._finish(ids[:-1], ids, "stop", ids[-1])
        self.completion_tokens += len(ids)
        if finish is None:
            text, stop_string = self._stopper.feed(self._detokenizer.add(ids))
            if stop_string is not None:
                self.finished = True
                return self._delta(text, ids, "stop", stop_string)
            if not ids and not text:
                return None
            return self._delta(text, ids)

        text_ids, stop_reason = ids, None
        if finish == "stop":
            if isinstance(matched, str):
                stop_reason = matched  # a stop string the engine matched, in case the text here does not show it whole
            elif matched in self._stop_ids:
                stop_reason = matched  # a stop token id the engine names but did not send
            elif ids and (matched is not None or not self._holds_stop_string(ids[-1])):
                text_ids = ids[:-1]  # the EOS token the engine stopped on
        return self._finish(text_ids, ids, finish, stop_reason)

    def _finish(self, text_ids: list[int], ids: list[int], finish: FinishReason, stop_reason) -> Delta:
        """The last Delta: the remaining text, cut at a stop string if one completes in it."""
        self.finished = True
        text, stop_string = self._stopper.feed(self._detokenizer.add(text_ids) + self._detokenizer.flush())
        if stop_string is not None:
            return self._delta(text, ids, "stop", stop_string)
        return self._delta(text + self._stopper.flush(), ids, finish, stop_reason)

    def _delta(self, text: str, ids: list[int], finish: FinishReason | None = None, stop_reason=None) -> Delta:
        # `ids` is always a prefix of the step's ids, so its log-probs are the same prefix.
        logprobs = self._logprobs[: len(ids)] if self._wants_logprobs else None
        return Delta(text, ids, self.prompt_tokens, self.completion_tokens, finish, stop_reason, logprobs)

    def _holds_stop_string(self, token_id: int) -> bool:
        if not self._stop_strings:
            return False
        text = self._tokenizer.decode([token_id], skip_special_tokens=True)
        return any(s in text for s in self._stop_strings)
