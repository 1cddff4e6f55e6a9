"""The agent deployment: a Ray Serve deployment that hosts one registered SGLang program.

    AgentDeployment.bind(name, "deployments.programs:self_consistency", base_model_handle,
                         max_calls=32, timeout_s=60)

Handle methods:

- `describe()` -> {"name", "program", "doc", "arguments": [names], "required": [names], "schema"}
  (`schema`: JSON schema of the arguments object, from the program's annotations and defaults)
- `stats()` -> this replica's runs since it started: {"replica", "runs", "errors", "run_seconds"}
  (`run_seconds`: wall-clock times of its last `RunStats.KEEP` successful runs, for percentiles)
- `run(arguments)` -> {"answer", "variables", "session_id", "calls"}
- `run_stream(arguments)` -> async generator of {"variable": name, "delta": text} events (in the
  order the program produces text), then one {"done": True, "answer", "variables", "session_id",
  "calls"}; call it with `handle.options(stream=True)`.

Only the program registered at construction can run: clients send argument *values* (JSON data),
checked against the program's signature (names, and types from annotations or defaults: a bad
one is an `AgentArgumentError` naming it); nothing they send is imported or executed. Each run gets
its own `HandleBackend` (one Serve session id, so a consistent-hash router keeps the run on one
base-model replica; its own call budget and deadline). Programs run off the event loop, in threads
(SGLang's interpreter is synchronous and threaded). A failing program raises `AgentProgramError`
naming the program and the message; a limit raises `AgentLimitError`; the replica stays healthy.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import logging
import re
import threading
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from pydantic import TypeAdapter, ValidationError

from ray import serve
from sglang.lang.ir import SglFunction

from deployments import metrics
from deployments.pools import PoolBalancer
from deployments.replica import in_replica
from deployments.agents.backend import HandleBackend, ModelContext
from deployments.agents.errors import AgentArgumentError, AgentLimitError, AgentProgramError, RunCancelledError
from deployments.base_model import BaseModelServer
from deployments.local_handle import LocalModelHandle

logger = logging.getLogger("ray.serve")

# Keywords of SglFunction.run: a program argument with one of these names could never be passed.
RESERVED_ARGUMENTS = frozenset(
    name
    for name, p in inspect.signature(SglFunction.run).parameters.items()
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"
)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# The one model of an agent's PoolBalancer.
_MODEL = "model"
# After the deadline, how long the replica waits for the program thread to notice before answering.
_DEADLINE_GRACE_S = 2.0


def load_program(path: str) -> SglFunction:
    """Import an `@sgl.function` from "package.module:function"."""
    if not isinstance(path, str) or not _IMPORT_PATH.match(path):
        raise ValueError(f"program must be an import path of the form 'package.module:function', got {path!r}")
    module_name, attr = path.split(":")
    module = importlib.import_module(module_name)
    try:
        program = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"program {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(program, SglFunction):
        raise TypeError(f"program {path!r} is a {type(program).__name__}, not an @sgl.function")
    return program


def program_arguments(program: SglFunction, path: str = "program") -> tuple[list[str], list[str]]:
    """(argument names, required names) of an @sgl.function, without `s` and bound arguments."""
    params = list(inspect.signature(program.func).parameters.values())
    if not params or params[0].name != "s":
        raise TypeError(f"program {path}: the first parameter must be 's'")
    names, required = [], []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"program {path}: *args / **kwargs parameters are not allowed (got {p})")
        if p.name in program.bind_arguments:
            continue
        if p.name in RESERVED_ARGUMENTS:
            raise TypeError(
                f"program {path}: argument {p.name!r} collides with SglFunction.run's own keyword of "
                f"that name; rename it"
            )
        names.append(p.name)
        if p.default is p.empty:
            required.append(p.name)
    return names, required


def argument_types(program: SglFunction, names: list[str]) -> dict[str, TypeAdapter | None]:
    """Each argument's type as a pydantic adapter: its annotation, else the type of its default when
    that is a str / int / float / bool; None (any JSON value) for an unannotated argument without
    such a default. Runs check their arguments against these (strictly: "3" is not an int)."""
    try:
        hints = typing.get_type_hints(program.func)
    except Exception as e:  # noqa: BLE001 - any unresolvable annotation
        raise TypeError(f"program {program.func.__module__}:{program.func.__name__}: cannot resolve its annotations: {e}") from None
    params = inspect.signature(program.func).parameters
    types: dict[str, TypeAdapter | None] = {}
    for name in names:
        hint = hints.get(name)
        if hint is None and type(params[name].default) in (str, int, float, bool):
            hint = type(params[name].default)
        types[name] = None if hint is None else TypeAdapter(hint)
    return types


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > 32:
        raise ValueError(f"{where}: nested too deeply")
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: object keys must be strings, got {k!r}")
            _check_json(v, f"{where}.{k}", depth + 1)
        return
    raise ValueError(f"{where}: only JSON values (str, number, bool, null, list, object) are accepted, got {type(value).__name__}")


def _type_name(adapter: TypeAdapter) -> str:
    return str(adapter.json_schema().get("type", "a value of the declared type"))


def _jsonable(value: Any) -> Any:
    try:
        _check_json(value, "value")
        return value
    except ValueError:
        return str(value)


def _describe(e: BaseException) -> tuple[str, str]:
    cause = getattr(e, "cause", None) or e
    return type(cause).__name__, str(cause)


class RunStats:
    """Counts of one replica's runs, for the console (`stats()`), fed by the metrics decorators with
    their status: every run that ends counts in `runs`; one that raised (status invalid, limit or
    error; not cancelled) also in `errors`; a successful one adds its wall-clock time to
    `run_seconds` (the last KEEP)."""

    KEEP = 256

    def __init__(self):
        self.runs = 0
        self.errors = 0
        self.run_seconds: collections.deque[float] = collections.deque(maxlen=self.KEEP)

    def done(self, status: str, seconds: float) -> None:
        self.runs += 1
        if status == "ok":
            self.run_seconds.append(seconds)
        elif status != "cancelled":
            self.errors += 1


class _Run:
    """One execution of the program, in threads; the replica's event loop only polls it."""

    def __init__(self, server: "AgentServer", kwargs: dict, stream: bool, model):
        self.server = server
        self.model = model  # the base-model handle for this run (one pool: a run's prefix stays warm)
        self.kwargs = kwargs
        self.stream = stream
        self.session_id = uuid.uuid4().hex
        self.backend: HandleBackend | None = None
        self.state = None
        self.ret = None
        self.error: BaseException | None = None  # raised by the program function itself
        self.function_done = threading.Event()

    def start(self) -> None:
        """Blocking: creates the backend and starts the program (returns at once when streaming)."""
        server = self.server
        self.backend = HandleBackend(
            self.model,
            self.session_id,
            context=server.model_context(self.model),
            max_calls=server.max_calls,
            timeout_s=server.timeout_s,
        )

        def runner(s, **kwargs):
            try:
                self.ret = server.program.func(s, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported by result()
                self.error = e
            finally:
                self.function_done.set()

        wrapped = SglFunction(runner, bind_arguments=server.program.bind_arguments)
        self.state = wrapped.run(**self.kwargs, backend=self.backend, stream=self.stream)

    def finished(self) -> bool:
        return self.function_done.is_set() and self.state is not None and self.state.stream_executor.is_finished

    def wait(self, timeout: float | None) -> None:
        """Blocking: waits for the program function and the interpreter's worker thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.function_done.wait(timeout)
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        self.state.stream_executor.worker.join(left)

    def overdue(self) -> bool:
        b = self.backend
        return b is not None and b.deadline is not None and time.monotonic() > b.deadline + _DEADLINE_GRACE_S

    def variables(self) -> dict:
        exe = self.state.stream_executor if self.state is not None else None
        if exe is None:
            return {}
        return {k: _jsonable(v) for k, v in list(exe.variables.items())}

    def result(self) -> dict:
        """The run's result, or the error that ended it (limits first, then model calls, then the program)."""
        program = self.server.program_path
        backend_error = self.backend.error if self.backend is not None else None
        if isinstance(backend_error, (AgentLimitError, RunCancelledError)):
            raise backend_error
        if backend_error is not None:
            raise AgentProgramError(program, *reversed(_describe(backend_error)))
        exe_error = self.state.stream_executor.error_ if self.state is not None else None
        if exe_error is not None:
            raise AgentProgramError(program, *reversed(_describe(exe_error)))
        if self.error is not None:
            raise AgentProgramError(program, *reversed(_describe(self.error)))
        variables = self.variables()
        answer = variables.get("answer", _jsonable(self.ret))
        return {"answer": answer, "variables": variables, "session_id": self.session_id, "calls": self.backend.calls}

    def abort(self, error: BaseException) -> None:
        if self.backend is not None:
            self.backend.abort(error)


class AgentServer:
    """One agent replica. See the module docstring.

    `model` is a handle to a base-model deployment, or the pools of a model as the app builder
    binds them ([{"handle", **pool info}]: each run goes to one pool with a running replica, picked
    as the gateway picks); or, with `own_model` ({"source", "engine", "engine_args",
    "device_count"}), the replica starts that engine itself and serves its programs from it through
    a `LocalModelHandle`.
    """

    async def __init__(
        self,
        name: str,
        program: str,
        model,
        max_calls: int = 64,
        timeout_s: float = 120.0,
        max_concurrent_runs: int = 32,
        own_model: dict | None = None,
    ):
        if (model is None) == (own_model is None):
            raise ValueError("give exactly one of model (a base-model handle) or own_model")
        self.own_server = None
        if own_model is not None:
            server = BaseModelServer.__new__(BaseModelServer)
            await server.__init__(
                f"{name}-own-model", own_model["source"], own_model["engine"], own_model.get("engine_args"),
                device_count=own_model.get("device_count", 1),
            )
            self.own_server = server
            model = LocalModelHandle(server, asyncio.get_running_loop())
        self.pools: PoolBalancer | None = None
        if isinstance(model, list):
            app_name = serve.get_replica_context().app_name if in_replica() else None
            self.pools = PoolBalancer.from_bound({_MODEL: model}, app_name)
        self.name = name
        self.program_path = program
        self.program = load_program(program)
        if self.program.num_api_spec_tokens is not None:
            raise ValueError(f"program {program}: API speculative execution (num_api_spec_tokens) is not supported")
        self.arguments, self.required = program_arguments(self.program, program)
        self.argument_types = argument_types(self.program, self.arguments)
        if not isinstance(max_calls, int) or isinstance(max_calls, bool) or max_calls < 1:
            raise ValueError(f"max_calls must be an integer >= 1, got {max_calls!r}")
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        self.model = model
        self.max_calls = max_calls
        self.timeout_s = float(timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent_runs, thread_name_prefix=f"agent-{name}")
        self._context: ModelContext | None = None
        self._context_lock = threading.Lock()
        self.run_stats = RunStats()

    # -- helpers -----------------------------------------------------------------------------------

    def model_context(self, handle) -> ModelContext:
        """The base model's info and derived chat template, fetched once (blocking)."""
        with self._context_lock:
            if self._context is None:
                self._context = ModelContext.fetch(handle)
            return self._context

    async def _run_model(self):
        """The base-model handle for a new run."""
        if self.pools is None:
            return self.model
        await self.pools.ensure_counts()
        return self.pools.pick(_MODEL).handle

    def _validate(self, arguments: dict | None) -> dict:
        expected = f"expected arguments: {self.arguments} (required: {self.required})"
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise AgentArgumentError(f"agent {self.name!r}: arguments must be an object, got {type(arguments).__name__}; {expected}")
        unexpected = sorted(str(k) for k in arguments if k not in self.arguments)
        if unexpected:
            raise AgentArgumentError(f"agent {self.name!r}: unexpected argument(s) {unexpected}; {expected}", unexpected[0])
        missing = [n for n in self.required if n not in arguments]
        if missing:
            raise AgentArgumentError(f"agent {self.name!r}: missing required argument(s) {missing}; {expected}", missing[0])
        checked = {}
        for k, v in arguments.items():
            try:
                _check_json(v, f"agent {self.name!r}: argument {k!r}")
            except ValueError as e:
                raise AgentArgumentError(str(e), k) from None
            adapter = self.argument_types[k]
            if adapter is None:
                checked[k] = v
                continue
            try:
                checked[k] = adapter.validate_python(v, strict=True)
            except ValidationError as e:
                err = e.errors()[0]
                where = "".join(f"[{p!r}]" for p in err["loc"])
                raise AgentArgumentError(
                    f"agent {self.name!r}: argument {k!r}{where}: {err['msg']} "
                    f"(expected {_type_name(adapter)}, got {type(v).__name__})",
                    k,
                ) from None
        return checked

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _overdue(self, run: _Run) -> None:
        if run.overdue():
            err = AgentLimitError("timeout_s", self.timeout_s, "the program did not finish in time")
            run.abort(err)
            raise err

    async def _execute(self, run: _Run) -> None:
        """Runs the program to completion in the executor's threads, without blocking the loop; raises
        AgentLimitError once the run is past its deadline (plus a grace period)."""

        def execute():
            run.start()
            run.wait(self.timeout_s + _DEADLINE_GRACE_S)

        fut = asyncio.ensure_future(self._in_thread(execute))
        while not fut.done():
            await asyncio.wait({fut}, timeout=0.25)
            if not fut.done():
                self._overdue(run)
        await fut  # raises what start() raised (e.g. the base model is unreachable)
        if not run.finished():
            self._overdue(run)
            raise AgentLimitError("timeout_s", self.timeout_s, "the program did not finish in time")

    # -- handle methods ------------------------------------------------------------------------------

    async def describe(self) -> dict:
        return {
            "name": self.name,
            "program": self.program_path,
            "doc": inspect.cleandoc(self.program.func.__doc__ or ""),
            "arguments": list(self.arguments),
            "required": list(self.required),
            # JSON schema of the arguments object ({} for an argument of any JSON value).
            "schema": {
                "type": "object",
                "properties": {n: (a.json_schema() if a else {}) for n, a in self.argument_types.items()},
                "required": list(self.required),
                "additionalProperties": False,
            },
        }

    async def stats(self) -> dict:
        replica = serve.get_replica_context().replica_id.unique_id if in_replica() else "local"
        st = self.run_stats
        return {"replica": replica, "runs": st.runs, "errors": st.errors, "run_seconds": list(st.run_seconds)}

    @metrics.record_agent_run
    async def run(self, arguments: dict | None = None) -> dict:
        kwargs = self._validate(arguments)
        run = _Run(self, kwargs, stream=False, model=await self._run_model())
        try:
            await self._execute(run)
        except asyncio.CancelledError:
            run.abort(RunCancelledError("the caller cancelled the run"))
            raise
        return run.result()

    @metrics.record_agent_stream
    async def run_stream(self, arguments: dict | None = None) -> AsyncIterator[dict]:
        kwargs = self._validate(arguments)
        run = _Run(self, kwargs, stream=True, model=await self._run_model())
        completed = False
        try:
            await self._in_thread(run.start)
            seen: dict[str, str] = {}

            def deltas():
                for name, value in run.variables().items():
                    if not isinstance(value, str):
                        continue  # lists from fork joins and the like arrive in the final event
                    old = seen.get(name)
                    if old == value:
                        continue
                    seen[name] = value
                    if old is not None and not value.startswith(old):
                        yield {"variable": name, "delta": value, "replace": True}
                    elif value[len(old or "") :]:
                        yield {"variable": name, "delta": value[len(old or "") :]}

            while not run.finished():
                self._overdue(run)
                for event in deltas():
                    yield event
                await asyncio.sleep(0.01)
            for event in deltas():
                yield event
            result = run.result()
            completed = True
            yield {"done": True, **result}
        finally:
            if not completed:
                run.abort(RunCancelledError("the run's stream was closed before the program finished"))

    def check_health(self) -> None:
        # A failing program never makes the replica unhealthy; a dead own engine does.
        if self.own_server is not None:
            self.own_server.check_health()

    async def __del__(self):
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.own_server is not None:
            await self.own_server.engine.shutdown()


AgentDeployment = serve.deployment(AgentServer, name="Agent")
