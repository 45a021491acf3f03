"""The API's error type: every error answer is ``{"error": {"code", "message", ...}}``.

``code`` is stable (clients branch on it); ``message`` is for people and says what to do.
"""

from __future__ import annotations

from typing import Any, Optional


class ApiError(Exception):
    """An error answer: HTTP status, stable code, message, optional details and headers."""

    def __init__(self, status: int, code: str, message: str, *,
                 details: Optional[dict[str, Any]] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


def not_found(job_id: str) -> ApiError:
    # Another key's job answers exactly like a job that does not exist.
    return ApiError(404, "job_not_found", f"no job {job_id!r} for this API key; "
                    "GET /v1/jobs lists yours")
