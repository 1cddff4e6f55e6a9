"""The gateway's own bounds on what one replica takes in, as pure ASGI middlewares (streams pass
through untouched). Both read their bound from the app's state, set by the gateway replica from its
config.

`BodyLimitMiddleware` answers 413 for a body over `gateway.max_request_bytes`, before any of it is
parsed: at once for a declared `Content-Length` over the bound, or once a body without one
(chunked) passes it. The rest is then read and dropped, so the gateway never holds more than the
bound of one request's body (`app.state.max_request_bytes`; None: no bound).

`ConcurrencyLimitMiddleware` answers 503 with `Retry-After` at once when the replica already serves
`gateway.max_concurrent_requests` requests (a stream counts until it ends), instead of letting
requests pile up behind the ones in flight (`app.state.max_concurrent_requests`). `/health` is
never refused: a load balancer must see an overloaded gateway as alive.
"""

from __future__ import annotations

import asyncio
import json

from ray.exceptions import TaskCancelledError


class _BodyTooLarge(BaseException):
    # A BaseException so that no `except Exception` between here and the body's reader (e.g. the
    # gateway turning an unreadable body into "not valid JSON") mistakes it for a bad body.
    pass


def _state(scope, name: str):
    return getattr(getattr(scope.get("app"), "state", None), name, None)


async def _answer(send, status: int, message: str, type: str, code: str, headers: dict[str, str] | None = None) -> None:
    """An OpenAI-shaped error response, sent without the app."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# How long a refused body is read on (and dropped) so that its client can finish sending it.
DRAIN_TIMEOUT_S = 30.0


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class BodyLimitMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = _state(scope, "max_request_bytes") if scope["type"] == "http" else None
        if not limit:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, receive, limit, int(declared))
            return

        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            try:
                message = await receive()
            except TaskCancelledError:
                # Serve cancels its fetch of the request's messages when the client goes away; to the
                # app that is a disconnect (Starlette's streaming response waits for one), not an error.
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def watching_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if started:
                raise RuntimeError("request body over the limit after the response started") from None
            await self._refuse(send, receive, limit, None)

    @staticmethod
    async def _refuse(send, receive, limit: int, size: int | None) -> None:
        got = f"{size} bytes" if size is not None else "more than that"
        message = f"The request body is too large: at most {limit} bytes are accepted (gateway.max_request_bytes), got {got}."
        await _answer(send, 413, message, "invalid_request_error", "request_too_large")
        # Then the rest of the body is read and dropped: most clients (httpx, requests) read the answer
        # only once they have sent the whole body, and a connection closed under them is all they
        # would see. Bounded in time; nothing of it is kept.
        try:
            await asyncio.wait_for(_drain(receive), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass


class ConcurrencyLimitMiddleware:
    def __init__(self, app):
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        limit = _state(scope, "max_concurrent_requests") if scope["type"] == "http" else None
        if not limit or scope.get("path", "").endswith("/health"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= limit:
            message = f"The gateway is serving its limit of {limit} concurrent requests (gateway.max_concurrent_requests); retry shortly."
            await _answer(send, 503, message, "server_error", "overloaded", {"Retry-After": "1"})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
