"""Dispatching a model's requests to its pools, for the gateway.

`PoolDispatcher` picks one of a model's pools (`PoolBalancer`), starts a request's generation
streams there and waits for their first deltas, so that a bad request fails with a proper status
before any response bytes are sent. A replica lost before the response starts (its first delta;
for a response sent whole, its last) re-runs the whole request on the next pool. It counts the
request in flight to its pool until the response is done, bounds the wait for a pool with no
running replica by `cold_start_timeout_s`, and maps what replicas raise to `OpenAIError`s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any, AsyncIterator, Callable

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import context
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.openai_protocol import OpenAIError
from deployments.engines.engine import PromptTooLongError
from deployments.pools import NoPoolAvailable, Pool, PoolBalancer
from deployments.replica import cancel_call

logger = logging.getLogger("ray.serve")


def child_call(method, *args, **kwargs):
    """`method.remote(...)` under a fresh Serve internal request id. Every call the gateway makes to
    a deployment goes through here.

    Calls made while serving a request inherit that request's internal id, and Ray Serve 2.60's
    request router indexes its queued requests by that id: two concurrent calls of one HTTP request
    (n > 1, a batch) queued at the same router collide and one never gets a replica. The gateway
    cancels its child calls itself, so nothing relies on the inherited id.
    """
    current = context._get_serve_request_context()
    token = context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        return method.remote(*args, **kwargs)
    finally:
        context._serve_request_context.reset(token)


def _replica_lost(e: BaseException) -> bool:
    """A failure of the replica (or its node), not of the request: worth trying another pool."""
    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError))


def engine_error(e: BaseException, prompt_param: str) -> OpenAIError:
    """Map an exception raised by a replica (Ray wraps it, keeping the original class) to OpenAI.
    Messages come from the replica's exception itself (`cause`): str() of Ray's wrapper is its whole
    traceback."""
    cause = getattr(e, "cause", None) or e
    if isinstance(e, PromptTooLongError):
        return OpenAIError(400, str(cause), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)):
        return OpenAIError(400, str(cause), code="invalid_value")
    if isinstance(e, NoPoolAvailable):
        return OpenAIError(503, str(e), type="server_error", code="no_replica_available", retry_after_s=5)
    if _replica_lost(e):
        return OpenAIError(
            503, "The replica serving this request was lost (its node may have gone down); retry the request.",
            type="server_error", code="replica_unavailable", retry_after_s=1,
        )
    if isinstance(e, BackPressureError):
        # Every replica is at max_ongoing_requests and this caller's queue is full (max_queued_requests).
        return OpenAIError(503, "The model is overloaded; retry later.", type="server_error", code="overloaded", retry_after_s=1)
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return OpenAIError(504, "The request timed out.", type="server_error", code="timeout")
    logger.exception("request failed", exc_info=e)
    return OpenAIError(500, f"Internal error while generating: {type(cause).__name__}: {cause}", type="server_error", code="internal_error")


def _no_replica_in_time(pool: Pool, timeout: float) -> OpenAIError:
    """A pool with no running replica did not get one within its `cold_start_timeout_s`."""
    model = pool.info["model"]
    if pool.scales_from_zero():
        return OpenAIError(
            503,
            f"The model '{model}' (pool {pool.name}) is scaling up from zero replicas and none "
            f"was ready within {timeout:g} s; retry later.",
            type="server_error",
            code="model_cold_start_timeout",
            retry_after_s=timeout,
        )
    # min >= 1: its replicas were lost (e.g. with their node) or never placed; not a cold start.
    return OpenAIError(
        503,
        f"The model '{model}' (pool {pool.name}) has no running replica (lost or not yet placed: "
        f"{pool.message or pool.status}) and none was ready within {timeout:g} s; retry later.",
        type="server_error",
        code="no_replica_available",
        retry_after_s=5,
    )


# How often a request waiting for its first delta checks that its pool still has a running replica.
_REPLICA_WATCH_S = 1.0


class _PoolFailed(Exception):
    """The pool's replica was lost before the response started: the next pool may take the request."""

    def __init__(self, error: BaseException):
        self.error = error


class Lease:
    """Counts a request's streams as in flight to a pool until released (once)."""

    def __init__(self, pool: Pool, n: int):
        self.pool, self.n = pool, n
        pool.in_flight += n

    def release(self) -> None:
        if self.n:
            self.pool.in_flight -= self.n
            self.pool.served += self.n
            self.n = 0


class Choice:
    """One generation stream (one prompt x one of n samples)."""

    def __init__(self, index: int, gen: DeploymentResponseGenerator):
        self.index = index
        self.gen = gen
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stop_reason = None
        self.first: dict | None = None  # the first delta, received before the response starts
        self.logprobs: list | None = None  # the engine's log-prob entries, when the request asked for them
        self.chars = 0  # characters of text so far (completions' logprobs.text_offset)
        self.token_ids: list[list[int]] = []  # each delta's token ids (reasoning tokens are counted from them)

    async def deltas(self) -> AsyncIterator[dict]:
        if self.first is not None:
            yield self.first
        async for delta in self.gen:
            yield delta

    def take(self, delta: dict) -> str:
        """Takes a delta's text, usage, finish and log-probs into the choice; returns its text."""
        self.chars += len(self.text[-1]) if self.text else 0
        self.text.append(delta["text"])
        self.token_ids.append(delta["token_ids"])
        if delta.get("logprobs") is not None:
            self.logprobs = (self.logprobs or []) + delta["logprobs"]
        self.prompt_tokens = delta["prompt_tokens"]
        self.completion_tokens = delta["completion_tokens"]
        self.finish_reason = delta["finish_reason"] or self.finish_reason
        self.stop_reason = delta["stop_reason"] if delta["finish_reason"] else self.stop_reason
        return delta["text"]


@dataclasses.dataclass
class Generation:
    """A request's streams, started on one pool by `PoolDispatcher.start`."""

    choices: list[Choice]
    lease: Lease

    def close(self) -> None:
        """Stop generating (the client may have gone away) and end the request's lease."""
        _cancel(self.choices)
        self.lease.release()


def _cancel(choices: list[Choice]) -> None:
    for c in choices:
        cancel_call(c.gen)


class PoolDispatcher:
    """Routes a model's requests to its pools; see the module docstring."""

    def __init__(self, models: dict[str, list[dict[str, Any]]], app_name: str | None, request_timeout_s: float):
        # model name -> its pools (cluster.app.pool_info plus "handle").
        self.pools = PoolBalancer.from_bound(models, app_name)
        self.models = self.pools.models()
        self.request_timeout_s = request_timeout_s

    def check_model(self, model: str, visible: Callable[[str], bool] = lambda _: True) -> None:
        """404 unless `model` is served and `visible` (to the caller: a tenant's permissions)."""
        if model not in self.models or not visible(model):
            known = ", ".join(m for m in sorted(self.models) if visible(m)) or "none"
            raise OpenAIError(404, f"The model '{model}' does not exist. Available models: {known}.", param="model", code="model_not_found")

    def pick(self, model: str, exclude: tuple[Pool, ...] = ()) -> Pool:
        self.check_model(model)
        try:
            return self.pools.pick(model, exclude)
        except NoPoolAvailable as e:
            raise OpenAIError(503, str(e), type="server_error", code="no_replica_available") from None

    def handle(self, model: str) -> DeploymentHandle:
        """A handle to one of the model's pools, for a call outside the generation path."""
        return self.pick(model).handle

    async def call_each(self, model: str, method: str, calls: list[dict[str, Any]], prompt_param: str) -> list:
        """`method(**kwargs)` for each kwargs of `calls`, concurrently, on one pool (no failover)."""
        handle = self.handle(model)
        try:
            return await asyncio.gather(*(child_call(getattr(handle, method), **kwargs) for kwargs in calls))
        except Exception as e:  # noqa: BLE001 - mapped to an HTTP error
            raise engine_error(e, prompt_param) from None

    async def start(self, model: str, jobs: list[dict[str, Any]], prompt_param: str, collect: bool = False,
                    session_id: str | None = None) -> Generation:
        """Start every job's stream (each a `stream(**job)` call) on one of the model's pools and
        wait for its first delta. With `collect` (a response sent whole), also wait for the last
        delta; the lease then ends here. When the pool's replica is lost before the response starts
        (its first delta, or with `collect` its last), the next pool takes the whole request."""
        await self.pools.ensure_counts()  # the first request: know which pools have a running replica before picking
        tried: tuple[Pool, ...] = ()
        while True:
            pool = self.pick(model, tried)
            tried += (pool,)
            try:
                generation = await self._start_on(model, pool, jobs, prompt_param, session_id)
                if collect:
                    try:
                        await self._collect(generation.choices, prompt_param)
                    finally:
                        generation.lease.release()
                return generation
            except _PoolFailed as failed:
                if len(tried) >= len(self.pools.pools[model]):
                    raise engine_error(failed.error, prompt_param) from None
                logger.warning("pool %s of %s failed (%s); trying the next pool", pool.name, model, failed.error)

    async def _start_on(self, model: str, pool: Pool, jobs: list[dict[str, Any]], prompt_param: str,
                        session_id: str | None = None) -> Generation:
        # With no running replica, the request waits for one to start: bounded by the pool's
        # cold_start_timeout_s, whether it scales from zero or replaces replicas it lost.
        waits_for_replica = pool.has_no_running_replica()
        timeout = min(pool.info["cold_start_timeout_s"], self.request_timeout_s) if waits_for_replica else self.request_timeout_s
        lease = Lease(pool, len(jobs))
        # A session id keeps the request's calls on one replica under `routing: session`.
        stream = pool.handle.options(stream=True, **({"session_id": session_id} if session_id else {}))
        choices = [Choice(i, child_call(stream.stream, **job)) for i, job in enumerate(jobs)]
        try:
            firsts = await self._first_deltas(model, pool, choices, timeout, waits_for_replica)
        except BaseException as e:
            lease.release()
            _cancel(choices)
            if isinstance(e, (asyncio.CancelledError, _PoolFailed)):
                raise
            if waits_for_replica and isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                raise _no_replica_in_time(pool, timeout) from None
            if _replica_lost(e):
                raise _PoolFailed(e) from None
            raise engine_error(e, prompt_param) from None
        for c, first in zip(choices, firsts):
            c.first = first
        return Generation(choices, lease)

    async def _first_deltas(self, model: str, pool: Pool, choices: list[Choice], timeout: float, waits_for_replica: bool) -> list:
        """The first delta of each stream. A request sent to a pool whose last replica is then lost
        waits in Serve's router queue for a replica that may never come (its node is gone): once the
        pool is known to have none while another pool has one, the next pool takes the request."""
        firsts = asyncio.ensure_future(asyncio.gather(*(c.gen.__anext__() for c in choices)))
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait({firsts}, timeout=min(left, _REPLICA_WATCH_S))
                if done:
                    return firsts.result()
                others = [p for p in self.pools.pools[model] if p is not pool and p.running]
                if not waits_for_replica and pool.has_no_running_replica() and others:
                    raise _PoolFailed(NoPoolAvailable(f"pool {pool.name} of model '{model}' lost its running replicas"))
        finally:
            if not firsts.done():
                firsts.cancel()

    async def _collect(self, choices: list[Choice], prompt_param: str) -> None:
        async def drain(c: Choice):
            async for delta in c.deltas():
                c.take(delta)

        try:
            await asyncio.wait_for(asyncio.gather(*(drain(c) for c in choices)), timeout=self.request_timeout_s)
        except BaseException as e:
            _cancel(choices)
            if isinstance(e, asyncio.CancelledError):
                raise
            if _replica_lost(e):
                raise _PoolFailed(e) from None
            raise engine_error(e, prompt_param) from None
