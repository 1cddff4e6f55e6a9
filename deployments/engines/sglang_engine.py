"""The SGLang engine (`sglang.Engine`, SGLang 0.5.23) behind the `Engine` seam, inside a Ray Serve replica.

Where SGLang runs. A replica's user code runs on a thread that is not the process's main thread, next to
Ray's own event loops. `sglang.Engine.__init__` blocks until the model is loaded, spawns its scheduler
and detokenizer subprocesses, and binds its TokenizerManager (zmq.asyncio sockets, asyncio locks, its
`handle_loop` task) to whichever loop first uses it. So each `SGLangEngine` owns one dedicated thread,
`EngineThread`, with its own asyncio loop: the engine is built there, and every SGLang call, async or
not, later runs on that loop (`run_coroutine_threadsafe`); the replica's loop only awaits futures and
receives detached result dicts. What SGLang 0.5.23's launch path does off the main thread, and how it is
handled (no SGLang source is patched):

- Signal handlers (SIGQUIT in `_set_envs_and_config`, SIGTERM/SIGQUIT in `auto_create_handle_loop`)
  are installed only on the main thread; SGLang skips them elsewhere. A crashing child then signals
  SIGQUIT to the replica process, whose default action ends it, and Serve replaces the replica. Until
  then `check_health` reports dead children.
- The children set PR_SET_PDEATHSIG, which Linux delivers when the *thread* that spawned them exits,
  not the process. The engine thread therefore lives exactly as long as the engine: children die with
  it, never earlier.
- `Engine.__init__` calls `asyncio.get_event_loop()` (via `_ensure_event_loop`), which off the main
  thread only works once a loop is set for that thread: the engine thread sets its own before building.
  Importing `sglang.srt.entrypoints.engine` installs uvloop's loop policy process-wide, and
  `configure_logger` replaces the root logger's handlers (`basicConfig(force=True)`): both are put back
  as they were, so the rest of the replica keeps Ray's setup. `mp.set_start_method("spawn", force=True)`
  stays (SGLang spawns more processes later).
- The sync API (`Engine.flush_cache`, `get_server_info`, ...) runs `loop.run_until_complete` on the
  engine's loop, which is already running: the adapter awaits the TokenizerManager coroutines those
  methods wrap (`flush_cache`, `get_loads`) on the engine thread instead.
- Shutdown: the loop's tasks (request streams, SGLang's own `handle_loop`) are cancelled first (should
  `handle_loop` fail on a closed socket instead, SGLang kills the whole process), then, still on the
  engine thread, `Engine.shutdown()` (which SIGKILLs *every* child of the process and waits for them) and
  `kill_process_trees` over the children recorded at launch as a backstop; `Engine.__init__`'s
  `atexit` hook is unregistered. A launch that fails half way (say a scheduler dies loading the model)
  leaves no engine object to shut down: the children that appeared during it are killed instead.

Requests are sent as token ids tokenized with the replica's tokenizer (the one `base_model` uses to
count and to score), so prompt length is checked here, exactly, as `PromptTooLongError`. Streams use
SGLang's `incremental_streaming_output` (Tandem's default; cumulative streams are handled too) and are
mapped to `Delta`s by `delta_from_result`: SGLang's output ids go through the seam's `DeltaMapper`, so the
text is Tandem's own detokenization, cut at stop strings as on every engine. (SGLang's streamed text is not
used: it trims a stop string only from its final chunk, after it may already have streamed the stop
string's first characters.) SGLang applies a request's `sampling_seed` only under
`enable_deterministic_inference`; without it a seed is best effort, as OpenAI documents `seed` (the replica
logs this once), so clients need not change when a model moves between engines.

Config checking and the sampling mapping, which need no GPU, are in `sglang_config.py`; the engine thread and
process clean-up in `sglang_thread.py`.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from deployments.engines.engine import Delta, Engine, EngineError, EngineStats, GenerationRequest, PromptTooLongError
from deployments.engines.sglang_config import build_server_args, sampling_params
from deployments.engines.sglang_thread import EngineThread, child_pids, kill_process_trees, process_alive
from deployments.engines.text import DeltaMapper

logger = logging.getLogger("ray.serve")

_WATCHDOG_S = 1.0  # a stream waiting for output checks this often that the engine is alive
_LOAD_POLL_S = 1.0  # how often stats() figures are refreshed from SGLang's load snapshots


# -- SGLang results -> Deltas --------------------------------------------------------------------


@dataclass
class ResultState:
    """What `delta_from_result` remembers between the result dicts of one streamed request."""

    mapper: DeltaMapper  # the request's ids -> Deltas (text, stop strings and ids, usage)
    incremental: bool = True  # the server's incremental_streaming_output (else output ids are cumulative)
    ids_seen: int = 0  # cumulative streams: ids already consumed
    engine_finished: bool = False  # SGLang ended the request (else a stop matched here, or not done)

    @property
    def finished(self) -> bool:
        return self.mapper.finished


_PROMPT_TOO_LONG = re.compile(r"The input \((\d+) tokens\) is longer than the model's context length \((\d+) tokens\)")
_TOTAL_TOO_LONG = re.compile(
    r"maximum context length of (\d+) tokens\. You requested a total of \d+ tokens: (\d+) tokens from the "
    r"input messages and (\d+) tokens for the completion"
)


def _client_error(message: str) -> ValueError:
    """SGLang's request-validation message as a ValueError (`PromptTooLongError` when it is one)."""
    if m := _PROMPT_TOO_LONG.search(message):
        return PromptTooLongError(int(m[1]), int(m[2]))
    if m := _TOTAL_TOO_LONG.search(message):
        return PromptTooLongError(int(m[2]), int(m[1]), int(m[3]))
    return ValueError(message)


def delta_from_result(result: dict, state: ResultState) -> Delta | None:
    """One SGLang result dict (`{"output_ids", "meta_info": {"finish_reason", ...}}`, as
    `async_generate(stream=True)` yields them) as the next `Delta`, or None when it adds nothing.
    `finish_reason` is SGLang's `FINISH_*.to_json()`: {"type": "stop", "matched": str | int},
    {"type": "length", "length": n} or {"type": "abort", "message", "status_code", "err_type"}.

    The ids go through `state.mapper`, which decodes them, matches stop strings and stop token ids, and counts
    usage; a stop SGLang matched is handed on as `matched` (a stop token id or EOS: not text; a stop string).
    An abort SGLang reports with a 4xx status raises ValueError (`PromptTooLongError` for length), with 5xx
    EngineError; a plain abort is finish_reason "abort". Once a delta finishes the request, `state.finished`
    is set; when `state.engine_finished` is not, SGLang is still generating and the caller should abort it.
    """
    if state.finished:
        raise EngineError("result after the request finished")
    meta = result.get("meta_info") or {}
    finish = meta.get("finish_reason")
    ids = list(result.get("output_ids") or ())
    if not state.incremental:  # cumulative: everything so far
        ids = ids[state.ids_seen :]
    state.ids_seen += len(ids)
    if finish is None:
        return state.mapper.feed(ids)

    state.engine_finished = True
    kind = finish.get("type")
    if kind == "abort":
        status = finish.get("status_code")
        message = finish.get("message") or "aborted"
        if isinstance(status, int) and 400 <= status < 500:
            raise _client_error(message)
        if isinstance(status, int) and status >= 500:
            raise EngineError(f"SGLang aborted the request: {message}")
    if kind == "stop":
        return state.mapper.feed(ids, "stop", finish.get("matched"))
    return state.mapper.feed(ids, "length" if kind == "length" else "abort")


def _detached(result: dict) -> dict:
    """The fields `delta_from_result` reads, copied on the engine thread: SGLang may keep growing the
    lists it hands out (cumulative streams)."""
    return {
        "output_ids": list(result.get("output_ids") or ()),
        "meta_info": dict(result.get("meta_info") or {}),
    }


def _translate(error: BaseException) -> BaseException:
    if isinstance(error, (PromptTooLongError, EngineError)):
        return error
    if isinstance(error, ValueError):
        return _client_error(str(error))
    if isinstance(error, asyncio.CancelledError):
        return EngineError("the SGLang engine shut down")
    return EngineError(f"SGLang request failed: {error!r}")


def _import_sglang_engine():
    """`sglang.Engine`, imported without keeping the uvloop loop policy its modules install on import."""
    policy = asyncio.get_event_loop_policy()
    try:
        from sglang.srt.entrypoints.engine import Engine as SGLangCore
    finally:
        asyncio.set_event_loop_policy(policy)
    return SGLangCore


@dataclass
class _Launch:
    core: Any
    core_pids: list[int]  # SGLang's schedulers and detokenizer: health
    launched_pids: set[int]  # every child that appeared during the launch: clean-up


# -- the engine ----------------------------------------------------------------------------------


class SGLangEngine(Engine):
    """SGLang's runtime (`sglang.Engine`) on `device_count` GPUs (its tensor-parallel size).

    engine_args: any SGLang 0.5.23 `ServerArgs` field (e.g. mem_fraction_static, context_length,
    max_running_requests, chunked_prefill_size, attention_backend, enable_deterministic_inference),
    except those in `_OWNED_ARGS`. See the module docstring for how it runs inside a replica."""

    name = "sglang"
    # Scoring is a prefill-only request, which SGLang accepts only shorter than the context.
    scoring_headroom = 1

    def __init__(self, model_path: str, engine_args: dict, *, tokenizer, device_count: int = 1):
        self._model_path = str(model_path)
        self._engine_args = dict(engine_args or {})
        self._device_count = device_count
        self._tokenizer = tokenizer
        self._thread: EngineThread | None = None
        self._launch: _Launch | None = None
        self._incremental = True
        self._deterministic = False
        self._warned_seed = False
        self._context_len = 0
        self._vocab_size = 0
        self._inflight = 0
        self._prompt_tokens = self._cached_prompt_tokens = 0
        self._loads: list = []  # SGLang's latest LoadSnapshots, one per DP rank

    # -- lifecycle -------------------------------------------------------------------------------

    def _create_core(self, server_args):
        """Launch `sglang.Engine` (on the engine thread). The one accelerator-bound step."""
        return _import_sglang_engine()(server_args=server_args)

    def _build(self) -> _Launch:
        server_args = build_server_args(self._model_path, self._engine_args, self._device_count)
        self._incremental = bool(server_args.incremental_streaming_output)
        self._deterministic = bool(server_args.enable_deterministic_inference)
        before = child_pids()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            core = self._create_core(server_args)
        except BaseException:
            kill_process_trees(child_pids() - before)  # a half-finished launch has no engine to shut down
            raise
        finally:  # SGLang's configure_logger replaced the root handlers (basicConfig(force=True))
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            for handler in handlers:
                if handler not in root.handlers:
                    root.addHandler(handler)
            root.setLevel(level)
        return _Launch(core, list(core.get_all_child_pids()), child_pids() - before)

    @staticmethod
    def _teardown(launch: _Launch) -> None:
        """On the engine thread, after its loop stopped."""
        core = launch.core
        try:
            core.shutdown()
        except Exception:  # noqa: BLE001 - the backstop below still runs
            logger.exception("sglang.Engine.shutdown failed")
        finally:
            atexit.unregister(core.shutdown)
            kill_process_trees(set(launch.core_pids) | launch.launched_pids)
            multiprocessing.active_children()  # reaps SGLang's killed mp.Process children (no zombies)

    async def start(self) -> None:
        if self._thread is not None:
            raise EngineError("the sglang engine is already started")
        thread = EngineThread(f"sglang-engine-{Path(self._model_path).name}")
        self._thread = thread
        try:
            launch = await thread.start(self._build, self._teardown)
        except BaseException:  # the thread has cleaned up (or will, once a cancelled launch finishes)
            self._thread = None
            raise
        try:
            manager = launch.core.tokenizer_manager
            self._context_len = int(manager.context_len)
            self._vocab_size = int(manager.model_config.vocab_size)
            if self._tokenizer is None:
                self._tokenizer = manager.tokenizer
        except BaseException:
            self._thread = None
            await thread.stop()
            raise
        self._launch = launch
        thread.submit(self._poll_loads(manager))

    async def shutdown(self) -> None:
        thread = self._thread
        self._thread, self._launch, self._loads = None, None, []
        if thread is None:
            return
        # Streams still open end with EngineError once their pumps are cancelled on the engine thread.
        await thread.stop()

    async def _poll_loads(self, manager) -> None:
        """On the engine loop: keep `stats()` figures fresh without blocking the replica's loop."""
        while True:
            try:
                self._loads = list(await manager.get_loads())
            except Exception as e:  # noqa: BLE001 - stats are best-effort
                logger.debug("sglang get_loads failed: %r", e)
            await asyncio.sleep(_LOAD_POLL_S)

    def _require_started(self) -> tuple[EngineThread, Any]:
        """The engine thread and `sglang.Engine`, once `check_health` passes."""
        self.check_health()
        return self._thread, self._launch.core

    # -- generation ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        thread, core = self._require_started()
        sp = request.sampling
        params = sampling_params(sp, tokenizer=self._tokenizer, vocab_size=self._vocab_size)
        if sp.seed is not None and sp.temperature > 0 and not self._deterministic and not self._warned_seed:
            self._warned_seed = True
            logger.warning(
                "a request sent a seed: SGLang applies it only with engine_args.enable_deterministic_inference: true, "
                "so sampled answers are not reproducible on this replica"
            )
        ids = await self._prompt_token_ids(request)
        self._check_fits(len(ids), sp.max_tokens)

        # SGLang request ids must be unique among live requests; callers' ids need not be.
        rid = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        results: asyncio.Queue = asyncio.Queue()
        replica_loop = asyncio.get_running_loop()
        end = object()

        def put(item) -> None:  # engine thread -> this loop
            try:
                replica_loop.call_soon_threadsafe(results.put_nowait, item)
            except RuntimeError:
                pass  # this loop is closed: nobody is listening

        async def pump() -> None:  # on the engine loop
            try:
                stream = await core.async_generate(input_ids=ids, sampling_params=params, stream=True, rid=rid)
                async for result in stream:
                    put(_detached(result))
                put(end)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)
                if not isinstance(e, Exception):
                    raise

        state = ResultState(DeltaMapper(self._tokenizer, sp, ids), incremental=self._incremental)
        future = thread.submit(pump())
        self._inflight += 1
        try:
            while True:
                try:
                    item = await asyncio.wait_for(results.get(), timeout=_WATCHDOG_S)
                except asyncio.TimeoutError:
                    self.check_health()  # a dead engine would never answer: fail instead of hanging
                    continue
                if item is end:
                    raise EngineError(f"SGLang ended request {request.request_id} without a finish reason")
                if isinstance(item, BaseException):
                    raise _translate(item) from item
                delta = delta_from_result(item, state)
                if state.engine_finished:
                    # SGLang's radix cache: how much of the prompt it served (meta_info of the last result).
                    meta = item.get("meta_info") or {}
                    self._prompt_tokens += int(meta.get("prompt_tokens") or 0)
                    self._cached_prompt_tokens += int(meta.get("cached_tokens") or 0)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            # Consumer gone (aclose, cancellation), a stop string matched here, or an error: free the
            # request's slot in SGLang, then end the pump.
            self._inflight -= 1
            if not state.engine_finished:
                thread.call_soon(core.tokenizer_manager.abort_request, rid)
            future.cancel()

    # -- scoring and prompt log-probs ------------------------------------------------------------

    async def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        thread, core = self._require_started()
        sequences = self._logprob_sequences(token_ids)
        rows = [i for i, ids in enumerate(sequences) if len(ids) > 1]
        out: list[list[float | None]] = [[None] * len(ids) for ids in sequences]
        if not rows:
            return out  # nothing to predict
        # One batched prefill-only request: SGLang's input_token_logprobs from position 0.
        coro = core.async_generate(
            input_ids=[sequences[i] for i in rows],
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=0,
        )
        try:
            results = await thread.run(coro)
        except Exception as e:  # noqa: BLE001 - translated for the caller
            raise _translate(e) from e
        for i, result in zip(rows, results):
            entries = result["meta_info"]["input_token_logprobs"]  # [(logprob, token id, text), ...]
            logprobs = [None if lp is None else float(lp) for lp, *_ in entries]
            n = len(sequences[i])
            if len(logprobs) == n - 1:
                logprobs = [None, *logprobs]
            if len(logprobs) != n:
                raise EngineError(f"SGLang returned {len(logprobs)} prompt log-probs for {n} tokens")
            logprobs[0] = None
            out[i] = logprobs
        return out

    async def flush_cache(self) -> int:
        """SGLang's flush_cache (refused while requests run). SGLang does not say how much it freed: 0."""
        thread, core = self._require_started()
        result = await thread.run(core.tokenizer_manager.flush_cache())
        if not result.success:
            raise EngineError(f"SGLang did not flush its cache: {result.message or 'requests are running'}")
        return 0

    # -- health and load -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        healthy = self.healthy()
        loads = self._loads
        if not loads:
            return EngineStats(running=self._inflight, healthy=healthy)
        running = sum(load.num_running_reqs for load in loads)
        waiting = sum(load.num_waiting_reqs for load in loads)
        return EngineStats(
            running=running,
            # Requests still being tokenized or queued on their way to the scheduler wait too.
            waiting=max(waiting, self._inflight - running),
            kv_cache_usage=min(1.0, max(0.0, max(load.token_usage for load in loads))),
            tokens_per_s=float(sum(load.gen_throughput for load in loads)),
            healthy=healthy,
            prompt_tokens=self._prompt_tokens,
            cached_prompt_tokens=self._cached_prompt_tokens,
        )

    def _health_error(self) -> str | None:
        thread, launch = self._thread, self._launch
        if thread is None or launch is None:
            return self._not_started()
        if not thread.is_alive():
            return "the sglang engine thread is not running"
        dead = [pid for pid in launch.core_pids if not process_alive(pid)]
        if dead:
            return f"SGLang subprocess(es) {dead} exited"
        return None

    @property
    def max_model_len(self) -> int:
        if not self._context_len:
            raise EngineError(self._not_started())
        return self._context_len
