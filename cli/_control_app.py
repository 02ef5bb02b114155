"""The control API over HTTP: Toxiproxy 2.x's endpoints and the native ones, as a Starlette app
on ``Control``.

Only the HTTP is here: reading a JSON body, the status codes of a success, and turning
``ApiError`` into Toxiproxy's error body. Anything else that goes wrong in a call is logged
and answered with a 500 in the same JSON shape, never with a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import uproxy_trio

from ._control import ApiError, Control, bad_body

LOGGER = logging.getLogger("uproxy.control")

Endpoint = Callable[[Request], Awaitable[Response]]

# Toxiproxy refuses browsers, so that a web page cannot drive the API through the user's
# own browser (the API has no authentication; the address it binds is its protection).
BROWSER_PREFIX = "Mozilla/"


def control_app(control: Control, extra: list[Route] | None = None) -> Starlette:
    """The API's routes over ``control``, and ``extra`` routes (``/metrics``) beside them."""

    def call(handler: Callable[[Request], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            if request.headers.get("user-agent", "").startswith(BROWSER_PREFIX):
                return _error(ApiError(403, "User agent not allowed"))
            try:
                return await handler(request)
            except ApiError as refused:
                return _error(refused)
            except Exception:
                LOGGER.exception("control API: %s %s failed", request.method, request.url.path)
                return _error(ApiError(500, "internal error (see the proxy's log)"))

        return endpoint

    async def version(request: Request) -> Response:
        return JSONResponse({"version": uproxy_trio.__version__})

    async def reset(request: Request) -> Response:
        control.reset()
        return Response(status_code=204)

    async def proxies(request: Request) -> Response:
        if request.method == "POST":
            return JSONResponse(await control.create_proxy(await _body(request)), 201)
        return JSONResponse(control.proxies())

    async def populate(request: Request) -> Response:
        made = await control.populate(await _body(request))
        return JSONResponse({"proxies": made}, 201)

    async def proxy(request: Request) -> Response:
        name = request.path_params["proxy"]
        if request.method == "DELETE":
            await control.delete_proxy(name)
            return Response(status_code=204)
        if request.method in ("POST", "PATCH"):
            return JSONResponse(await control.update_proxy(name, await _body(request)))
        return JSONResponse(control.proxy(name))

    async def toxics(request: Request) -> Response:
        name = request.path_params["proxy"]
        if request.method == "POST":
            # 200, not 201: what Toxiproxy answers, and what its clients expect.
            return JSONResponse(control.add_toxic(name, await _body(request)))
        return JSONResponse(control.toxics(name))

    async def toxic(request: Request) -> Response:
        name, toxic_name = request.path_params["proxy"], request.path_params["toxic"]
        if request.method == "DELETE":
            control.remove_toxic(name, toxic_name)
            return Response(status_code=204)
        if request.method in ("POST", "PATCH"):
            updated = control.update_toxic(name, toxic_name, await _body(request))
            return JSONResponse(updated)
        return JSONResponse(control.toxic(name, toxic_name))

    async def flows(request: Request) -> Response:
        return JSONResponse(control.flows())

    async def flow(request: Request) -> Response:
        control.kill_flow(request.path_params["flow"])
        return Response(status_code=204)

    async def reload(request: Request) -> Response:
        return JSONResponse(control.reload())

    routes = [
        Route("/version", call(version), methods=["GET"]),
        Route("/reset", call(reset), methods=["POST"]),
        Route("/proxies", call(proxies), methods=["GET", "POST"]),
        Route("/populate", call(populate), methods=["POST"]),
        Route("/proxies/{proxy}", call(proxy), methods=["GET", "POST", "PATCH", "DELETE"]),
        Route("/proxies/{proxy}/toxics", call(toxics), methods=["GET", "POST"]),
        Route(
            "/proxies/{proxy}/toxics/{toxic}",
            call(toxic),
            methods=["GET", "POST", "PATCH", "DELETE"],
        ),
        Route("/flows", call(flows), methods=["GET"]),
        Route("/flows/{flow}", call(flow), methods=["DELETE"]),
        Route("/reload", call(reload), methods=["POST"]),
        *(extra or []),
    ]
    return Starlette(routes=routes)


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_body(str(exc)) from None


def _error(refused: ApiError) -> Response:
    return JSONResponse(refused.body(), refused.status)
