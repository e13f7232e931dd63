"""The one place exceptions become HTTP responses in OpenAI's error shape."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.core.errors import QueueFullError, TesseraError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

RETRY_AFTER_SECONDS = 1


def error_body(
    message: str, *, status: int = 400, error_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; `code` carries the HTTP status as vLLM does."""
    return {
        "error": {
            "message": message,
            "type": error_type or _TYPE_BY_STATUS.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


def error_response(
    message: str,
    *,
    status: int = 400,
    error_type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, status=status, error_type=error_type, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def tessera_error_response(exc: TesseraError) -> JSONResponse:
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(getattr(exc, "retry_after", RETRY_AFTER_SECONDS))}
    return error_response(
        exc.message, status=exc.http_status, error_type=exc.error_type, param=exc.param, headers=headers
    )


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    # FastAPI prefixes "body"; pydantic adds union-branch names like "str" or "list[int]".
    parts = [str(p) for p in loc if p != "body"]
    kept = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool", "dict")]
    return ".".join(kept) or None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the first offending parameter of a list of pydantic errors."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return f"The request body is not valid JSON: {reason}", None
    lines = []
    for e in errors[:5]:
        param = _loc_to_param(e.get("loc", ()))
        lines.append(f"{param or 'body'}: {e.get('msg', 'invalid value')}")
    if len(errors) > 5:
        lines.append(f"... and {len(errors) - 5} more")
    return "; ".join(lines), _loc_to_param(errors[0].get("loc", ())) if errors else None


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    message, param = validation_message(errors)
    return error_response(message, status=400, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception an endpoint can raise to OpenAI's error shape."""

    @app.exception_handler(TesseraError)
    async def _tessera(_: Request, exc: TesseraError) -> JSONResponse:
        return tessera_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(f"The request body is not valid JSON: {exc}", status=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(message, status=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(f"Internal server error: {type(exc).__name__}", status=500)
