"""Serve plumbing shared by deployments and the gateway: where code runs, and cancelling handle calls."""

from __future__ import annotations


def in_replica() -> bool:
    """Whether this code runs inside a Serve replica (where Serve's controller can be asked)."""
    from ray import serve

    try:
        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - outside a replica Serve raises a plain RayServeException
        return False


def cancel_call(response) -> None:
    """Cancel a handle call (a `DeploymentResponse` or response generator). Serve's `cancel()`
    re-raises the call's error when the call already failed, e.g. when it was refused at assignment
    (BackPressureError: the queue was full): then there is nothing left to cancel, and the error
    has been (or will be) reported where the call's result is read."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - see above
        pass
