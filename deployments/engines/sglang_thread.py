"""A thread with its own asyncio loop that builds an engine, serves its coroutines and tears it down, and the
clean-up of the processes an engine launched: how `SGLangEngine` runs `sglang.Engine` inside a Ray Serve replica
(see `sglang_engine`'s module docstring for why).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from typing import Any, Callable, Iterable

import psutil

logger = logging.getLogger("ray.serve")

_STOP_TIMEOUT_S = 120.0


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
            # Resolved from inside the running loop: when start() returns, is_alive() holds (every
            # request starts with a health check, which reads loop.is_running()).
            loop.call_soon(ready.set_result, built)
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


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
