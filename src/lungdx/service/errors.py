"""One shape for every error: ``schemas.ErrorOut``, whichever layer of the app answers.

Left alone, the app answers errors in three shapes: ``{"detail": str}`` for an ``HTTPException``,
``{"detail": [...]}`` for a request validation error, and plain text for Starlette's request body
limit, which answers 413 from outside every exception handler and every user middleware.
``install_error_handlers`` adds handlers for the first two and wraps the whole middleware stack for the third.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lungdx.service import schemas

_BODY_LIMIT_DETAIL = "Content Too Large"  # what Starlette's RequestBodyLimitMiddleware says


def install_error_handlers(app: FastAPI, *, monitoring: bool = False) -> None:
    """Make every error response of ``app`` an ``ErrorOut``: exception handlers, and a wrapper around its middleware stack.

    ``monitoring``: the app logs to a monitoring database, whose ``LogQueueFull`` answers 503 (imported only then:
    the monitoring package is not loaded by a service without a database).
    """
    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's HTTPException is a subclass
    app.add_exception_handler(RequestValidationError, _validation_error)
    if monitoring:
        from lungdx.monitoring.writer import LogQueueFull

        app.add_exception_handler(LogQueueFull, _log_behind)
    app.add_exception_handler(Exception, _internal_error)  # ServerErrorMiddleware's handler
    # Starlette builds the middleware stack through this method on the first request. The body limit's
    # plain-text 413 is sent inside that stack but outside every handler and user middleware, so only a
    # wrapper around the whole stack sees it (FastAPIOffline returns a FastAPI, so no subclass can do this).
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: PlainErrorsAsJson(build(), app.max_body_size)


def error_response(status: int, detail: str, errors: list[schemas.FieldError] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An ``ErrorOut`` body with its status."""
    body = schemas.ErrorOut(detail=detail, status=status, errors=errors)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def describe(status: int, detail: object, max_body_size: int | None) -> str:
    """The reason for a person: Starlette's terse body-limit and multipart messages made actionable."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    if status == 413 and text == _BODY_LIMIT_DETAIL:
        limit = f" of {max_body_size} bytes" if max_body_size is not None else ""
        return f"request body over the limit{limit} (lungdx serve --max-upload-mb)"
    if status == 400:
        return f"malformed request body: {text}"
    return text or HTTPStatus(status).phrase


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = describe(exc.status_code, exc.detail, getattr(request.app, "max_body_size", None))
    return error_response(exc.status_code, detail, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Never the "input" FastAPI keeps: it could echo an uploaded file or a name back to the client.
    errors = [schemas.FieldError(loc=list(error.get("loc", ())), msg=_message(error), type=str(error.get("type", "")))
              for error in exc.errors()]
    where = "; ".join(f"{'.'.join(str(part) for part in error.loc)}: {error.msg}" for error in errors)
    return error_response(422, f"invalid request: {where}", errors)


def _message(error: dict) -> str:
    """The error's message; for a body that is not JSON, with the parser's reason (it names no value)."""
    message = str(error.get("msg", ""))
    reason = (error.get("ctx") or {}).get("error")
    return f"{message}: {reason}" if error.get("type") == "json_invalid" and isinstance(reason, str) else message


LOG_BEHIND = "the monitoring log is behind (its database takes no writes): nothing was stored; retry later"
LOG_BEHIND_RETRY_S = 10


async def _log_behind(request: Request, exc: Exception) -> JSONResponse:
    # A prediction or feedback that cannot be logged is refused (monitoring.settings), as a temporary state.
    return error_response(503, LOG_BEHIND, headers={"Retry-After": str(LOG_BEHIND_RETRY_S)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # ServerErrorMiddleware re-raises the exception after this answer, so the server logs the traceback.
    return error_response(500, "internal error: the request was not processed; the service log says why")


class PlainErrorsAsJson:
    """ASGI wrapper: an error response in a media type other than JSON is replaced by ``ErrorOut``.

    The one such response today is the 413 of Starlette's request body limit, sent in text/plain
    from outside FastAPI's exception handlers; its headers other than the body's own are kept.
    """

    def __init__(self, app: ASGIApp, max_body_size: int | None):
        self.app, self.max_body_size = app, max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def send_as_json(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                if not Headers(raw=message.get("headers", [])).get("content-type", "").startswith("application/json"):
                    held = message
                    return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = held["status"]
            kept = {name: value for name, value in Headers(raw=held.get("headers", [])).items()
                    if name not in ("content-type", "content-length")}
            text = b"".join(chunks).decode("utf-8", "replace").strip()
            await error_response(status, describe(status, text, self.max_body_size), headers=kept)(scope, receive, send)

        await self.app(scope, receive, send_as_json)
