"""The base-model deployment: one engine per Ray Serve replica.

Handle methods (the same ones the gateway uses; Python callers inside the cluster use them too):

- `stream(prompt=... | messages=... | prompt_token_ids=..., **sampling)` -> async iterator of delta
  dicts (call with `handle.options(stream=True)`). A bad request raises before the first delta.
- `complete(...)` / `chat(messages, ...)` -> one dict with the full text, finish reason and usage.
- `score(prompt, continuations)` -> log-probabilities, `stats()`, `model_info()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator

from jinja2 import TemplateError
from ray import serve

from deployments import metrics
from deployments.replica import in_replica
from deployments.engines.engine import Delta, GenerationRequest, SamplingParams, off_loop_if_long
from deployments.engines.registry import create_engine
from deployments.models.builtin import resolve_model_source

logger = logging.getLogger("ray.serve")

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def sampling_from_kwargs(kwargs: dict[str, Any]) -> SamplingParams:
    unknown = sorted(set(kwargs) - _SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {unknown}; allowed: {sorted(_SAMPLING_FIELDS)}")
    return SamplingParams(**kwargs)


def _delta_dict(delta: Delta) -> dict:
    return dataclasses.asdict(delta)


def _merge(deltas: list[Delta]) -> Delta:
    """Consecutive deltas of one request as one (running totals and finish come from the last)."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    logprobs = None if last.logprobs is None else [e for d in deltas for e in (d.logprobs or [])]
    return dataclasses.replace(
        last,
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=logprobs,
    )


class BaseModelServer:
    """One replica: loads the tokenizer (for chat templates) and one engine."""

    async def __init__(
        self,
        model_name: str,
        source: str,
        engine: str,
        engine_args: dict | None = None,
        stream_interval_ms: float = 0.0,
        stream_chunks_per_s: float = 0.0,
        pool: str | None = None,
        device_count: int = 1,
    ):
        from transformers import AutoTokenizer

        started = time.monotonic()
        what = f"base model {model_name}" + (f" (pool {pool})" if pool else "")
        logger.info("%s: loading %s with engine %s (step 1/3: model files)", what, source, engine)
        # Resolved here, on the replica's node: a builtin model is built into (or an HF repo id
        # downloaded to) that node's cache.
        model_path = str(await asyncio.to_thread(resolve_model_source, source))
        logger.info("%s: step 2/3: tokenizer (%.1f s)", what, time.monotonic() - started)
        self.model_name = model_name
        self.pool = pool  # None: the model has a single pool
        self.source = source
        self.stream_interval_s = stream_interval_ms / 1000
        self.stream_chunks_per_s = stream_chunks_per_s
        self._live_streams = 0  # streams being coalesced now (see `_stream_interval`)
        self.engine_name = engine
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine = create_engine(engine, model_path, dict(engine_args or {}), self.tokenizer, device_count)
        logger.info("%s: step 3/3: starting the %s engine (%.1f s)", what, engine, time.monotonic() - started)
        await self.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id if in_replica() else "local"
        if in_replica():
            self._engine_gauges = metrics.start_engine_gauges(self)  # queue depth / KV cache for Prometheus
        logger.info("%s ready on replica %s (engine %s) in %.1f s", what, self.replica_id, engine, time.monotonic() - started)

    # -- prompt rendering ------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """Messages -> prompt text through the model's own chat template, which also renders `tools`
        (OpenAI function tools) and takes `chat_template_kwargs` (e.g. enable_thinking)."""
        if not messages:
            raise ValueError("messages must contain at least one message")
        if self.tokenizer.chat_template is None:
            raise ValueError(f"model {self.model_name!r} has no chat template; use the completions API")
        # Refuse what cannot fit before rendering megabytes through the template.
        self.engine.check_prompt_chars(sum(len(m.get("content") or "") for m in messages if isinstance(m, dict)))
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}),
            )
        except TemplateError as e:
            # Templates refuse what they cannot render (Qwen's: "System message must be at the
            # beginning."): the client's messages, a 400 with the template's own words.
            raise ValueError(f"the chat template of model {self.model_name!r} cannot render these messages: {e}") from None

    def _request(self, prompt, messages, prompt_token_ids, request_id, sampling: dict, tools=None,
                 chat_template_kwargs=None, assistant_prefix=None) -> GenerationRequest:
        given = [x is not None for x in (prompt, messages, prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if (tools is not None or chat_template_kwargs is not None or assistant_prefix is not None) and messages is None:
            raise ValueError("tools, chat_template_kwargs and assistant_prefix go with messages (they are chat template inputs)")
        if messages is not None:
            # assistant_prefix: the start of the answer, written by the caller (a forced tool call's opener).
            prompt = self.render_chat(messages, tools=tools, chat_template_kwargs=chat_template_kwargs) + (assistant_prefix or "")
        return GenerationRequest(
            request_id=request_id or uuid.uuid4().hex,
            sampling=sampling_from_kwargs(sampling),
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids) if prompt_token_ids is not None else None,
        )

    # -- handle methods --------------------------------------------------------------------------

    @metrics.record_model_stream
    async def stream(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        assistant_prefix: str | None = None,
        **sampling,
    ) -> AsyncIterator[dict]:
        request = self._request(prompt, messages, prompt_token_ids, request_id, sampling, tools, chat_template_kwargs, assistant_prefix)
        deltas = self.engine.generate(request)
        if self.stream_interval_s > 0 or self.stream_chunks_per_s > 0:
            deltas = self._coalesced(deltas)
        # The first delta names the replica (the gateway's x-tandem-replica header: where routing sent it).
        replica = self.replica_id
        try:
            async for delta in deltas:
                out = _delta_dict(delta)
                if replica is not None:
                    out["replica"], replica = replica, None
                yield out
        finally:
            await deltas.aclose()

    def _stream_interval(self) -> float:
        """Seconds between one stream's messages now: `stream_interval_ms`, or longer when the
        replica's live streams would together send more than `stream_chunks_per_s`."""
        if self.stream_chunks_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, self._live_streams / self.stream_chunks_per_s)

    async def _coalesced(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """The engine's deltas, merged: every yielded item is one Ray message to the caller (and on to
        the HTTP proxy), and under load one message per token costs more than decoding it. The first
        delta and the last go out at once (time to first token, end of stream); in between, one
        merged message per `_stream_interval()`."""
        loop = asyncio.get_running_loop()
        pending: list[Delta] = []
        wake = asyncio.Event()  # set when there is something to send, or it is time to send it
        state = {"ended": False, "closing": False, "error": None}

        async def pump():
            try:
                async for delta in deltas:
                    pending.append(delta)
                    if delta.finish_reason is not None:
                        state["closing"] = True
                        wake.set()
                    elif len(pending) == 1:
                        wake.set()
            except BaseException as e:  # noqa: BLE001 - re-raised to the consumer below
                state["error"] = e
            finally:
                state["ended"] = True
                wake.set()
                # Closing the engine's iterator cancels the request there and frees its slot, also
                # when our caller went away (client disconnect -> Serve cancels this generator).
                await deltas.aclose()

        task = asyncio.create_task(pump())
        timer: asyncio.TimerHandle | None = None
        last_sent: float | None = None  # None until the first message
        self._live_streams += 1
        try:
            while True:
                await wake.wait()
                wake.clear()
                if state["error"] is not None:
                    raise state["error"]
                if not pending:
                    if state["ended"]:
                        return
                    continue
                due = last_sent is None or state["closing"] or state["ended"]
                if not due:
                    at = last_sent + self._stream_interval()
                    if loop.time() < at:
                        if timer is None:  # one wake-up per message, not one per token
                            timer = loop.call_at(at, wake.set)
                        continue
                if timer is not None:
                    timer.cancel()
                    timer = None
                batch = pending[:]
                pending.clear()
                last_sent = loop.time()
                merged = _merge(batch)
                yield merged
                if merged.finish_reason is not None:
                    return
        finally:
            self._live_streams -= 1
            if timer is not None:
                timer.cancel()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def complete(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        assistant_prefix: str | None = None,
        **sampling,
    ) -> dict:
        text, token_ids, logprobs, last = [], [], None, None
        async for delta in self.stream(
            prompt, messages, prompt_token_ids, request_id, tools, chat_template_kwargs, assistant_prefix, **sampling
        ):
            text.append(delta["text"])
            token_ids += delta["token_ids"]
            if delta.get("logprobs") is not None:
                logprobs = (logprobs or []) + delta["logprobs"]
            last = delta
        return {
            "text": "".join(text),
            "token_ids": token_ids,
            "logprobs": logprobs,  # with sampling logprobs=k: [token id, text, logprob, top] per token id
            "finish_reason": last["finish_reason"],
            "stop_reason": last["stop_reason"],
            "usage": {
                "prompt_tokens": last["prompt_tokens"],
                "completion_tokens": last["completion_tokens"],
                "total_tokens": last["prompt_tokens"] + last["completion_tokens"],
            },
            "replica": self.replica_id,
        }

    async def chat(self, messages: list[dict], **kwargs) -> dict:
        return await self.complete(messages=messages, **kwargs)

    async def score(self, prompt: str, continuations: list[str]) -> list[float]:
        if not continuations:
            raise ValueError("continuations must not be empty")
        return await self.engine.score(prompt, list(continuations))

    async def prompt_logprobs(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None, start: int = 0) -> dict:
        """Log-probabilities of the prompt's own tokens from position `start` on, as SGLang's
        `input_token_logprobs`: [[logprob or None, token id, token text], ...]."""
        # Tokenized and checked as the engine does a generation's prompt; the engine's prompt_logprobs
        # checks that the sequence fits the context, so it runs even when no log-prob is asked for.
        ids = await self.engine.prompt_ids(prompt, prompt_token_ids)
        start = len(ids) if start < 0 else min(start, len(ids))
        logprobs = (await self.engine.prompt_logprobs([ids]))[0]
        return {
            "prompt_tokens": len(ids),
            "input_token_logprobs": [
                [logprobs[i], ids[i], self.tokenizer.decode([ids[i]])] for i in range(start, len(ids))
            ],
        }

    async def tokenize(
        self, prompt: str | None = None, messages: list[dict] | None = None, add_special_tokens: bool | None = None,
        add_generation_prompt: bool = True, return_token_strs: bool = False, tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> dict:
        """vLLM's / SGLang's `/tokenize`: a prompt's token ids as generation would see them (messages
        through the chat template, whose text already holds its special tokens)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            text = self.render_chat(messages, add_generation_prompt, tools, chat_template_kwargs)
            special = bool(add_special_tokens)  # default False: the template wrote them
        else:
            text, special = prompt, add_special_tokens is not False
        ids = (await off_loop_if_long(len(text), lambda: self.tokenizer(text, add_special_tokens=special)))["input_ids"]
        out = {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": list(ids)}
        if return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return out

    async def detokenize(self, tokens: list[int]) -> dict:
        """vLLM's / SGLang's `/detokenize`: the text of token ids (special tokens kept, as both do)."""
        vocab = len(self.tokenizer)
        bad = next((t for t in tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"tokens must be token ids in [0, {vocab}), got {bad!r}")
        text = self.tokenizer.decode(tokens)
        return {"prompt": text, "text": text}  # vLLM's name and SGLang's

    async def flush_cache(self) -> dict:
        """Drop this replica's reusable prefix cache (SGLang's /flush_cache)."""
        return {"freed_blocks": await self.engine.flush_cache(), "replica": self.replica_id}

    async def stats(self) -> dict:
        return {**self.engine.stats().to_dict(), "replica": self.replica_id}

    async def model_info(self) -> dict:
        return {
            "model": self.model_name,
            "pool": self.pool,
            "engine": self.engine_name,
            "max_model_len": self.engine.max_model_len,
            "source": self.source,
            "replica": self.replica_id,
            "chat_template": self.tokenizer.chat_template,  # the gateway finds the tool-call format in it
        }

    # -- Serve hooks -----------------------------------------------------------------------------

    def check_health(self) -> None:
        # Serve restarts the replica when this raises, e.g. once the engine's decode loop has died.
        self.engine.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {"running": s.running, "waiting": s.waiting, "kv_cache_usage": s.kv_cache_usage}

    async def __del__(self):
        await self.engine.shutdown()


BaseModelDeployment = serve.deployment(BaseModelServer, name="BaseModel")
