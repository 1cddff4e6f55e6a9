"""The engine seam: what every inference engine adapter offers to the base-model deployment.

Engines speak tokens and text, never HTTP. Everything OpenAI-shaped (chat templates, SSE framing,
usage, error bodies) is rendered once, above them, in the gateway and the base-model deployment.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Literal

FinishReason = Literal["stop", "length", "abort"]


class EngineError(RuntimeError):
    """An engine-side failure of one request (the replica itself stays healthy)."""


class PromptTooLongError(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_model_len: int, max_tokens: int | None = None):
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        if max_tokens is None or prompt_tokens >= max_model_len:
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
        return (type(self), (self.prompt_tokens, self.max_model_len, self.max_tokens))


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
    running totals, so the last delta carries the request's usage.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the request, when finish_reason == "stop".
    stop_reason: str | int | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the KV cache in use, 0..1
    tokens_per_s: float = 0.0  # generated tokens per second over a recent window
    healthy: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class Engine(abc.ABC):
    """An inference engine adapter. One instance per base-model replica."""

    #: the engine name used in config (`transformers`, `turbomind`, ...)
    name: str = ""

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
    async def score(self, prompt: str, continuations: list[str]) -> list[float]:
        """Sum of the log-probabilities of each continuation's tokens given the prompt."""

    @abc.abstractmethod
    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        """For each sequence, the log-probability of every token given the tokens before it
        (None for the first token). Backs SGLang's `select` and `/generate` with `return_logprob`."""

    async def flush_cache(self) -> int:
        """Drop the prefix cache kept for reuse across requests; returns the blocks freed.
        Engines without a cross-request cache have nothing to drop."""
        return 0

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load, for routing and autoscaling."""

    @abc.abstractmethod
    def check_health(self) -> None:
        """Raise if the engine can no longer serve (e.g. its loop died)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """The context length in tokens."""
