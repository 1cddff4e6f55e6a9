"""Where code runs: inside a Ray Serve replica or not (shared by deployments and the gateway)."""

from __future__ import annotations


def in_replica() -> bool:
    """Whether this code runs inside a Serve replica (where Serve's controller can be asked)."""
    from ray import serve

    try:
        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - outside a replica Serve raises a plain RayServeException
        return False
