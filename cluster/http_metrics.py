"""The gateway's HTTP metrics: an ASGI middleware counting requests by route template and status
(`tandem_http_requests_total`, `tandem_http_errors_total`; the table is in `deployments/metrics.py`)."""

from __future__ import annotations

import asyncio

from deployments.metrics import record_http


class HTTPMetricsMiddleware:
    """Pure ASGI middleware (streams pass through untouched): counts each HTTP request by its
    route's path template, method and response status once the response starts; a request that
    raises before that counts as 500, one whose client went away first as 499."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            record_http(route, scope.get("method", ""), status or 499)
