"""The engine seam: what every inference engine adapter offers to the base-model deployment.

Engines speak tokens and text, never HTTP. Everything OpenAI-shaped (chat templates, SSE framing,
usage, error bodies) is rendered once, above them, in the gateway and the base-model deployment.
"""

from __future__ import annotations

import abc
import asyncio
import json
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Sequence

FinishReason = Literal["stop", "length", "abort"]

#: The JSON schema of "any JSON object": OpenAI's `response_format: {"type": "json_object"}` is
#: this `json_schema` constraint on every engine.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


class EngineError(RuntimeError):
    """An engine-side failure of one request (the replica itself stays healthy)."""


class PromptTooLongError(ValueError):
    """The prompt plus the requested tokens do not fit the model's context. `prompt_chars` (with
    `prompt_tokens` None): a text prompt refused before tokenization, because it has more characters
    than the context's tokens can hold."""

    def __init__(self, prompt_tokens: int | None, max_model_len: int, max_tokens: int | None = None, prompt_chars: int | None = None):
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        self.prompt_chars = prompt_chars
        if prompt_tokens is None:
            msg = (
                f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                f"{prompt_chars} characters, more than {max_model_len} tokens of this model can hold."
            )
        elif max_tokens is None or prompt_tokens >= max_model_len:
            msg = (
                f"This model's maximum context length is {max_model_len} tokens, "
                f"but the prompt has {prompt_tokens} tokens."
            )
        else:
            msg = (
                f"This model's maximum context length is {max_model_len} tokens, but "
                f"{prompt_tokens + max_tokens} tokens were requested ({prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or max_tokens."
            )
        super().__init__(msg)

    def __reduce__(self):
        # Crosses process boundaries (replica -> gateway) with its numbers intact.
        return (type(self), (self.prompt_tokens, self.max_model_len, self.max_tokens, self.prompt_chars))


@dataclass
class SamplingParams:
    """Per-request sampling. temperature == 0 means exact greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Constrained decoding (at most one of these): a regular expression or a JSON schema (as a JSON string).
    regex: str | None = None
    json_schema: str | None = None
    # Logit adjustments, OpenAI / vLLM semantics. They apply to greedy requests too, except min_p.
    presence_penalty: float = 0.0  # [-2, 2]: minus this from the logit of every token the completion holds
    frequency_penalty: float = 0.0  # [-2, 2]: minus this x the token's count in the completion
    repetition_penalty: float = 1.0  # > 0: tokens of the prompt or completion: logit / p if > 0, else logit * p
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the completion before this many tokens
    min_p: float = 0.0  # [0, 1]: sampled requests drop tokens below min_p x the top token's probability
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> [-100, 100], added to its logit
    # Log-probabilities of the generated tokens (OpenAI `logprobs` / `top_logprobs`): None: none; 0: the
    # chosen token's only; k in 1..MAX_LOGPROBS: also the k most likely tokens. See `Delta.logprobs`.
    logprobs: int | None = None

    def adjusts_logits(self) -> bool:
        """Whether any of the logit adjustments above is not the identity."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.min_tokens
            or self.logit_bias
        )


#: The most alternatives per position a request may ask for (OpenAI's `top_logprobs` limit).
MAX_LOGPROBS = 20


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_constraint(regex: Any, json_schema: Any) -> None:
    """Cheap checks of a request's constraint fields (types, at most one, JSON syntax); compiling does
    the rest. Raises ValueError."""
    if regex is not None and json_schema is not None:
        raise ValueError("give at most one of regex and json_schema")
    if regex is not None and (not isinstance(regex, str) or not regex):
        raise ValueError(f"regex must be a non-empty string, got {regex!r}")
    if json_schema is not None:
        if not isinstance(json_schema, str):
            raise ValueError(f"json_schema must be a JSON schema as a JSON string, got {type(json_schema).__name__}")
        try:
            schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"json_schema must be a JSON object (or boolean) schema, got {json_schema!r}")


def validate_sampling(sp: SamplingParams, vocab_size: int | None = None) -> None:
    """The checks every engine makes of a request's sampling (engines add their own limits).
    Raises ValueError naming the field."""
    if not _is_int(sp.max_tokens) or sp.max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {sp.max_tokens!r}")
    if not _is_number(sp.temperature) or sp.temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {sp.temperature!r}")
    if not _is_number(sp.top_p) or not 0 < sp.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sp.top_p!r}")
    if not _is_int(sp.top_k) or sp.top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {sp.top_k!r}")
    if sp.seed is not None and not _is_int(sp.seed):
        raise ValueError(f"seed must be an integer, got {sp.seed!r}")
    if not isinstance(sp.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in sp.stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {sp.stop!r}")
    ids_ok = isinstance(sp.stop_token_ids, (list, tuple)) and all(
        _is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in sp.stop_token_ids
    )
    if not ids_ok:
        limit = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"stop_token_ids must be token ids {limit}, got {sp.stop_token_ids!r}")
    if not isinstance(sp.ignore_eos, bool):
        raise ValueError(f"ignore_eos must be a boolean, got {sp.ignore_eos!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sp, name)
        if not _is_number(value) or not -2 <= value <= 2:
            raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
    if not _is_number(sp.repetition_penalty) or sp.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1 disables it), got {sp.repetition_penalty!r}")
    if not _is_int(sp.min_tokens) or not 0 <= sp.min_tokens <= sp.max_tokens:
        raise ValueError(f"min_tokens must be an integer in [0, max_tokens={sp.max_tokens}], got {sp.min_tokens!r}")
    if not _is_number(sp.min_p) or not 0 <= sp.min_p <= 1:
        raise ValueError(f"min_p must be a number in [0, 1], got {sp.min_p!r}")
    if not isinstance(sp.logit_bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {sp.logit_bias!r}")
    for token, bias in sp.logit_bias.items():
        if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"logit_bias keys must be token ids {limit}, got {token!r}")
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")
    if sp.logprobs is not None and (not _is_int(sp.logprobs) or not 0 <= sp.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {sp.logprobs!r}")
    validate_constraint(sp.regex, sp.json_schema)


# Text longer than this is tokenized in a worker thread, so that no prompt holds the event loop (and
# Serve's health checks) for long; shorter text tokenizes faster than a hop to a thread and back.
OFF_LOOP_CHARS = 16_384


async def off_loop_if_long(chars: int, fn, *args):
    if chars > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def continuation_sequences(tokenizer, prompt: str, continuations: list[str]) -> list[tuple[list[int], int]]:
    """For `score`: each continuation as (token ids of prompt + continuation, index of its first
    token). Tokens can merge across the boundary, so the joined text is tokenized as the model would
    see it and everything after the common prefix with the prompt's own tokens is scored."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    sequences = []
    for continuation in continuations:
        full_ids = list(tokenizer(prompt + continuation)["input_ids"])
        start = _common_prefix_len(prompt_ids, full_ids)
        if start == 0:
            # The boundary merge swallowed the whole prompt: fall back to separate tokenization.
            full_ids = prompt_ids + list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            start = len(prompt_ids)
        if start == 0:
            raise ValueError("the prompt is empty: there is no context to score a continuation against")
        sequences.append((full_ids, start))
    return sequences


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class GenerationRequest:
    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None


@dataclass
class Delta:
    """One streamed increment of a generation.

    `text` never ends inside an incomplete UTF-8 sequence and never contains text past a stop string.
    The last delta of a request has `finish_reason` set; `prompt_tokens` and `completion_tokens` are
    running totals, so the last delta carries the request's usage. (Every engine builds its deltas with
    `text.DeltaMapper`, which keeps these.)

    `logprobs` is None unless the request asked for them (`SamplingParams.logprobs` not None); then it is a
    list aligned with `token_ids` (one entry per id, same order, also in a delta whose ids are cut at a stop
    token), each entry `[token_id, token_text, logprob, top]`: the id, `tokenizer.decode([token_id])` (a piece
    of a multi-byte character decodes to U+FFFD), its log-probability, and `top`, the `SamplingParams.logprobs`
    most likely tokens as `[token_id, token_text, logprob]`, most likely first (empty for 0). Log-probabilities
    are those of the RAW model distribution: log_softmax of the logits before temperature, penalties,
    logit_bias and grammar masks (vLLM's default "raw_logprobs"), so a greedy request without logit knobs
    has its token as top[0] with the same logprob. Plain lists, ints, floats and str: Deltas cross processes.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the request, when finish_reason == "stop".
    stop_reason: str | int | None = None
    # Per-token log-probs, aligned with token_ids, when the request asked for them (see above).
    logprobs: list | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the KV cache in use, 0..1
    tokens_per_s: float = 0.0  # generated tokens per second over a recent window
    healthy: bool = True
    # Prefix cache, since the engine started: prompt tokens of finished prefills, and how many of them
    # came from the cache instead of being computed. None: the engine cannot tell.
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class RateMeter:
    """Events per second over the last `window_s` seconds (thread-safe: stats may be read off-loop)."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        if count <= 0:
            return
        now = self._clock()
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def rate(self) -> float:
        with self._lock:
            self._trim(self._clock())
            return sum(count for _, count in self._events) / self._window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()


class Engine(abc.ABC):
    """An inference engine adapter. One instance per base-model replica.

    The request work every engine shares is done here, once: prompt -> token ids with their checks, the
    context-fit check, `prompt_logprobs`' input checks, `score` (on top of the engine's `prompt_logprobs`),
    and health (`check_health`, and `stats().healthy`, from the one hook `_health_error`). Adapters set
    `_tokenizer` (the model's Hugging Face tokenizer; None until `start()` where the engine loads its own)
    and `_vocab_size` (the model's vocabulary: valid token ids are [0, _vocab_size)).
    """

    #: the engine name used in config (`transformers`, `turbomind`, ...)
    name: str = ""
    #: Context a sequence to score needs beyond its own tokens: engines that score a sequence by
    #: running it as a prompt need room for one more step.
    scoring_headroom: int = 0

    _tokenizer: Any = None
    _vocab_size: int = 0
    _longest_token: int | None = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the engine's serving loop."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the loop and free the engine's resources."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for one request. Closing the iterator early cancels the request and frees its slot."""

    @abc.abstractmethod
    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        """For each sequence, the log-probability of every token given the tokens before it
        (None for the first token). Backs SGLang's `select` and `/generate` with `return_logprob`.
        Adapters check their input with `_logprob_sequences`."""

    async def flush_cache(self) -> int:
        """Drop the prefix cache kept for reuse across requests; returns the blocks freed.
        Engines without a cross-request cache have nothing to drop."""
        return 0

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load, for routing and autoscaling (`healthy`: `self.healthy()`)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """The context length in tokens."""

    # -- health ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def _health_error(self) -> str | None:
        """Why the engine cannot serve now (`self._not_started()` before `start()` and after `shutdown()`,
        a dead loop, ...), or None when it can. The engine's one health hook."""

    def _not_started(self) -> str:
        return f"the {self.name} engine is not started"

    def check_health(self) -> None:
        """Raise EngineError if the engine cannot serve (not started, its loop died, ...). Every request
        starts with this check."""
        error = self._health_error()
        if error is not None:
            raise EngineError(error)

    def healthy(self) -> bool:
        return self._health_error() is None

    # -- request checks --------------------------------------------------------------------------

    async def _prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        return await self.prompt_ids(request.prompt, request.prompt_token_ids)

    async def prompt_ids(self, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
        """A prompt as token ids: exactly one of `prompt` (tokenized with the tokenizer's default
        special tokens: the caller has already applied any chat template) and `prompt_token_ids` (ids in
        [0, vocab)); never empty. Raises ValueError, PromptTooLongError for a prompt longer than the context.

        A prompt can be megabytes (a request body may be): text longer than the context can hold in any
        tokenization is refused before tokenizing (`check_prompt_chars`), and long text is tokenized in a
        worker thread (`OFF_LOOP_CHARS`), so no prompt holds the replica's event loop (its health checks)."""
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if prompt is not None:
            if self._tokenizer is None:
                raise EngineError(f"the {self.name} engine has no tokenizer for prompt text")
            self.check_prompt_chars(len(prompt))
            ids = list((await off_loop_if_long(len(prompt), self._tokenizer, prompt))["input_ids"])
        else:
            ids = prompt_token_ids
            if len(ids) > self.max_model_len:
                raise PromptTooLongError(len(ids), self.max_model_len)
            ids = list(ids)
            self._check_token_ids(ids, "prompt_token_ids")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def check_prompt_chars(self, chars: int) -> None:
        """Raise PromptTooLongError when `chars` characters of text cannot fit the context however they
        tokenize: more than `max_model_len` times the longest token's characters. Costs nothing."""
        if chars > self.max_model_len * self._max_token_chars():
            raise PromptTooLongError(None, self.max_model_len, prompt_chars=chars)

    def _max_token_chars(self) -> int:
        """Characters in the vocabulary's longest token (its stored form: one char per byte in
        byte-level BPE, so never fewer than the text it stands for), computed once."""
        if self._longest_token is None:
            self._longest_token = max((len(t) for t in self._tokenizer.get_vocab()), default=1)
        return self._longest_token

    def _check_token_ids(self, ids: Sequence[Any], what: str) -> None:
        vocab = self._vocab_size
        if not all(_is_int(t) and 0 <= t < vocab for t in ids):
            raise ValueError(f"{what} must be token ids in [0, {vocab})")

    def _check_fits(self, prompt_tokens: int, max_tokens: int | None = None) -> None:
        """Raise PromptTooLongError unless `prompt_tokens` plus `max_tokens` generated tokens fit the context.
        max_tokens None: a sequence to score, which needs `scoring_headroom` more."""
        limit = self.max_model_len
        extra = self.scoring_headroom if max_tokens is None else max_tokens
        if prompt_tokens + extra > limit:
            raise PromptTooLongError(prompt_tokens, limit, max_tokens)

    def _logprob_sequences(self, token_ids: Any) -> list[list[int]]:
        """`prompt_logprobs`' input checked: a list of token-id lists, each id in [0, vocab), each sequence
        fitting the context. Raises ValueError (PromptTooLongError for length)."""
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(ids, (list, tuple)) for ids in token_ids):
            raise ValueError("token_ids must be a list of token-id lists")
        sequences = [list(ids) for ids in token_ids]
        for ids in sequences:
            self._check_token_ids(ids, "token_ids")
            self._check_fits(len(ids))
        return sequences

    # -- scoring ---------------------------------------------------------------------------------

    async def score(self, prompt: str, continuations: list[str]) -> list[float]:
        """Sum of the log-probabilities of each continuation's tokens given the prompt, from the engine's
        `prompt_logprobs` of prompt + continuation (see `continuation_sequences`)."""
        self.check_health()
        if not isinstance(prompt, str) or not all(isinstance(c, str) for c in continuations):
            raise ValueError("prompt and continuations must be strings")
        if not continuations:
            return []
        if self._tokenizer is None:
            raise EngineError(f"the {self.name} engine has no tokenizer to score text")
        self.check_prompt_chars(len(prompt) + max(len(c) for c in continuations))
        chars = len(prompt) + sum(len(c) for c in continuations)
        sequences = await off_loop_if_long(chars, continuation_sequences, self._tokenizer, prompt, list(continuations))
        for full_ids, _ in sequences:
            self._check_fits(len(full_ids))
        logprobs = await self.prompt_logprobs([ids for ids, _ in sequences])
        # Only the first token has no log-prob, and every continuation starts after it.
        return [math.fsum(lps[start:]) for lps, (_, start) in zip(logprobs, sequences)]
