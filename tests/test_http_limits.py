"""The gateway's own bounds (cluster/http_limits.py) on a small ASGI app, without Ray: the body-size
bound answers 413 before the app reads the body, the concurrency bound 503 with Retry-After."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI, Request

from cluster.http_limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware


def _app() -> tuple[FastAPI, dict]:
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(ConcurrencyLimitMiddleware)
    seen = {"bodies": 0, "release": asyncio.Event()}

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        seen["bodies"] += 1
        return {"bytes": len(body)}

    @app.get("/slow")
    async def slow():
        await seen["release"].wait()
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app, seen


async def test_a_body_over_the_bound_gets_413_before_the_app_reads_it():
    app, seen = _app()
    app.state.max_request_bytes = 100
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/echo", content=b"x" * 100)).json() == {"bytes": 100}
        r = await client.post("/echo", content=b"x" * 101)
        assert r.status_code == 413
        assert r.json() == {"error": {
            "message": "The request body is too large: at most 100 bytes are accepted (gateway.max_request_bytes), got 101 bytes.",
            "type": "invalid_request_error", "param": None, "code": "request_too_large",
        }}

        # Without a Content-Length (chunked): counted as it arrives, refused once past the bound.
        async def chunks():
            for _ in range(5):
                yield b"x" * 30

        r = await client.post("/echo", content=chunks())
        assert r.status_code == 413
        assert r.json()["error"]["message"].endswith("got more than that.")
    assert seen["bodies"] == 1
    # No bound configured: anything goes.
    app.state.max_request_bytes = None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/echo", content=b"x" * 10_000)).json() == {"bytes": 10_000}


async def test_requests_beyond_the_concurrency_bound_get_503_at_once_and_health_still_answers():
    app, seen = _app()
    app.state.max_concurrent_requests = 2
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        held = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
        await asyncio.sleep(0.05)
        r = await client.get("/slow")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {
            "message": "The gateway is serving its limit of 2 concurrent requests (gateway.max_concurrent_requests); retry shortly.",
            "type": "server_error", "param": None, "code": "overloaded",
        }
        assert (await client.get("/health")).status_code == 200
        seen["release"].set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        # Freed: the next one is served.
        assert (await client.get("/slow")).status_code == 200


async def test_serve_cancelling_the_receive_channel_reads_as_a_disconnect():
    """When a client goes away, Serve's receive raises TaskCancelledError; Starlette's streaming
    response listens for a disconnect on it, and must get one rather than an exception."""
    from ray.exceptions import TaskCancelledError
    from starlette.applications import Starlette

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())

    calls = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

    async def receive():
        for message in calls:
            return message
        raise TaskCancelledError()

    holder = Starlette()
    holder.state.max_request_bytes = 100
    scope = {"type": "http", "app": holder, "headers": [(b"content-length", b"2")], "path": "/v1/completions"}
    await BodyLimitMiddleware(app)(scope, receive, None)
    assert seen == [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]
