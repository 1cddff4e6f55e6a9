"""The CPU engine: transformers' continuous batching behind the `Engine` seam.

All concurrent requests share ONE batched decode loop: the `ContinuousBatchingManager` thread, which
schedules prefill chunks and decode steps of every live request into each forward pass over a paged
KV cache. This module adds what the manager lacks for serving:

- Per-request sampling. The manager samples with one global `do_sample` and one global seed, so it runs
  with `do_sample=False` (argmax) and `_SamplingProcessor`, a per-request CB logits processor, turns the
  argmax into a sample for the rows that want one: temperature, top-k, top-p, then Gumbel noise drawn
  from a generator seeded by (request seed, token position). argmax(logits / T + Gumbel) is an exact
  sample of softmax(logits / T), and the noise depends on nothing else in the batch, so a seeded request
  is reproducible whatever it is batched with. Rows at temperature 0 are left alone: exact greedy.
- A per-request logits mask (`LogitsMask`) on the same processor, applied before the argmax / sample:
  constrained decoding (regex, JSON schema) with xgrammar, see `deployments/engines/constraints.py`.
- Stop strings, stop token ids, UTF-8-safe streaming text, cancellation, scoring, prompt log-probs and
  load stats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus
from transformers.generation.logits_process import LogitsProcessorList

from deployments.engines.constraints import GrammarConstraints
from deployments.engines.text import IncrementalDetokenizer, StopStringMatcher
from deployments.engines.engine import (
    Delta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    PromptTooLongError,
    SamplingParams,
    continuation_sequences,
    validate_sampling,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# engine_args: name -> default (None: derived at load time, see `_resolve_args`)
_ENGINE_ARG_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "device": "cpu",
    "max_model_len": None,  # default: config.max_position_embeddings
    "max_num_seqs": 64,  # requests decoded together in one forward pass
    "max_batch_tokens": 512,  # tokens per forward pass; longer prefills are chunked to fit
    "block_size": 128,  # tokens per KV-cache page
    "num_blocks": None,  # KV-cache pages; default: min(max_num_seqs * max_model_len, 32768) tokens' worth
    "enable_prefix_caching": True,
    # torch intra-op threads (None: leave torch's setting, which Ray derives from the replica's CPUs).
    # Small models decode faster on 1 thread, and much faster when other processes share the cores.
    "num_threads": None,
}
_POSITIVE_INT_ARGS = ("max_model_len", "max_num_seqs", "max_batch_tokens", "block_size", "num_blocks", "num_threads")
_DEFAULT_KV_CACHE_TOKENS = 32768

# The logits-processor kwarg that carries a request's handle into the CB thread.
_SLOT_KWARG = "tandem_slot"
# How often a stream waiting for tokens checks that the decode loop is still alive.
_WATCHDOG_S = 1.0
_RATE_WINDOW_S = 5.0
_MASK64 = (1 << 64) - 1
# Below this temperature a request decodes greedily (dividing logits by ~0 would overflow to inf / NaN).
_MIN_TEMPERATURE = 1e-5
# Padded tokens per forward pass of `score` / `prompt_logprobs` (a longer single sequence gets its own):
# bounds the logits' memory and how long one pause holds up the decode loop.
_LOGPROB_BATCH_TOKENS = 2048


class LogitsMask(Protocol):
    """A per-request restriction of the next-token logits, e.g. an xgrammar token bitmask.

    Called on the decode-loop thread once per generated token of its request, before sampling, with the
    request's row of float32 logits (`[vocab_size]`, to be modified in place, e.g. disallowed tokens set to
    -inf) and all completion tokens so far (a grammar matcher advances over the ones it has not seen).
    If it raises, its request ends with an `EngineError`; the other requests are unaffected.
    """

    def apply(self, logits: torch.Tensor, completion_ids: Sequence[int]) -> None: ...


@dataclass
class _RequestSlot:
    """What the sampling processor needs to know about one live request."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    prompt_len: int
    logits_mask: LogitsMask | None = None
    # Written by the processor on the decode-loop thread:
    position: int = 0  # index of the completion token being sampled
    completion_ids: list[int] = field(default_factory=list)  # only maintained when there is a mask
    error: BaseException | None = None


class _SamplingProcessor(ContinuousBatchingLogitsProcessor):
    """Per-request sampling and logits masks for the CB loop, whose own sampler is argmax.

    The CB API hands a processor one int32 per batch row; ours is the request's slot handle (-1: none).
    The per-row work happens in Python with the slot looked up by handle, which is why the engine runs
    the manager eagerly (no CUDA graphs, no torch.compile, no async batching): `prepare_tensor_args` and
    `__call__` then alternate on the loop thread, one pair per forward pass.
    """

    supported_kwargs = {_SLOT_KWARG: int}
    ignored_kwargs = ()

    def __init__(self) -> None:
        # handle -> slot; written on the event loop, read on the decode thread (single dict ops: GIL-safe)
        self.slots: dict[int, _RequestSlot] = {}
        self._num_rows = 0

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        handles = []
        for future_state in requests_with_new_token:
            state = future_state.state
            handle = state.logit_processor_kwargs.get(_SLOT_KWARG, -1)
            slot = self.slots.get(handle)
            if slot is not None:
                # Counted from the full sequence, which survives the manager re-prefilling an evicted
                # request (generated tokens then move into initial_tokens).
                sequence_len = len(state.initial_tokens) + len(state.generated_tokens)
                slot.position = sequence_len - slot.prompt_len
                if slot.logits_mask is not None:
                    slot.completion_ids = (state.initial_tokens + state.generated_tokens)[slot.prompt_len :]
            handles.append(handle)
        # Rows past these carry stale arguments (the manager only resets them at start) and their
        # logits are discarded, so `__call__` skips them.
        self._num_rows = len(handles)
        return torch.tensor(handles, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        sampled_rows: list[int] = []
        sampled_slots: list[_RequestSlot] = []
        for row, handle in enumerate(tensor_arg[: self._num_rows].tolist()):
            slot = self.slots.get(handle)
            if slot is None or slot.error is not None:
                continue
            if slot.logits_mask is not None:
                try:
                    slot.logits_mask.apply(scores[row], slot.completion_ids)
                except Exception as e:  # noqa: BLE001 - fail this request only, never the shared loop
                    slot.error = e
                    continue
            if slot.temperature >= _MIN_TEMPERATURE:
                sampled_rows.append(row)
                sampled_slots.append(slot)
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=scores.device)
            scores[rows] = _gumbel_sample_scores(scores[rows], sampled_slots)
        return scores


def _gumbel_sample_scores(logits: torch.Tensor, slots: list[_RequestSlot]) -> torch.Tensor:
    """Scores whose argmax is a sample from each row's temperature / top-k / top-p distribution."""
    vocab, device = logits.size(-1), logits.device
    temperature = torch.tensor([s.temperature for s in slots], dtype=logits.dtype, device=device).unsqueeze(1)
    x = logits / temperature
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in slots], device=device)
    if bool((top_k < vocab).any()):
        kth_largest = torch.topk(x, int(top_k.max()), dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))
        x = x.masked_fill(x < kth_largest, -math.inf)
    # top_p == 1 rows get an unreachable threshold, so float rounding of the cumulative sum cannot drop tokens.
    top_p = torch.tensor([s.top_p if s.top_p < 1 else math.inf for s in slots], dtype=x.dtype, device=device)
    top_p = top_p.unsqueeze(1)
    if bool(torch.isfinite(top_p).any()):
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), -math.inf)
    noise = torch.stack([_gumbel_noise(vocab, s.seed, s.position) for s in slots])
    return x + noise.to(device)


def _gumbel_noise(size: int, seed: int, position: int) -> torch.Tensor:
    # Drawn on the CPU whatever the model's device, so a seed means the same noise everywhere.
    generator = torch.Generator().manual_seed(_mix64(seed, position))
    uniform = torch.rand(size, generator=generator).clamp_(min=1e-20)
    return -torch.log(-torch.log(uniform))


def _mix64(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): nearby seeds and positions get unrelated generator states."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _ProcessorList(ContinuousBatchingLogitsProcessorList):
    def __init__(self, processor: ContinuousBatchingLogitsProcessor):
        super().__init__(LogitsProcessorList([processor]))
        # The base class only counts the argument rows of processors it converted itself.
        self.tensors_required = 1


class _RateMeter:
    """Events per second over the last `window_s` seconds (thread-safe: stats may be read off-loop)."""

    def __init__(self, window_s: float):
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def rate(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return sum(count for _, count in self._events) / self._window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()


def check_engine_args(engine_args: dict, device_count: int = 1, hf_config: dict | None = None) -> None:
    """The checks that need no model files (also run by `python -m cluster check`)."""
    args = engine_args
    if device_count != 1:
        raise ValueError(f"the transformers engine runs on one device; accelerator.count must be 1, got {device_count}")
    unknown = sorted(set(args) - set(_ENGINE_ARG_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown engine_args for the transformers engine: {unknown}; allowed: {sorted(_ENGINE_ARG_DEFAULTS)}"
        )
    resolved = {**_ENGINE_ARG_DEFAULTS, **args}
    for key in _POSITIVE_INT_ARGS:
        value = resolved[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"engine_args.{key} must be a positive integer, got {value!r}")
    if resolved["dtype"] not in _DTYPES:
        raise ValueError(f"engine_args.dtype must be one of {sorted(_DTYPES)}, got {resolved['dtype']!r}")
    if not isinstance(resolved["enable_prefix_caching"], bool):
        raise ValueError("engine_args.enable_prefix_caching must be a boolean")


class TransformersEngine(Engine):
    """transformers continuous batching on CPU (or any torch device), see the module docstring.

    engine_args (all optional, defaults in `_ENGINE_ARG_DEFAULTS`): dtype ("float32", "bfloat16", "float16",
    "auto"), device, max_model_len, max_num_seqs, max_batch_tokens, block_size, num_blocks,
    enable_prefix_caching, num_threads.
    """

    name = "transformers"

    def __init__(self, model_path: str | Path, engine_args: dict | None = None, tokenizer=None, device_count: int = 1):
        self._model_path = str(model_path)
        check_engine_args(dict(engine_args or {}), device_count)
        self._args = self._resolve_args(dict(engine_args or {}))
        self._tokenizer = tokenizer
        self._model = None
        self._manager = None
        self._score_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._processor = _SamplingProcessor()
        self._handles = itertools.count()
        self._rate = _RateMeter(_RATE_WINDOW_S)
        self._eos_token_ids: list[int] = []
        self._vocab_size = 0
        self._constraints: GrammarConstraints | None = None

    def _resolve_args(self, args: dict) -> dict:
        resolved = {**_ENGINE_ARG_DEFAULTS, **args}
        config = AutoConfig.from_pretrained(self._model_path).get_text_config()
        limit = config.max_position_embeddings
        if resolved["max_model_len"] is None:
            resolved["max_model_len"] = limit
        elif resolved["max_model_len"] > limit:
            raise ValueError(f"engine_args.max_model_len={resolved['max_model_len']} exceeds the model's {limit}")
        block_size, max_len = resolved["block_size"], resolved["max_model_len"]
        if resolved["num_blocks"] is None:
            tokens = max(max_len, min(resolved["max_num_seqs"] * max_len, _DEFAULT_KV_CACHE_TOKENS))
            resolved["num_blocks"] = -(-tokens // block_size)
        elif resolved["num_blocks"] * block_size < max_len:
            # The manager's loop dies when a single request can never fit the cache.
            raise ValueError(
                f"engine_args: num_blocks * block_size = {resolved['num_blocks'] * block_size} tokens cannot hold "
                f"one max_model_len={max_len} request"
            )
        return resolved

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._manager is not None:
            return
        await asyncio.to_thread(self._load_and_start)
        # The first forward passes are slow (lazy init, allocator warm-up); pay for them here, on both
        # the greedy and the sampling paths.
        for temperature in (0.0, 1.0):
            warmup = GenerationRequest(
                request_id="warmup",
                sampling=SamplingParams(max_tokens=2, temperature=temperature, seed=0),
                prompt_token_ids=[self._eos_token_ids[0] if self._eos_token_ids else 0] * 4,
            )
            async for _ in self.generate(warmup):
                pass

    def _load_and_start(self) -> None:
        args = self._args
        if args["num_threads"] is not None:
            torch.set_num_threads(args["num_threads"])
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        # SDPA serves both the manager and `score`'s plain forward. (The manager would turn "eager" into
        # "paged|eager", whose attention is not causal outside a CB batch.)
        model = AutoModelForCausalLM.from_pretrained(
            self._model_path, dtype=_DTYPES[args["dtype"]], attn_implementation="sdpa"
        )
        model = model.to(args["device"]).eval()
        self._vocab_size = model.get_output_embeddings().weight.shape[0]

        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        self._eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        # One grammar compiler (and cache) for the engine's life, built on the first constrained request.
        self._constraints = GrammarConstraints(self._tokenizer, self._vocab_size, self._eos_token_ids)

        manager = model.init_continuous_batching(
            # Argmax: sampling is done per request by `_SamplingProcessor`.
            generation_config=GenerationConfig(do_sample=False, eos_token_id=self._eos_token_ids or None),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=args["block_size"],
                num_blocks=args["num_blocks"],
                max_batch_tokens=args["max_batch_tokens"],
                max_requests_per_batch=args["max_num_seqs"],
                allow_block_sharing=args["enable_prefix_caching"],
                # `_SamplingProcessor` runs Python per row: the loop must run eagerly.
                use_cuda_graph=False,
                use_async_batching=False,
                # Keep SDPA (see above), which also keeps greedy output identical to `generate`'s.
                auto_switch_to_flash=False,
            ),
        )
        # The manager builds its processor list from the generation config; replace it (before the
        # loop thread creates its batch processor) with ours alone.
        manager.logit_processor = _ProcessorList(self._processor)
        # The loop thread inherits the caller's inference mode.
        with torch.inference_mode():
            manager.start()
        # `num_threads` only reaches threads that have not run OpenMP work yet (the count is per thread),
        # like the loop thread above; scoring gets a fresh thread too. One is enough: a score pauses the
        # decode loop, so concurrent scores would only queue.
        self._score_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tandem-score")
        self._model, self._manager = model, manager

    async def shutdown(self) -> None:
        manager, self._manager = self._manager, None
        if manager is None:
            return
        # A hard stop fails the requests still in flight, which ends their streams with an EngineError.
        await asyncio.to_thread(manager.stop, block=True, timeout=30, hard_stop=True)
        await asyncio.to_thread(manager.destroy)
        self._score_executor.shutdown(wait=False)
        self._model = None

    @property
    def max_model_len(self) -> int:
        return self._args["max_model_len"]

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        manager = self._require_started()
        sp = request.sampling
        validate_sampling(sp, self._vocab_size)
        prompt_ids = self._prompt_token_ids(request)
        if len(prompt_ids) + sp.max_tokens > self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), self.max_model_len, sp.max_tokens)

        # Compiled (or a bad regex / schema rejected) before the request reaches the decode loop.
        logits_mask = await self._logits_mask(request)

        eos_ids = [] if sp.ignore_eos else self._eos_token_ids
        stop_ids = set(sp.stop_token_ids)
        terminal_ids = stop_ids | set(eos_ids)
        slot = _RequestSlot(
            temperature=float(sp.temperature),
            top_k=sp.top_k,
            top_p=float(sp.top_p),
            seed=sp.seed if sp.seed is not None else secrets.randbits(63),
            prompt_len=len(prompt_ids),
            logits_mask=logits_mask,
        )
        handle = next(self._handles)
        cb_request_id = f"{request.request_id}#{handle}"  # callers' ids need not be unique
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        seen = 0

        def on_output(output: GenerationOutput) -> None:  # on the event loop, once per decode step
            nonlocal seen
            self._rate.add(len(output.generated_tokens) - seen)
            seen = len(output.generated_tokens)
            outputs.put_nowait(output)

        self._drop_stray_outputs()
        self._processor.slots[handle] = slot
        manager.register_result_handler(cb_request_id, on_output)
        loop_owns_request = False
        try:
            accepted = manager.add_request(
                prompt_ids,
                request_id=cb_request_id,
                max_new_tokens=sp.max_tokens,
                streaming=True,
                eos_token_id=sorted(terminal_ids),
                **{_SLOT_KWARG: handle},
            )
            if accepted is None:
                raise EngineError("the transformers engine's decode loop is not accepting requests")
            loop_owns_request = True

            detokenizer = IncrementalDetokenizer(self._tokenizer, prompt_ids, skip_special_tokens=True)
            stopper = StopStringMatcher(sp.stop)
            emitted = 0
            while True:
                output = await self._next_output(outputs)
                if slot.error is not None:
                    raise EngineError(f"request {request.request_id} failed: {slot.error!r}") from slot.error
                if output.status == RequestStatus.FAILED:
                    loop_owns_request = False
                    raise EngineError(f"request {request.request_id} failed in the decode loop: {output.error}")
                finished = output.is_finished()
                if finished:
                    loop_owns_request = False
                tokens = output.generated_tokens
                new_ids, emitted = tokens[emitted:], len(tokens)
                # A terminating EOS / stop token counts as a completion token but is not part of the text.
                ends_on_terminal = finished and bool(tokens) and tokens[-1] in terminal_ids
                text = detokenizer.add(new_ids[:-1] if ends_on_terminal else new_ids)
                if finished:
                    text += detokenizer.flush()
                text, stop_string = stopper.feed(text)
                if stop_string is not None:
                    yield Delta(text, new_ids, len(prompt_ids), emitted, "stop", stop_string)
                    return
                if finished:
                    text += stopper.flush()
                    if ends_on_terminal and tokens[-1] in stop_ids:
                        finish_reason, stop_reason = "stop", tokens[-1]
                    elif ends_on_terminal:
                        finish_reason, stop_reason = "stop", None
                    else:
                        finish_reason, stop_reason = "length", None
                    yield Delta(text, new_ids, len(prompt_ids), emitted, finish_reason, stop_reason)
                    return
                if new_ids:
                    yield Delta(text, new_ids, len(prompt_ids), emitted)
        finally:
            # Consumer gone (aclose, cancellation), stop string, or error: free the request's slot.
            self._processor.slots.pop(handle, None)
            self._release(cb_request_id, cancel=loop_owns_request)

    def _prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if request.prompt is not None:
            # The caller has already applied any chat template; add only the tokenizer's default specials.
            ids = self._tokenizer(request.prompt)["input_ids"]
        else:
            ids = list(request.prompt_token_ids)
            if not all(isinstance(t, int) and 0 <= t < self._vocab_size for t in ids):
                raise ValueError(f"prompt_token_ids must be token ids in [0, {self._vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    async def _logits_mask(self, request: GenerationRequest) -> LogitsMask | None:
        """The request's constrained-decoding mask (None: unconstrained): its regex or JSON schema compiled
        by xgrammar in a worker thread (the compiler caches grammars it has seen). ValueError if invalid.

        The mask runs on the decode thread before the argmax, and before the Gumbel noise of sampled
        rows, so greedy and sampled requests alike only ever pick tokens the grammar allows. Once the
        grammar is complete it allows only EOS, which ends the request with finish_reason "stop".
        """
        sp = request.sampling
        if sp.regex is None and sp.json_schema is None:
            return None
        constraints = self._constraints
        grammar = await asyncio.to_thread(constraints.compile, regex=sp.regex, json_schema=sp.json_schema)
        return constraints.mask(grammar)

    async def _next_output(self, outputs: asyncio.Queue[GenerationOutput]) -> GenerationOutput:
        """The request's most recent output (each carries all tokens so far, so a backlog collapses)."""
        while True:
            try:
                output = await asyncio.wait_for(outputs.get(), timeout=_WATCHDOG_S)
                break
            except asyncio.TimeoutError:
                self.check_health()  # a dead loop would never deliver: fail instead of hanging
        while not outputs.empty():
            output = outputs.get_nowait()
        return output

    def _release(self, cb_request_id: str, cancel: bool) -> None:
        """Ends a request on the manager's side: `cancel` one the loop still works on (so it frees its KV
        cache and batch slot), and unregister its result handler."""
        manager = self._manager
        if manager is None:
            return
        if cancel:
            manager.cancel_request(cb_request_id)
        # The manager drops a handler only when its request finishes, which a cancelled one never does.
        router = manager.output_router
        with router._lock:
            router.result_handlers.pop(cb_request_id, None)

    def _drop_stray_outputs(self) -> None:
        """Outputs produced for a request between its cancellation and the loop noticing it find no
        handler and land in the manager's shared queue, which this engine never reads: drop them."""
        stray = self._manager.output_router.output_queue
        try:
            while True:
                stray.get_nowait()
        except queue.Empty:
            pass

    # -- scoring and prompt log-probs ------------------------------------------------------------

    async def score(self, prompt: str, continuations: list[str]) -> list[float]:
        self.check_health()
        if not isinstance(prompt, str) or not all(isinstance(c, str) for c in continuations):
            raise ValueError("prompt and continuations must be strings")
        if not continuations:
            return []
        # A plain forward pass on the same weights, off the event loop.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._score_executor, self._score_sync, prompt, list(continuations))

    def _score_sync(self, prompt: str, continuations: list[str]) -> list[float]:
        sequences = continuation_sequences(self._tokenizer, prompt, continuations)
        for full_ids, _ in sequences:
            if len(full_ids) > self.max_model_len:
                raise PromptTooLongError(len(full_ids), self.max_model_len)
        token_logprobs = self._token_logprobs([ids for ids, _ in sequences])
        # token_logprobs[row][i] is the log-prob of token i + 1.
        return [math.fsum(lps[start - 1 :]) for lps, (_, start) in zip(token_logprobs, sequences)]

    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        self.check_health()
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(ids, (list, tuple)) for ids in token_ids):
            raise ValueError("token_ids must be a list of token-id lists")
        sequences = [list(ids) for ids in token_ids]
        vocab = self._vocab_size
        for ids in sequences:
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise ValueError(f"token_ids must be token ids in [0, {vocab})")
            if len(ids) > self.max_model_len:
                raise PromptTooLongError(len(ids), self.max_model_len)
        if all(len(ids) <= 1 for ids in sequences):  # nothing to predict: no forward pass
            return [[None] * len(ids) for ids in sequences]
        loop = asyncio.get_running_loop()
        token_logprobs = await loop.run_in_executor(self._score_executor, self._token_logprobs, sequences)
        return [[None, *lps] if ids else [] for ids, lps in zip(sequences, token_logprobs)]

    def _token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(ids[i] | ids[:i]) for i = 1 .. len - 1 (empty for 0 or 1 tokens).

        Plain forward passes over right-padded batches of at most `_LOGPROB_BATCH_TOKENS` padded tokens
        (longest sequences first, so rows of a batch have similar lengths), each with the decode loop paused.
        """
        results: list[list[float]] = [[] for _ in sequences]
        order = sorted((i for i, ids in enumerate(sequences) if len(ids) > 1), key=lambda i: -len(sequences[i]))
        batch: list[int] = []
        for i in order:
            width = len(sequences[batch[0]]) if batch else len(sequences[i])
            if batch and (len(batch) + 1) * width > _LOGPROB_BATCH_TOKENS:
                self._forward_logprobs(sequences, batch, results)
                batch = []
            batch.append(i)
        if batch:
            self._forward_logprobs(sequences, batch, results)
        return results

    def _forward_logprobs(self, sequences: list[list[int]], rows: list[int], results: list[list[float]]) -> None:
        width = max(len(sequences[i]) for i in rows)
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            attention_mask[row, : len(sequences[i])] = 1
        device = self._model.device
        # The decode loop must be paused: transformers' forward wrapper (`merge_with_config_defaults`) sets
        # `config.is_causal` on the config shared with the loop for the length of each forward, and the loop's
        # forwards pass is_causal=False. An overlapping plain forward then runs non-causally, and the two
        # restores can interleave so that is_causal=False sticks. The pause lasts one forward pass.
        with self._manager.pause(), torch.inference_mode():
            logits = self._model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        with torch.inference_mode():
            for row, i in enumerate(rows):
                n = len(sequences[i])
                log_probs = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
                targets = input_ids[row, 1:n].to(log_probs.device).unsqueeze(1)
                results[i] = log_probs.gather(1, targets).squeeze(1).tolist()

    async def flush_cache(self) -> int:
        """Evict the blocks the continuous-batching cache keeps for prefix reuse."""
        self.check_health()

        def flush() -> int:
            with self._manager.pause():
                processor = self._manager.batch_processor
                if processor is None:
                    return 0
                cache = processor.cache
                cached = sum(len(a.ledger.cached_blocks) for a in cache.cache_allocators.values())
                cache.evict_cached_blocks()
                return cached

        return await asyncio.get_running_loop().run_in_executor(self._score_executor, flush)

    # -- health and load -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        manager = self._manager
        processor = manager.batch_processor if manager is not None else None
        healthy = self._loop_error() is None
        if processor is None:
            return EngineStats(healthy=healthy)
        self._drop_stray_outputs()
        scheduler, cache = processor.scheduler, processor.cache
        # Blocks kept only as a prefix cache are evicted on demand, so they count as free (like vLLM).
        total_bytes = cache.num_sectors * cache.bytes_per_sector
        cached_bytes = sum(len(a.ledger.cached_blocks) * a.bytes_per_block for a in cache.cache_allocators.values())
        used_bytes = total_bytes - cache.compute_free_capacity(relative=False) - cached_bytes
        return EngineStats(
            running=len(scheduler.active_requests),
            waiting=len(scheduler.waiting_requests) + manager.input_queue.qsize(),
            kv_cache_usage=min(1.0, max(0.0, used_bytes / total_bytes)),
            tokens_per_s=self._rate.rate(),
            healthy=healthy,
        )

    def check_health(self) -> None:
        error = self._loop_error()
        if error is not None:
            raise EngineError(error)

    def _loop_error(self) -> str | None:
        manager = self._manager
        if manager is None:
            return "the transformers engine is not started"
        fatal = manager.background_thread_status.fatal_error
        if fatal is not None:
            return f"the decode loop died: {fatal!r}"
        if not manager.is_running():
            return "the decode loop thread is not running"
        return None

    def _require_started(self):
        if self._manager is None:
            raise EngineError("the transformers engine is not started")
        return self._manager
