"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Clients (the `openai` package among them) map the status to an exception class: 400
BadRequestError, 401 AuthenticationError, 404 NotFoundError, 500 InternalServerError.
"""

from __future__ import annotations

import sys
import traceback
import uuid

from fastapi.responses import JSONResponse


class APIError(Exception):
    """Raised anywhere in a route; answered as an OpenAI error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid(param: str | None, message: str) -> APIError:
    """400 for a bad value of `param`."""
    return APIError(message, param=param, code="invalid_value" if param else None)


def server_error(e: BaseException) -> APIError:
    """A generic 500: exception text can hold paths, prompts or internals, so it goes only to the
    server's log, under an id the client can quote."""
    err_id = uuid.uuid4().hex[:12]
    print(f"kdforge serve: internal error {err_id}:\n" + "".join(traceback.format_exception(e)),
          file=sys.stderr, flush=True)
    return APIError(f"The server had an error processing this request (error id {err_id}; the details are "
                    "in the server's log).", status=500, type="server_error")
