"""OpenAI-style errors: one exception type for the handlers, and the JSON body every 4xx/5xx carries."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    """Name the offending parameter the way OpenAI does, instead of FastAPI's 422 list."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(str(p))]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(
            f"Unsupported parameter: '{param}' is not supported by this server", param, "unsupported_parameter"
        )
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    if not loc:
        return bad_request(f"Invalid request body: {first.get('msg', '')}", code="invalid_body")
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {message}", param, "invalid_value")


def _union_member(part: str) -> bool:
    """pydantic names the union member it tried (`str`, `list[int]`, ...) in the error location."""
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or any(c in part for c in "[(-")


async def handle_api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def handle_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()


async def handle_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)).response()


def install(app) -> None:
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    # Anything else reaches tokenfab.serve.guard, which answers a 500 that names no internals.
