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
mapped to `Delta`s by `delta_from_result`. Requests with stop strings run with SGLang's `no_stop_trim`,
and Tandem's `StopStringMatcher` cuts the text: SGLang trims a stop string only from its final chunk,
after it may already have streamed the stop string's first characters. SGLang applies a request's
`sampling_seed` only under `enable_deterministic_inference`; without it a seed is best effort, as
OpenAI documents `seed` (the replica logs this once), so clients need not change when a model moves
between engines.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import difflib
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import threading
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import psutil

from deployments.engines.text import StopStringMatcher
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

logger = logging.getLogger("ray.serve")

# ServerArgs values Tandem sets unless engine_args says otherwise.
TANDEM_DEFAULTS: dict[str, Any] = {
    "log_level": "warning",  # SGLang's "info" logs every batch
    # Each streamed chunk is a fresh delta (text and ids), rather than a view of lists SGLang keeps growing.
    "incremental_streaming_output": True,
}
# ServerArgs fields that come from elsewhere in Tandem's config.
_OWNED_ARGS = {
    "model_path": "the model is the model's `source`",
    "tp_size": "the tensor-parallel size is accelerator.count",
    "tokenizer_path": "SGLang must use the model's own tokenizer (the replica tokenizes with it)",
    "skip_tokenizer_init": "Tandem needs SGLang's detokenizer (streamed text, stop strings)",
    "dp_size": "a replica's accelerator.count devices are used for tensor parallelism; scale out with replicas",
    "pp_size": "a replica's accelerator.count devices are used for tensor parallelism; scale out with replicas",
    "nnodes": "a replica runs on one node",
}
# Range checks SGLang only makes when it resolves its config (which needs the GPU build): (test, allowed).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mem_fraction_static": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "context_length": (lambda v: v >= 1, "a positive number of tokens"),
    "max_running_requests": (lambda v: v >= 1, "a positive integer"),
    "max_total_tokens": (lambda v: v >= 1, "a positive number of tokens"),
}
_UNKNOWN_VOCAB = 1 << 31  # for `verify` when the vocabulary size is not known (logit_bias is never sent)
_WATCHDOG_S = 1.0  # a stream waiting for output checks this often that the engine is alive
_LOAD_POLL_S = 1.0  # how often stats() figures are refreshed from SGLang's load snapshots
_STOP_TIMEOUT_S = 120.0


# -- config: engine_args -> ServerArgs -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _server_args_fields() -> dict:
    import msgspec
    from sglang.srt.server_args import ServerArgs

    # ServerArgs is a msgspec Struct in 0.5.23 (earlier versions: a dataclass).
    return {f.name: f for f in msgspec.structs.fields(ServerArgs)}


def _arg_meta(annotation) -> Any:
    """The `Arg` metadata (choices, type_parser) of an `Annotated[T, Arg(...)]` field, if any."""
    from sglang.srt.arg_groups.arg_utils import Arg

    if typing.get_origin(annotation) is typing.Annotated:
        return next((m for m in typing.get_args(annotation)[1:] if isinstance(m, Arg)), None)
    return None


def _convert_arg(name: str, value: Any, annotation) -> Any:
    """`value` checked against the field's declared type (msgspec, strict: no "2" for 2) and choices."""
    import msgspec

    meta = _arg_meta(annotation)
    if isinstance(value, str) and meta is not None and meta.type_parser is not None:
        try:  # the CLI's human-readable forms, e.g. context_length: "32k"
            value = meta.type_parser(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"engine_args.{name}: {value!r} is not valid: {e}") from None
    try:
        value = msgspec.convert(value, annotation, strict=True)
    except msgspec.ValidationError as e:
        raise ValueError(f"engine_args.{name}: {e} (got {value!r})") from None
    except TypeError:
        pass  # a type msgspec cannot check (two list types in one union: lora_paths); SGLang checks at launch
    if meta is not None and meta.choices and value is not None:
        for item in value if isinstance(value, (list, tuple, set)) else [value]:
            if item not in meta.choices:
                raise ValueError(f"engine_args.{name} must be one of {list(meta.choices)}, got {item!r}")
    return value


def _validated_args(engine_args: dict, device_count: int, hf_config: dict | None) -> dict:
    if not isinstance(engine_args, dict):
        raise ValueError(f"engine_args must be a mapping, got {type(engine_args).__name__}")
    if not isinstance(device_count, int) or isinstance(device_count, bool) or device_count < 1:
        raise ValueError(f"accelerator.count must be a positive integer for the sglang engine, got {device_count!r}")
    fields = _server_args_fields()
    converted: dict[str, Any] = {}
    for name, value in engine_args.items():
        if name in _OWNED_ARGS:
            raise ValueError(f"engine_args.{name} cannot be set for the sglang engine: {_OWNED_ARGS[name]}")
        if name not in fields or name.startswith("_"):
            public = [f for f in fields if not f.startswith("_")]
            close = difflib.get_close_matches(str(name), public, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see `python -m sglang.launch_server --help`"
            raise ValueError(
                f"engine_args.{name} is not a field of SGLang's ServerArgs ({len(public)} fields); {hint}"
            )
        value = _convert_arg(name, value, fields[name].type)
        if name in _RANGES and value is not None:
            test, allowed = _RANGES[name]
            if not test(value):
                raise ValueError(f"engine_args.{name} must be {allowed}, got {value!r}")
        converted[name] = value
    if hf_config:
        _check_against_model(converted, device_count, hf_config)
    return converted


def _check_against_model(args: dict, tp: int, hf_config: dict) -> None:
    text_config = hf_config.get("text_config") or hf_config
    heads = text_config.get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        raise ValueError(
            f"accelerator.count {tp} is the tensor-parallel size and must divide the model's "
            f"num_attention_heads ({heads}); allowed: {[d for d in range(1, heads + 1) if heads % d == 0]}"
        )
    kv_heads = text_config.get("num_key_value_heads")
    if isinstance(kv_heads, int) and kv_heads % tp and tp % kv_heads:
        # SGLang splits KV heads across ranks, or replicates them when there are fewer heads than ranks.
        raise ValueError(
            f"accelerator.count {tp} (tensor-parallel size) must divide, or be a multiple of, the model's "
            f"num_key_value_heads ({kv_heads})"
        )
    context_length = args.get("context_length")
    max_positions = text_config.get("max_position_embeddings")
    if (
        context_length is not None
        and isinstance(max_positions, int)
        and not text_config.get("rope_scaling")
        and context_length > max_positions
        and os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "").lower() not in ("1", "true")
    ):
        raise ValueError(
            f"engine_args.context_length {context_length} exceeds the model's max_position_embeddings "
            f"({max_positions}); allowed: at most {max_positions}"
        )


def check_engine_args(engine_args: dict, device_count: int = 1, hf_config: dict | None = None) -> None:
    """The checks that need no GPU and no model load (run by `python -m cluster check`): every key is a
    field of SGLang's own `ServerArgs`, of its declared type and choices; fields Tandem sets itself are
    refused; the tensor-parallel size (`device_count`) fits the model's heads when `hf_config` is given.

    SGLang's own resolution of the config (`ServerArgs.resolve_once`: device, memory, model config) needs
    its GPU build (it imports torchvision and probes the device), so it runs in the replica, at launch."""
    _validated_args(engine_args, device_count, hf_config)


def _read_hf_config(model_path: str) -> dict | None:
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_server_args(model_path: str, engine_args: dict, device_count: int):
    """SGLang's `ServerArgs` for one replica: `tp_size` = `device_count`, Tandem's defaults
    (`TANDEM_DEFAULTS`), then the checked `engine_args`. Construction is cheap and CPU-only in 0.5.23
    (`__post_init__` does nothing; `Engine` resolves the record at launch)."""
    from sglang.srt.server_args import ServerArgs

    args = _validated_args(engine_args, device_count, _read_hf_config(model_path))
    return ServerArgs(model_path=str(model_path), tp_size=device_count, **{**TANDEM_DEFAULTS, **args})


# -- sampling ------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sampling_params(sampling: SamplingParams, *, tokenizer=None, vocab_size: int | None = None) -> dict:
    """Tandem's sampling as SGLang's `sampling_params` dict, checked by SGLang's own `SamplingParams`
    (`__post_init__`, `verify`, and `normalize` when there is a tokenizer or no stop string: SGLang needs
    one to measure stop strings). Raises ValueError.

    top_k 0 (off) is SGLang's -1; `seed` is `sampling_seed` (which SGLang applies only with
    `enable_deterministic_inference`). Requests with stop strings get `no_stop_trim`: see the module doc."""
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

    sp = sampling
    validate_sampling(sp, vocab_size)

    params: dict[str, Any] = {
        "max_new_tokens": sp.max_tokens,
        "temperature": float(sp.temperature),
        "top_p": float(sp.top_p),
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "ignore_eos": sp.ignore_eos,
        "skip_special_tokens": True,
    }
    if sp.seed is not None:
        params["sampling_seed"] = sp.seed
    if sp.stop:
        params["stop"] = list(sp.stop)
        params["no_stop_trim"] = True
    if sp.stop_token_ids:
        params["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.regex is not None:
        params["regex"] = sp.regex
    if sp.json_schema is not None:
        params["json_schema"] = sp.json_schema

    try:
        check = SGLangSamplingParams(**params)
        check.verify(vocab_size or _UNKNOWN_VOCAB)
        if tokenizer is not None or not sp.stop:
            check.normalize(tokenizer)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid sampling parameters for SGLang: {e}") from None
    return params


# -- SGLang results -> Deltas --------------------------------------------------------------------


@dataclass
class ResultState:
    """What `delta_from_result` remembers between the result dicts of one streamed request."""

    incremental: bool = True  # the server's incremental_streaming_output (else text / ids are cumulative)
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    # Decodes one token id; used to drop a stop token's text that `no_stop_trim` (sent with stop strings) keeps.
    token_text: Callable[[int], str] | None = None
    text_seen: int = 0  # cumulative streams: characters / ids already consumed
    ids_seen: int = 0
    engine_finished: bool = False  # SGLang ended the request (else a stop string matched here, or not done)
    finished: bool = False
    matcher: StopStringMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.matcher = StopStringMatcher(list(self.stop))


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
    """One SGLang result dict (`{"text", "output_ids", "meta_info": {"prompt_tokens", "completion_tokens",
    "finish_reason"}}`, as `async_generate(stream=True)` yields them) as the next `Delta`, or None when it
    adds nothing. `finish_reason` is SGLang's `FINISH_*.to_json()`: {"type": "stop", "matched": str | int},
    {"type": "length", "length": n} or {"type": "abort", "message", "status_code", "err_type"}.

    Stop strings are matched here (the text never holds a stop string or a piece of one); `stop_reason` is
    the stop string, or the stop token id when it is one of the request's `stop_token_ids` (None for EOS).
    An abort SGLang reports with a 4xx status raises ValueError (`PromptTooLongError` for length), with 5xx
    EngineError; a plain abort is finish_reason "abort". Once a delta finishes the request, `state.finished`
    is set; when `state.engine_finished` is not, SGLang is still generating and the caller should abort it.
    """
    if state.finished:
        raise EngineError("result after the request finished")
    meta = result.get("meta_info") or {}
    finish = meta.get("finish_reason")
    text = result.get("text") or ""
    ids = list(result.get("output_ids") or ())
    if not state.incremental:  # cumulative: everything so far
        text, ids = text[state.text_seen :], ids[state.ids_seen :]
    state.text_seen += len(text)
    state.ids_seen += len(ids)
    prompt_tokens = int(meta.get("prompt_tokens") or 0)
    completion_tokens = meta.get("completion_tokens")
    completion_tokens = state.ids_seen if completion_tokens is None else int(completion_tokens)

    if finish is not None:
        state.engine_finished = True
        if finish.get("type") == "abort":
            status = finish.get("status_code")
            message = finish.get("message") or "aborted"
            if isinstance(status, int) and 400 <= status < 500:
                raise _client_error(message)
            if isinstance(status, int) and status >= 500:
                raise EngineError(f"SGLang aborted the request: {message}")

    safe, hit = state.matcher.feed(text)
    if hit is not None:
        state.finished = True
        return Delta(safe, ids, prompt_tokens, completion_tokens, "stop", hit)
    if finish is None:
        return Delta(safe, ids, prompt_tokens, completion_tokens) if safe or ids else None

    state.finished = True
    safe += state.matcher.flush()
    kind, matched = finish.get("type"), finish.get("matched")
    if kind == "length":
        return Delta(safe, ids, prompt_tokens, completion_tokens, "length")
    if kind != "stop":
        return Delta(safe, ids, prompt_tokens, completion_tokens, "abort")
    stop_reason = None
    if isinstance(matched, str):
        stop_reason = matched  # a stop string SGLang matched where the text here did not show it whole
    elif _is_int(matched):
        if state.stop and state.token_text is not None:  # no_stop_trim kept the stop token's text
            token_text = state.token_text(matched)
            if token_text and safe.endswith(token_text):
                safe = safe[: -len(token_text)]
        stop_reason = matched if matched in state.stop_token_ids else None
    return Delta(safe, ids, prompt_tokens, completion_tokens, "stop", stop_reason)


def _detached(result: dict) -> dict:
    """The fields `delta_from_result` reads, copied on the engine thread: SGLang may keep growing the
    lists it hands out (cumulative streams)."""
    return {
        "text": result.get("text"),
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


# -- the engine thread and process clean-up ------------------------------------------------------


def _cancel_tasks(loop: asyncio.AbstractEventLoop, timeout: float = 10.0) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))
    loop.run_until_complete(loop.shutdown_asyncgens())


class EngineThread:
    """A thread with its own asyncio loop that builds an engine, serves its coroutines, and tears it down.

    `start(build, teardown)` runs `build()` on the thread (with the thread's loop set but not yet
    running), then runs the loop until `stop()`. After the loop stops, its remaining tasks are cancelled
    and `teardown(built)` runs, still on the thread; then the thread ends."""

    def __init__(self, name: str):
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._done: concurrent.futures.Future = concurrent.futures.Future()

    async def start(self, build: Callable[[], Any], teardown: Callable[[Any], None] | None = None) -> Any:
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(build, teardown, ready), name=self.name, daemon=True)
        self._thread.start()
        try:
            return await asyncio.wrap_future(ready)
        except asyncio.CancelledError:
            self.stop_nowait()  # the thread tears down whatever `build` returns
            raise

    def _main(self, build, teardown, ready: concurrent.futures.Future) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            ready.set_running_or_notify_cancel()
            try:
                built = build()
            except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
                ready.set_exception(e)
                return
            ready.set_result(built)
            try:
                loop.run_forever()
            finally:
                try:
                    _cancel_tasks(loop)  # before teardown: no task may see the engine's sockets close
                finally:
                    if teardown is not None:
                        teardown(built)
        except BaseException:  # noqa: BLE001 - the thread must end cleanly whatever failed
            logger.exception("engine thread %s failed while stopping", self.name)
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            self._done.set_result(None)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.loop.is_running()

    def submit(self, coro) -> concurrent.futures.Future:
        """Schedule a coroutine on the engine loop (thread-safe)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro) -> Any:
        """Run a coroutine on the engine loop and await its result from another loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def call_soon(self, fn: Callable, *args) -> None:
        """Call `fn(*args)` on the engine loop; nothing once the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def stop_nowait(self) -> None:
        self.call_soon(self.loop.stop)

    async def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop the loop and wait until the thread has run `teardown` and ended."""
        if self._thread is None:
            return
        self.stop_nowait()
        # Shielded: a timeout here must not cancel `_done`, which the thread still has to set.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)), timeout)


def child_pids() -> set[int]:
    """Direct children of this process."""
    return {p.pid for p in psutil.Process().children()}


def kill_process_trees(pids: Iterable[int], wait_timeout: float = 60.0) -> None:
    """SIGKILL each process and its descendants and wait until they have exited (SGLang's
    `kill_process_tree`). Never this process: SGLang's helper would `sys.exit` it."""
    from sglang.srt.utils import kill_process_tree

    me = os.getpid()
    for pid in sorted(set(pids)):
        if pid == me:
            continue
        try:
            kill_process_tree(pid, include_parent=True, wait_timeout=wait_timeout)
        except Exception as e:  # noqa: BLE001 - clean up the rest regardless
            logger.warning("could not kill process tree %s: %r", pid, e)


def _process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
        thread, launch = self._thread, self._launch
        if thread is None or launch is None:
            raise EngineError("the sglang engine is not started")
        return thread, launch.core

    # -- generation ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if request.prompt is not None:
            if self._tokenizer is None:
                raise EngineError("the sglang engine has no tokenizer for prompt text")
            # The caller already applied any chat template; the tokenizer adds only its default specials.
            ids = list(self._tokenizer(request.prompt)["input_ids"])
        else:
            ids = list(request.prompt_token_ids)
            if not all(_is_int(t) and 0 <= t < self._vocab_size for t in ids):
                raise ValueError(f"prompt_token_ids must be token ids in [0, {self._vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=True) if self._tokenizer is not None else ""

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
        ids = self._prompt_ids(request)
        if len(ids) >= self._context_len or len(ids) + sp.max_tokens > self._context_len:
            raise PromptTooLongError(len(ids), self._context_len, sp.max_tokens)

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

        state = ResultState(
            incremental=self._incremental, stop=sp.stop, stop_token_ids=sp.stop_token_ids, token_text=self._token_text
        )
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
        if not isinstance(token_ids, (list, tuple)) or not all(isinstance(ids, (list, tuple)) for ids in token_ids):
            raise ValueError("token_ids must be a list of token-id lists")
        sequences = [list(ids) for ids in token_ids]
        for ids in sequences:
            if not all(_is_int(t) and 0 <= t < self._vocab_size for t in ids):
                raise ValueError(f"token_ids must be token ids in [0, {self._vocab_size})")
            if len(ids) >= self._context_len:
                raise PromptTooLongError(len(ids), self._context_len)
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

    async def score(self, prompt: str, continuations: list[str]) -> list[float]:
        self._require_started()
        if not isinstance(prompt, str) or not all(isinstance(c, str) for c in continuations):
            raise ValueError("prompt and continuations must be strings")
        if not continuations:
            return []
        if self._tokenizer is None:
            raise EngineError("the sglang engine has no tokenizer to score text")
        sequences = continuation_sequences(self._tokenizer, prompt, continuations)
        logprobs = await self.prompt_logprobs([ids for ids, _ in sequences])
        return [math.fsum(lp for lp in lps[start:] if lp is not None) for lps, (_, start) in zip(logprobs, sequences)]

    async def flush_cache(self) -> int:
        """SGLang's flush_cache (refused while requests run). SGLang does not say how much it freed: 0."""
        thread, core = self._require_started()
        result = await thread.run(core.tokenizer_manager.flush_cache())
        if not result.success:
            raise EngineError(f"SGLang did not flush its cache: {result.message or 'requests are running'}")
        return 0

    # -- health and load -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        healthy = self._health_error() is None
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
        )

    def check_health(self) -> None:
        error = self._health_error()
        if error is not None:
            raise EngineError(error)

    def _health_error(self) -> str | None:
        thread, launch = self._thread, self._launch
        if thread is None or launch is None:
            return "the sglang engine is not started"
        if not thread.is_alive():
            return "the sglang engine thread is not running"
        dead = [pid for pid in launch.core_pids if not _process_alive(pid)]
        if dead:
            return f"SGLang subprocess(es) {dead} exited"
        return None

    @property
    def max_model_len(self) -> int:
        if not self._context_len:
            raise EngineError("the sglang engine is not started")
        return self._context_len
