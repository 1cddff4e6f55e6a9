"""Stopping a running cluster without cutting its requests short (`python -m cluster run`, on Ctrl-C
or SIGTERM).

`serve run` answers Ctrl-C with `serve.shutdown()`, which kills Serve's HTTP proxies at once: every
stream in flight is cut. So before that, the applications are deleted one by one through Serve's
controller: their routes go (new requests get 404), and each replica finishes its in-flight requests
(up to its `graceful_shutdown_timeout_s`: the gateway's and each pool's `drain_timeout_s`) while the
proxy keeps carrying their responses. Then `serve run` is told to stop.
"""

from __future__ import annotations

import contextlib
import logging
import time

import psutil

logger = logging.getLogger(__name__)


def local_gcs_address(pid: int) -> str | None:
    """The GCS address of the Ray cluster a process started itself (`serve run` without an address
    starts one under it), as its raylet was given it; None when it has none."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() != "raylet":
                    continue
                for arg in child.cmdline():
                    if arg.startswith("--gcs-address="):
                        return arg.split("=", 1)[1]
    return None


def drain(address: str, app_names: list[str], timeout_s: float) -> list[str]:
    """Delete the applications (their replicas finish what they serve) and wait until they are gone,
    at most `timeout_s`. Returns the names still there at the deadline."""
    import ray
    from ray import serve

    # A local cluster started by `ray.init()` (as `serve run` starts one) uses token auth when a token
    # exists (~/.ray/auth_token); a driver joining it by address must opt in the same way.
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        for name in app_names:
            with contextlib.suppress(Exception):
                serve.delete(name, _blocking=False)
        deadline = time.monotonic() + timeout_s
        left = list(app_names)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [name for name in left if name in serve.status().applications]
        return left
    finally:
        ray.shutdown()
