"""Errors as the OpenAI API writes them: `{"error": {"message", "type", "param", "code"}}` and a status.

Clients (the `openai` package among them) pick the exception class from the status and show the
message, so every refusal says exactly which field is wrong and why.
"""

from __future__ import annotations

# OpenAI files 401s and 404s under invalid_request_error too; `code` tells them apart.
_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
