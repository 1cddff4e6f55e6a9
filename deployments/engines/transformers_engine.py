"""The CPU engine: transformers' continuous batching behind the `Engine` seam.

All concurrent requests share ONE batched decode loop: the `ContinuousBatchingManager` thread, which
schedules prefill chunks and decode steps of every live request into each forward pass over a paged
KV cache. This module adds what the manager lacks for serving:

- Per-request sampling (temperature, min-p, top-k, top-p, seeds reproducible whatever a request is batched
  with), logit adjustments (logit_bias, min_tokens, repetition / frequency / presence penalties) and a
  per-request logits mask (`LogitsMask`: constrained decoding with xgrammar, see
  `constraints.py`): `SamplingProcessor`, a CB logits processor of `transformers_sampling.py`, on a manager
  that itself only takes the argmax.
- Cancellation, prompt log-probs (plain forward passes with the loop paused) and load stats. Text, stop
  strings and stop token ids are the seam's `DeltaMapper`; `engine_args` are checked in
  `transformers_config.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import secrets
from pathlib import Path
from typing import AsyncIterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from deployments.engines.constraints import GrammarConstraints
from deployments.engines.engine import (
    Delta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    RateMeter,
    SamplingParams,
    validate_sampling,
)
from deployments.engines import transformers_attention
from deployments.engines.text import DeltaMapper, logprob_entry
from deployments.engines.transformers_config import resolve_engine_args
from deployments.engines.transformers_sampling import (
    SLOT_KWARG,
    LogitAdjustment,
    LogitsMask,
    ProcessorList,
    RequestSlot,
    SamplingProcessor,
)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# How often a stream waiting for tokens checks that the decode loop is still alive.
_WATCHDOG_S = 1.0
# Padded tokens per forward pass of `score` / `prompt_logprobs` (a longer single sequence gets its own):
# bounds the logits' memory and how long one pause holds up the decode loop.
_LOGPROB_BATCH_TOKENS = 2048


class TransformersEngine(Engine):
    """transformers continuous batching on CPU (or any torch device), see the module docstring.

    engine_args (all optional, defaults in `transformers_config.ENGINE_ARG_DEFAULTS`): dtype ("float32",
    "bfloat16", "float16", "auto"), device, max_model_len, max_num_seqs, max_batch_tokens, block_size,
    num_blocks, enable_prefix_caching, num_threads.
    """

    name = "transformers"

    def __init__(self, model_path: str | Path, engine_args: dict | None = None, tokenizer=None, device_count: int = 1):
        self._model_path = str(model_path)
        self._args = resolve_engine_args(self._model_path, dict(engine_args or {}), device_count)
        self._tokenizer = tokenizer
        self._model = None
        self._manager = None
        self._prompt_tokens = self._cached_prompt_tokens = 0  # prefix cache (see _count_prefix_hits)
        self._score_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._processor = SamplingProcessor()
        self._handles = itertools.count()
        self._rate = RateMeter()
        self._eos_token_ids: list[int] = []
        self._vocab_size = 0
        self._constraints: GrammarConstraints | None = None

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
        transformers_attention.install()  # decode steps attend per request, not over the whole batch
        # SDPA serves both the manager and `score`'s plain forward. (The manager would turn "eager" into
        # "paged|eager", whose attention is not causal outside a CB batch.)
        model = AutoModelForCausalLM.from_pretrained(
            self._model_path, dtype=_TORCH_DTYPES[args["dtype"]], attn_implementation="sdpa"
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
            # Argmax: sampling is done per request by `SamplingProcessor`.
            generation_config=GenerationConfig(do_sample=False, eos_token_id=self._eos_token_ids or None),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=args["block_size"],
                num_blocks=args["num_blocks"],
                max_batch_tokens=args["max_batch_tokens"],
                max_requests_per_batch=args["max_num_seqs"],
                allow_block_sharing=args["enable_prefix_caching"],
                # `SamplingProcessor` runs Python per row: the loop must run eagerly.
                use_cuda_graph=False,
                use_async_batching=False,
                # Keep SDPA (see above), which also keeps greedy output identical to `generate`'s.
                auto_switch_to_flash=False,
            ),
        )
        # The manager builds its processor list from the generation config; replace it (before the
        # loop thread creates its batch processor) with ours alone.
        manager.logit_processor = ProcessorList(self._processor)
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
        self.check_health()
        manager = self._manager
        sp = request.sampling
        validate_sampling(sp, self._vocab_size)
        prompt_ids = await self._prompt_token_ids(request)
        self._check_fits(len(prompt_ids), sp.max_tokens)

        # Compiled (or a bad regex / schema rejected) before the request reaches the decode loop.
        logits_mask = await self._logits_mask(request)

        eos_ids = [] if sp.ignore_eos else self._eos_token_ids
        terminal_ids = set(sp.stop_token_ids) | set(eos_ids)
        slot = RequestSlot(
            temperature=float(sp.temperature),
            top_k=sp.top_k,
            top_p=float(sp.top_p),
            seed=sp.seed if sp.seed is not None else secrets.randbits(63),
            prompt_len=len(prompt_ids),
            logits_mask=logits_mask,
            # min_tokens holds back the ids the manager stops on, so it never sees one too early.
            adjustment=LogitAdjustment.for_request(sp, prompt_ids, sorted(terminal_ids)) if sp.adjusts_logits() else None,
            min_p=float(sp.min_p),
            logprobs=sp.logprobs,
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
        self._count_prefix_hits(manager)
        try:
            accepted = manager.add_request(
                prompt_ids,
                request_id=cb_request_id,
                max_new_tokens=sp.max_tokens,
                streaming=True,
                eos_token_id=sorted(terminal_ids),
                **{SLOT_KWARG: handle},
            )
            if accepted is None:
                raise EngineError("the transformers engine's decode loop is not accepting requests")
            loop_owns_request = True
            self._prompt_tokens += len(prompt_ids)

            mapper = DeltaMapper(self._tokenizer, sp, prompt_ids)
            emitted = 0
            while True:
                output = await self._next_output(outputs)
                if slot.error is not None:
                    raise EngineError(f"request {request.request_id} failed: {slot.error!r}") from slot.error
                if output.status == RequestStatus.FAILED:
                    loop_owns_request = False
                    raise EngineError(f"request {request.request_id} failed in the decode loop: {output.error}")
                tokens = output.generated_tokens
                first, new_ids, emitted = emitted, tokens[emitted:], len(tokens)
                logprobs = self._pop_logprobs(slot, first, emitted) if sp.logprobs is not None else None
                finish = matched = None
                if output.is_finished():
                    loop_owns_request = False
                    # The manager stops on EOS and the stop token ids (the terminal ids) or at max_tokens.
                    if tokens and tokens[-1] in terminal_ids:
                        finish, matched = "stop", tokens[-1]
                    else:
                        finish = "length"
                delta = mapper.feed(new_ids, finish, matched, logprobs)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            # Consumer gone (aclose, cancellation), stop string, or error: free the request's slot.
            self._processor.slots.pop(handle, None)
            self._release(cb_request_id, cancel=loop_owns_request)

    def _pop_logprobs(self, slot: RequestSlot, start: int, end: int) -> list:
        """The `Delta.logprobs` entries of completion positions [start, end), which the sampling processor
        recorded before the manager appended their tokens (keyed by position, so re-prefilled requests keep
        them aligned). Token texts are decoded here, on the event loop, not on the decode thread."""
        entries = []
        for position in range(start, end):
            entry = slot.logprob_entries.pop(position, None)
            if entry is None:
                raise EngineError(f"no log-probs were recorded for completion token {position}")
            entries.append(logprob_entry(self._tokenizer, *entry))
        return entries

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
        grammar = await constraints.compile_within(self._args["grammar_compile_timeout_s"], regex=sp.regex, json_schema=sp.json_schema)
        return constraints.mask(grammar)

    async def _next_output(self, outputs: asyncio.Queue[GenerationOutput]) -> GenerationOutput:
        """The request's most recent output (each carries all tokens so far, so a backlog collapses)."""
        while outputs.empty():
            try:
                # asyncio.timeout, not wait_for: no task per decode step and request.
                async with asyncio.timeout(_WATCHDOG_S):
                    output = await outputs.get()
                break
            except TimeoutError:
                self.check_health()  # a dead loop would never deliver: fail instead of hanging
        else:
            output = outputs.get_nowait()
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

    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        self.check_health()
        sequences = self._logprob_sequences(token_ids)
        if all(len(ids) <= 1 for ids in sequences):  # nothing to predict: no forward pass
            return [[None] * len(ids) for ids in sequences]
        # Plain forward passes on the same weights, off the event loop.
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

    def _count_prefix_hits(self, manager) -> None:
        """Counts the prompt tokens the manager's prefix cache serves: its cache's `search_prefix_match`
        (the scheduler's one call per new request, returning the tokens matched) is wrapped once its
        batch processor exists (the loop thread builds it; before that nothing is cached yet)."""
        processor = manager.batch_processor
        if processor is None or getattr(processor.cache, "_tandem_counts_hits", False):
            return
        cache, search = processor.cache, processor.cache.search_prefix_match

        def counted(request_id: str, prompt_ids: list[int]) -> int:
            matched = search(request_id, prompt_ids)
            self._cached_prompt_tokens += matched
            return matched

        cache.search_prefix_match = counted
        cache._tandem_counts_hits = True

    # -- health and load -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        manager = self._manager
        processor = manager.batch_processor if manager is not None else None
        healthy = self.healthy()
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
            prompt_tokens=self._prompt_tokens,
            cached_prompt_tokens=self._cached_prompt_tokens if processor.cache.use_prefix_sharing else None,
        )

    def _health_error(self) -> str | None:
        manager = self._manager
        if manager is None:
            return self._not_started()
        fatal = manager.background_thread_status.fatal_error
        if fatal is not None:
            return f"the decode loop died: {fatal!r}"
        if not manager.is_running():
            return "the decode loop thread is not running"
        return None
