"""The HTTP API's app: `build_app` puts the served model on `app.state.serve` (`state.py`),
registers the routes (`routes.py`: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions`, plain JSON or server-sent events with `stream: true`) and the Batch API
(`batches.py`), and answers every error as an OpenAI error body (see `api_error.py`); a 500 says
only that something failed, the exception itself goes to the server's log.

Limits: bodies over `max_body_bytes` get 413 before they are read; prompts and rows per request
are capped in `schemas.py`; a non-streamed request whose client disconnects is cancelled (its
rows leave the engine at the next step), as a streamed one already was.

`GET /stats` (behind the key, like /v1) gives the engine's counters (`EngineStats`): what tests
and operators read instead of guessing from timings. vLLM's `POST /tokenize` and `/detokenize`
(behind the key) use the served tokenizer and chat template.

A request whose answer went out whole keeps its connection usable even when it was a 500.
"""

from __future__ import annotations

from functools import partial

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdforge.serve.api_error import APIError, invalid, server_error
from kdforge.serve.batches import BatchService, add_batch_routes
from kdforge.serve.engine import Engine
from kdforge.serve.limits import DEFAULT_MAX_BODY_BYTES
from kdforge.serve.loader import ServedModel
from kdforge.serve.routes import authorized, chat_answer, completion_answer, public, router
from kdforge.serve.schemas import ChatCompletionRequest, CompletionRequest
from kdforge.serve.state import ServeState


class _BodyCap:
    """ASGI middleware: a body over `limit` bytes is answered 413 and never read further, whether
    it announces its length (Content-Length) or not (chunked: counted as it arrives)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _too_large(self) -> APIError:
        return APIError(f"The request body is larger than this server accepts ({self.limit} bytes; "
                        "`kdforge serve --max-body-bytes` sets it): send fewer or shorter prompts per request.",
                        status=413, code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._too_large().response()(scope, receive, send)
        seen, rejected = 0, False

        async def capped_receive():
            nonlocal seen, rejected
            msg = await receive()
            if msg["type"] == "http.request" and not rejected:
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    rejected = True
                    await self._too_large().response()(scope, receive, send)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return msg

        answered = False

        async def guarded_send(msg):
            nonlocal answered
            if not rejected:
                await send(msg)
                answered |= msg["type"] == "http.response.body" and not msg.get("more_body", False)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            # Starlette re-raises an error after its 500 is sent (the handler logged it already);
            # uvicorn would then close the connection under the client's next request. A request
            # whose answer went out whole ends here, and the connection stays usable.
            if not answered:
                raise


# ---- errors ---------------------------------------------------------------------------------

async def _api_error(request: Request, e: APIError):
    return e.response()


async def _invalid(request: Request, e: RequestValidationError):
    """A body that fails its schema: 400 naming the first bad field (`messages[0].role`)."""
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return APIError(f"Could not parse the JSON body: {err.get('msg')}").response()
    param = ""
    for part in err.get("loc", ())[1:]:  # ("body", "messages", 0, "role") -> messages[0].role
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    param = param or None
    what = f"Invalid '{param}': " if param else "Invalid request: "
    return invalid(param, what + str(err.get("msg"))).response()


async def _http(request: Request, e: StarletteHTTPException):
    return APIError(str(e.detail), status=e.status_code, code="not_found" if e.status_code == 404 else None).response()


async def _crash(request: Request, e: Exception):
    return server_error(e).response()


# ---- the app --------------------------------------------------------------------------------

def build_app(engine: Engine, served: ServedModel, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, batch_dir: str | None = None):
    """The ASGI app serving `served` through `engine`. With `api_key`, every /v1 route (and
    /stats) needs `Authorization: Bearer <api_key>` (401 otherwise). The Batch API's files live
    under `batch_dir` (default: a new temp dir); see `batches.py`."""
    app = FastAPI(title="kdforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    state = app.state.serve = ServeState(engine, served, api_key)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
    app.include_router(public)
    app.include_router(router)
    endpoints = {"/v1/chat/completions": (ChatCompletionRequest, partial(chat_answer, state)),
                 "/v1/completions": (CompletionRequest, partial(completion_answer, state))}
    add_batch_routes(app, BatchService(batch_dir, endpoints), Depends(authorized))
    return _BodyCap(app, max_body_bytes)
