"""The LMDeploy engines behind the `Engine` seam: TurboMind (CUDA GPUs) and LMDeploy's PyTorch engine (Ascend NPUs).

Both adapters run LMDeploy's own serving stack in the replica: `lmdeploy.serve.core.AsyncEngine`, the object
that `lmdeploy.pipeline` and `lmdeploy serve api_server` build around a `TurbomindEngineConfig` /
`PytorchEngineConfig` (built from engine_args in `lmdeploy_config.py`). Per request the adapter calls
`AsyncEngine.preprocess` (on prompt token ids: the replica has already rendered any chat template, so LMDeploy's
is never applied) and streams `AsyncEngine.generate`, whose per-step `GenOut`s `delta_from_output` turns into
Tandem `Delta`s. Closing that stream early makes LMDeploy's own `safe_run` abort the request on the engine
(TurboMind's cancel, the PyTorch engine's STOP_SESSION) and hand its request slot back.

What LMDeploy does not do the way Tandem promises, the adapter adds:

- Stop strings. LMDeploy turns `stop_words` into stop *token ids* (tokens whose text contains the word), so a
  stop string spanning tokens never stops it. The adapter passes them on (a one-token stop ends generation in
  the engine) and also cuts the streamed text at the first stop string (the seam's `DeltaMapper`), ending the
  request there. (With ignore_eos LMDeploy would drop or ban all stop ids, so then only the adapter stops.)
- UTF-8-safe text. Deltas are detokenized by `DeltaMapper`, so every engine streams the same text for the same
  tokens, and a stop token id can be cut out of a multi-token step.
- Scoring. TurboMind returns all-token logits (`AsyncEngine.async_get_logits`; LMDeploy refuses them when prefix
  caching is on); the PyTorch engine returns input-token log-probs (`logprob_start_len`, prefix-cache safe).
"""

from __future__ import annotations

import abc
import asyncio
import copy
import os
from typing import AsyncIterator

from lmdeploy.messages import GenerationConfig
from lmdeploy.serve.core import EngineHealthMonitor, ErrorCode, RequestError

from deployments.engines.engine import (
    Delta,
    Engine,
    EngineError,
    EngineStats,
    GenerationRequest,
    PromptTooLongError,
    RateMeter,
)
from deployments.engines.lmdeploy_config import Backend, build_engine_config, generation_config
from deployments.engines.text import DeltaMapper

_LOGIT_ROWS_PER_CHUNK = 256  # bounds the float32 copy of a long sequence's logits while scoring


def delta_from_output(mapper: DeltaMapper, output) -> Delta | None:
    """One LMDeploy output, in order, through the request's `DeltaMapper`: the Delta for it, or None when it adds
    nothing.

    Takes what `AsyncEngine.generate` yields (`GenOut`) or the pipeline's `Response`: `token_ids` (the step's new
    ids) and `finish_reason`. The request must have been sent with `generation_config(sampling)`, whose
    `include_stop_str_in_output` makes the last output of a stopped request carry the token it stopped on
    (which LMDeploy does not name: `DeltaMapper` tells a stop word's token from EOS by its text).
    """
    finish = output.finish_reason
    if finish == "error":
        detail = getattr(output, "error_message", None) or "no detail"
        raise EngineError(f"LMDeploy failed the request: {detail}")
    return mapper.feed(output.token_ids or [], finish)


class _LMDeployEngine(Engine):
    """One LMDeploy `AsyncEngine` per replica, driven from the replica's event loop."""

    backend: Backend
    # LMDeploy takes a sequence to score as a prompt of at least one more step (input < session_len).
    scoring_headroom = 1

    def __init__(self, model_path: str, engine_args: dict, *, tokenizer, device_count: int = 1):
        self._model_path = str(model_path)
        self._config = build_engine_config(self.backend, dict(engine_args or {}), device_count)
        self._tokenizer = tokenizer
        self._engine = None  # lmdeploy.serve.core.AsyncEngine, once started
        self._health = None  # lmdeploy.serve.core.EngineHealthMonitor
        self._in_flight = 0
        self._rate = RateMeter()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is not None:
            return
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._model_path)
        try:
            # Loading weights takes long and LMDeploy builds its engines outside any event loop (as
            # `lmdeploy serve` does), so build in a worker thread, then bind the engine to this loop.
            engine = await asyncio.to_thread(self._build)
        except Exception as e:  # noqa: BLE001 - reported with LMDeploy's cause, which names the missing piece
            cause = f" ({e.__cause__!r})" if e.__cause__ is not None else ""
            raise EngineError(f"could not start the {self.name} engine on {self._model_path}: {e!r}{cause}") from e
        engine.start_loop(asyncio.get_running_loop(), use_async_api=True)
        self._health = EngineHealthMonitor(engine)
        self._health.start()
        self._engine = engine

    def _build(self):
        from lmdeploy.archs import get_task
        from lmdeploy.utils import get_logger

        # As `lmdeploy.pipeline` does: LMDeploy logs every request at INFO.
        os.environ.setdefault("TM_LOG_LEVEL", "WARNING")
        get_logger("lmdeploy").setLevel("WARNING")
        config = copy.deepcopy(self._config)  # AsyncEngine fills in session_len and friends
        _, engine_class = get_task(self.backend, self._model_path, backend_config=config)
        return engine_class(self._model_path, backend=self.backend, backend_config=config)

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        await self._health.stop()
        # In-flight streams end with finish_reason "abort".
        await engine.stop_all_session()
        engine.close()

    @property
    def max_model_len(self) -> int:
        if self._engine is not None:
            return self._engine.session_len
        if self._config.session_len is not None:
            return self._config.session_len
        raise EngineError(f"the {self.name} engine is not started (its session_len comes from the model)")

    @property
    def _vocab_size(self) -> int:
        return len(self._tokenizer)

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.check_health()
        engine = self._engine
        sp = request.sampling
        gen_config = generation_config(sp, self._vocab_size)
        prompt_ids = await self._prompt_token_ids(request)
        self._check_fits(len(prompt_ids), sp.max_tokens)

        session = _new_session(engine)
        prepared = await self._preprocess(engine, session, prompt_ids, gen_config, sp.max_tokens)
        outputs = engine.generate(prepared, stream_response=True)
        mapper = DeltaMapper(self._tokenizer, sp, prompt_ids)
        self._in_flight += 1
        completion_tokens = 0
        try:
            async for output in outputs:
                delta = delta_from_output(mapper, output)
                if delta is None:
                    continue
                self._rate.add(delta.completion_tokens - completion_tokens)
                completion_tokens = delta.completion_tokens
                if delta.finish_reason is not None and output.finish_reason is not None:
                    # LMDeploy's request is over: let its stream end (release the handle) rather than close it,
                    # which would send an abort for a finished request.
                    async for _ in outputs:
                        pass
                yield delta
                if delta.finish_reason is not None:
                    return
            # LMDeploy's stream absorbs a cancellation of this task once it has aborted the request: pass it on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            raise EngineError(f"LMDeploy ended request {request.request_id} without a finish reason")
        except RequestError as e:
            raise EngineError(f"request {request.request_id} failed in LMDeploy: {e.message}") from e
        finally:
            self._in_flight -= 1
            # Consumer gone (aclose, cancellation), a stop string, or an error: closing LMDeploy's stream while the
            # request runs makes its safe_run abort it on the engine (the instance's async_cancel) and free the slot.
            await outputs.aclose()
            engine.session_mgr.remove(session)

    async def _preprocess(self, engine, session, input_ids: list[int], gen_config: GenerationConfig, max_tokens=None):
        """LMDeploy's request validation (context length, response_format compiles, ...) -> its prepared request."""
        try:
            return await engine.preprocess(None, session, gen_config=gen_config, input_ids=input_ids)
        except BaseException as e:
            # LMDeploy forgets the session on most failures, not all (e.g. a response_format that fails to compile).
            engine.session_mgr.remove(session)
            if not isinstance(e, RequestError):
                raise
            if e.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED:
                raise PromptTooLongError(len(input_ids), engine.session_len, max_tokens) from e
            if e.code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNSUPPORTED_FEATURE, ErrorCode.PREPROCESS_FAILED):
                raise ValueError(e.message) from e
            raise EngineError(f"LMDeploy refused the request: {e.message}") from e

    # -- scoring and prompt log-probs ------------------------------------------------------------

    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        self.check_health()
        sequences = self._logprob_sequences(token_ids)
        token_logprobs = await self._token_logprobs(sequences)
        return [[None, *lps] if ids else [] for ids, lps in zip(sequences, token_logprobs)]

    async def _token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(ids[i] | ids[:i]) for i = 1 .. len - 1 (empty for 0 or 1 tokens)."""
        results: list[list[float]] = [[] for _ in sequences]
        rows = [i for i, ids in enumerate(sequences) if len(ids) > 1]
        if rows:
            try:
                scored = await self._sequence_logprobs([sequences[i] for i in rows])
            except RequestError as e:
                raise EngineError(f"LMDeploy failed to score: {e.message}") from e
            for i, lps in zip(rows, scored):
                results[i] = lps
        return results

    @abc.abstractmethod
    async def _sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The backend's way to `_token_logprobs` for sequences of at least two tokens."""

    # -- health and load -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        engine = self._engine
        if engine is None:
            return EngineStats(healthy=False)
        pool = engine.session_mgr.request_handle_pool
        dispatched = pool.num_dispatched if pool is not None else 0
        # Requests beyond max_batch_size wait in LMDeploy's handle pool before the engine sees them.
        waiting_for_slot = max(0, self._in_flight - dispatched)
        metrics = self._schedule_metrics(engine)
        healthy = self.healthy()
        if metrics is None:
            return EngineStats(
                running=dispatched, waiting=waiting_for_slot, tokens_per_s=self._rate.rate(), healthy=healthy
            )
        return EngineStats(
            running=metrics.active_seqs,
            waiting=metrics.waiting_seqs + waiting_for_slot,
            kv_cache_usage=min(1.0, max(0.0, float(metrics.cache_usage))),
            tokens_per_s=self._rate.rate(),
            healthy=healthy,
        )

    @staticmethod
    def _schedule_metrics(engine):
        """The scheduler's own counters (`ScheduleMetrics`), or None where they need an await (multi-process
        PyTorch engine) or fail."""
        try:
            metrics = engine.engine.get_schedule_metrics()
        except Exception:  # noqa: BLE001 - stats must never fail the caller
            return None
        if asyncio.iscoroutine(metrics):
            metrics.close()
            return None
        return metrics

    def _health_error(self) -> str | None:
        if self._engine is None:
            return self._not_started()
        # LMDeploy's monitor probes the backend in the background (engine alive, scheduler progressing).
        snapshot = self._health.snapshot()
        if snapshot["status"] == "unhealthy":
            return f"the {self.name} engine is unhealthy: {snapshot['message']}"
        return None

    def _require_started(self):
        """LMDeploy's `AsyncEngine`, once `check_health` passes."""
        self.check_health()
        return self._engine


def _new_session(engine):
    """A session for one request, stamped (as LMDeploy's api_server does) so that `stop_all_session` also drops
    it while it still waits for a request handle."""
    session = engine.session_mgr.get()
    session.epoch = engine.epoch
    return session


class TurbomindEngine(_LMDeployEngine):
    """LMDeploy's TurboMind engine on CUDA GPUs; engine_args are `TurbomindEngineConfig` fields."""

    name = "turbomind"
    backend = "turbomind"

    async def _sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        if self._config.enable_prefix_caching:
            raise EngineError(
                "score / prompt_logprobs need all-token logits, which TurboMind does not return with prefix "
                "caching on; set engine_args.enable_prefix_caching: false for this model"
            )
        logits = await self._require_started().async_get_logits(input_ids=sequences)
        return await asyncio.to_thread(_logprobs_from_logits, logits, sequences)


def _logprobs_from_logits(logits: list, sequences: list[list[int]]) -> list[list[float]]:
    """Row i of a sequence's logits predicts token i + 1."""
    import torch

    results = []
    for sequence_logits, ids in zip(logits, sequences):
        targets = torch.tensor(ids[1:], device=sequence_logits.device)
        values: list[float] = []
        for start in range(0, len(ids) - 1, _LOGIT_ROWS_PER_CHUNK):
            end = min(start + _LOGIT_ROWS_PER_CHUNK, len(ids) - 1)
            log_probs = torch.log_softmax(sequence_logits[start:end].float(), dim=-1)
            values += log_probs.gather(1, targets[start:end].unsqueeze(1)).squeeze(1).tolist()
        results.append(values)
    return results


class LMDeployPytorchEngine(_LMDeployEngine):
    """LMDeploy's PyTorch engine on Ascend NPUs; engine_args are `PytorchEngineConfig` fields."""

    name = "lmdeploy-pytorch"
    backend = "pytorch"

    async def _sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return list(await asyncio.gather(*(self._input_logprobs(ids) for ids in sequences)))

    async def _input_logprobs(self, ids: list[int]) -> list[float]:
        """A scoring-only request: no new tokens, log-probs of the input's own tokens from position 1 on."""
        engine = self._require_started()
        session = _new_session(engine)
        gen_config = GenerationConfig(max_new_tokens=0, logprobs=0, logprob_start_len=0)
        prepared = await self._preprocess(engine, session, ids, gen_config)
        outputs = engine.generate(prepared, stream_response=False)
        rows, targets = None, None
        try:
            async for output in outputs:
                if output.logprobs:
                    rows, targets = output.logprobs, output.logprob_token_ids
        finally:
            await outputs.aclose()
            engine.session_mgr.remove(session)
        if rows is None or targets is None or len(rows) != len(ids) - 1:
            raise EngineError(f"LMDeploy returned no input log-probs for a {len(ids)}-token sequence")
        # Each row maps token id -> log-prob; logprobs=0 asks for the target token's alone.
        return [row[token] for row, token in zip(rows, targets)]
