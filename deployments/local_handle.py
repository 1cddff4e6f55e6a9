"""A handle to a base-model server living in this process, shaped like a Serve `DeploymentHandle`.

An agent replica that hosts its own engine (`own_model:` in config: an SGLang agent replica with its
own GPU) serves its programs from that engine. `HandleBackend` speaks to a base model through the
few handle calls below; this class offers the same calls on a local `BaseModelServer`, so the
backend, its limits and its tests are the same whether the model is remote or in-process.

The backend calls from SGLang's interpreter threads; the server's coroutines run on the replica's
event loop, so every call crosses over with `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any


class _Response:
    """Like `DeploymentResponse`: `.result(timeout_s=...)` blocks; `.cancel()`."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def result(self, timeout_s: float | None = None) -> Any:
        try:
            return self._future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no result within {timeout_s} s") from None

    def cancel(self) -> None:
        self._future.cancel()


class _Stream:
    """Like `DeploymentResponseGenerator` iterated off the event loop."""

    def __init__(self, agen, loop: asyncio.AbstractEventLoop):
        self._agen, self._loop = agen, loop
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            return asyncio.run_coroutine_threadsafe(self._agen.__anext__(), self._loop).result()
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None

    def cancel(self) -> None:
        # Closing the server's generator closes the engine's, which frees the request's slot.
        if not self._closed:
            self._closed = True
            asyncio.run_coroutine_threadsafe(self._agen.aclose(), self._loop)


class _Method:
    def __init__(self, handle: "LocalModelHandle", name: str):
        self._handle, self._name = handle, name

    def remote(self, *args, **kwargs):
        method = getattr(self._handle.server, self._name)
        loop = self._handle.loop
        if self._handle.stream:
            return _Stream(method(*args, **kwargs), loop)

        async def call():
            result = method(*args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result

        return _Response(asyncio.run_coroutine_threadsafe(call(), loop))


class LocalModelHandle:
    """`handle.options(stream=..., session_id=...).<method>.remote(...)` on a local server."""

    def __init__(self, server, loop: asyncio.AbstractEventLoop, stream: bool = False):
        self.server, self.loop, self.stream = server, loop, stream

    def options(self, *, stream: bool | None = None, **_routing) -> "LocalModelHandle":
        # Routing options (session_id, ...) mean nothing here: there is one engine.
        return LocalModelHandle(self.server, self.loop, self.stream if stream is None else stream)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)
