"""Errors as JSON `{"error": {"code", "message"}}`; never a 500 for bad input."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from outbox_app.upload_verification import UploadRejected
from outbox_images.store import ImageError

# The HTTP status of each refusal the domain can raise (the domain knows no HTTP).
STATUS_OF_CODE = {
    "not_found": 404,
    "illegal_transition": 409,
    "version_conflict": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "not_an_image": 415,
    "checksum_mismatch": 422,
    "size_mismatch": 422,
}


class ApiError(Exception):
    """A refused request with its HTTP status and machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @classmethod
    def rejected_upload(cls, exc: UploadRejected) -> ApiError:
        """The refusal of an uploaded object, with its status."""
        return cls(STATUS_OF_CODE.get(exc.code, 422), exc.code, exc.message)


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """The one error body shape of the API."""
    return JSONResponse(
        status_code=status, content={"error": {"code": code, "message": message, **extra}}
    )


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in exc.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    """Map every refusal to the JSON error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(STATUS_OF_CODE.get(exc.code, 409), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_response(400, "malformed_json", "the body is not valid JSON")
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p not in {"body", "query", "path"})
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return error_response(422, "invalid_request", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                              str(exc.detail))
