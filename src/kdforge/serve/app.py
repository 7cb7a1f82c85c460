"""The HTTP API: FastAPI routes for `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` (plain JSON or server-sent events with `stream: true`).

A route checks the request, tokenizes the prompt, hands one job per choice to the engine and
formats what comes back. Every error is an OpenAI error body (see `api_error.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdforge.serve.api_error import APIError, invalid
from kdforge.serve.engine import Engine
from kdforge.serve.loader import ServedModel
from kdforge.serve.output import Delta
from kdforge.serve.responses import chat_logprobs, completion_logprobs, usage
from kdforge.serve.sampling import SamplingParams
from kdforge.serve.schemas import ChatCompletionRequest, CompletionRequest
from kdforge.serve.vocab import Vocab

Job = tuple[list[int], SamplingParams]


async def _merged(engine: Engine, jobs: list[Job], stream: bool) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from all jobs, in the order the engine releases them (one delta per
    job unless `stream`)."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int], p: SamplingParams) -> None:
        try:
            async for d in engine.stream(ids, p, incremental=stream):
                q.put_nowait((i, d))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e))
        q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, d = await q.get()
            if d is None:
                left -= 1
            elif isinstance(d, Exception):
                raise d
            else:
                yield i, d
    finally:
        for t in tasks:  # client gone or error: cancel the rest (the engine drops their rows)
            t.cancel()


class _ChatFormat:
    object, prefix = "chat.completion", "chatcmpl-"

    def __init__(self, req: ChatCompletionRequest, vocab: Vocab):
        self.req, self.vocab = req, vocab

    def choice(self, i: int, c: Delta) -> dict:
        out = {"index": i, "message": {"role": "assistant", "content": c.text},
               "logprobs": chat_logprobs(c.logprobs, self.vocab) if self.req.logprobs else None,
               "finish_reason": c.finish_reason}
        return out | ({"token_ids": c.token_ids} if self.req.return_token_ids else {})

    def opening(self, i: int) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def chunk(self, i: int, d: Delta) -> dict:
        out = {"index": i, "delta": {"content": d.text},
               "logprobs": chat_logprobs(d.logprobs, self.vocab) if self.req.logprobs else None,
               "finish_reason": d.finish_reason}
        return out | ({"token_ids": d.token_ids} if self.req.return_token_ids else {})


class _TextFormat:
    object, prefix = "text_completion", "cmpl-"

    def __init__(self, req: CompletionRequest, vocab: Vocab):
        self.req, self.vocab = req, vocab
        self.sent: dict[int, int] = {}  # choice -> characters streamed so far (text_offset)

    def _logprobs(self, i: int, lps, text: str) -> dict | None:
        off = self.sent.get(i, 0)
        self.sent[i] = off + len(text)
        return completion_logprobs(lps, self.vocab, off) if self.req.logprobs is not None else None

    def choice(self, i: int, c: Delta) -> dict:
        out = {"index": i, "text": c.text, "logprobs": self._logprobs(i, c.logprobs, c.text),
               "finish_reason": c.finish_reason}
        return out | ({"token_ids": c.token_ids} if self.req.return_token_ids else {})

    def opening(self, i: int) -> dict | None:
        return None

    def chunk(self, i: int, d: Delta) -> dict:
        out = {"index": i, "text": d.text, "logprobs": self._logprobs(i, d.logprobs, d.text),
               "finish_reason": d.finish_reason}
        return out | ({"token_ids": d.token_ids} if self.req.return_token_ids else {})


def build_app(engine: Engine, served: ServedModel, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `served` through `engine`. With `api_key`, every /v1 route needs
    `Authorization: Bearer <api_key>` (401 otherwise)."""
    app = FastAPI(title="kdforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    tok = served.tokenizer
    vocab = Vocab(tok)
    started = int(time.time())

    # ---- errors -----------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(f"Could not parse the JSON body: {err.get('msg')}").response()
        param = ""
        for x in err.get("loc", ())[1:]:  # ("body", "messages", 0, "role") -> messages[0].role
            param += f"[{x}]" if isinstance(x, int) else (f".{x}" if param else str(x))
        param = param or None
        what = f"Invalid '{param}': " if param else "Invalid request: "
        return invalid(param, what + str(err.get("msg"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return APIError(str(e.detail), status=e.status_code, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return APIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error").response()

    async def authorized(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("Incorrect API key provided. Send `Authorization: Bearer <key>` with the key in "
                           "the server's --api-key-env variable.", status=401, code="invalid_api_key")

    def served_model(name: str) -> None:
        if name != served.name:
            raise APIError(f"The model `{name}` does not exist. This server serves `{served.name}` "
                           "(see GET /v1/models).", status=404, param="model", code="model_not_found")

    def jobs_for(req, prompt_ids: list[int], param: str, logprobs: bool, top: int) -> list[Job]:
        if not prompt_ids:
            raise invalid(param, "the prompt is empty: it must hold at least one token")
        room = served.context_len - len(prompt_ids)
        max_tokens = req.limit or room
        if room < 1 or max_tokens > room:
            raise APIError(f"This model's maximum context length is {served.context_len} tokens; the prompt "
                           f"has {len(prompt_ids)} and max_tokens asks for {max_tokens}. Shorten the prompt "
                           "or lower max_tokens.", param="max_tokens" if room > 0 else param,
                           code="context_length_exceeded")
        p = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                           stop=tuple(req.stop or ()), seed=req.seed, logprobs=logprobs, top_logprobs=top)
        # n choices of one prompt: distinct but reproducible seeds
        return [(prompt_ids, p if req.seed is None else replace(p, seed=req.seed + j)) for j in range(req.n)]

    async def respond(req, fmt, jobs: list[Job], prompt_tokens: int, extra: dict):
        rid, created = fmt.prefix + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": served.name, "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(_sse(req, fmt, jobs, prompt_tokens, head), media_type="text/event-stream")
        deltas: list[list[Delta]] = [[] for _ in jobs]
        async for i, d in _merged(engine, jobs, stream=False):
            deltas[i].append(d)
        comps = [Delta.join(ds) for ds in deltas]
        return {**head, "object": fmt.object, "choices": [fmt.choice(i, c) for i, c in enumerate(comps)],
                "usage": usage(prompt_tokens, sum(c.completion_tokens for c in comps)), **extra}

    async def _sse(req, fmt, jobs: list[Job], prompt_tokens: int, head: dict) -> AsyncIterator[str]:
        obj = fmt.object + (".chunk" if fmt.object.startswith("chat") else "")
        sampled = [0] * len(jobs)

        def event(choices: list[dict], **more) -> str:
            return "data: " + json.dumps({**head, "object": obj, "choices": choices, **more}) + "\n\n"

        openings = [c for i in range(len(jobs)) if (c := fmt.opening(i))]
        if openings:
            yield event(openings)
        try:
            async for i, d in _merged(engine, jobs, stream=True):
                sampled[i] = d.completion_tokens
                yield event([fmt.chunk(i, d)])
        except Exception as e:  # noqa: BLE001 - the status line is sent already: report in-band
            yield "data: " + json.dumps(APIError(str(e), status=500, type="server_error").body()) + "\n\n"
            return
        if req.include_usage:
            yield event([], usage=usage(prompt_tokens, sum(sampled)))
        yield "data: [DONE]\n\n"

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": started, "owned_by": "kdforge",
                "max_model_len": served.context_len}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        served_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatCompletionRequest):
        req.check()
        served_model(req.model)
        if not tok.chat_template:
            raise invalid("messages", f"model {served.name} has no chat template; use /v1/completions")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation
            raise invalid("messages", f"cannot apply the chat template: {e}") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        jobs = jobs_for(req, ids, "messages", req.logprobs, req.top_logprobs or 0)
        extra = {"prompt_token_ids": ids} if req.return_token_ids else {}
        return await respond(req, _ChatFormat(req, vocab), jobs, len(ids), extra)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest):
        req.check()
        served_model(req.model)
        jobs, prompt_tokens, prompt_ids = [], 0, []
        for p in req.prompts():
            ids = p if isinstance(p, list) else tok(p)["input_ids"]
            if any(not 0 <= t < len(tok) for t in ids):
                raise invalid("prompt", f"token ids must lie in [0, {len(tok)})")
            jobs += jobs_for(req, ids, "prompt", req.logprobs is not None, req.logprobs or 0)
            prompt_tokens += len(ids)
            prompt_ids.append(ids)
        extra = {"prompt_token_ids": prompt_ids} if req.return_token_ids else {}
        return await respond(req, _TextFormat(req, vocab), jobs, prompt_tokens, extra)

    return app
