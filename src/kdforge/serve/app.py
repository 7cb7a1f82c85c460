"""The HTTP API: FastAPI routes for `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` (plain JSON or server-sent events with `stream: true`).

A route checks the request, tokenizes the prompt (on a worker thread: a long prompt must not
hold the event loop, which answers every other client), hands one job per choice to the engine
and formats what comes back. Every error is an OpenAI error body (see `api_error.py`); a 500
says only that something failed, the exception itself goes to the server's log.

Limits: bodies over `max_body_bytes` get 413 before they are read; prompts and rows per request
are capped in `schemas.py`; a non-streamed request whose client disconnects is cancelled (its
rows leave the engine at the next step), as a streamed one already was.

`GET /stats` (behind the key, like /v1) gives the engine's counters (`EngineStats`): what tests
and operators read instead of guessing from timings. vLLM's `POST /tokenize` and `/detokenize`
(behind the key) use the served tokenizer and chat template. The Batch API is in `batches.py`.

A request whose answer went out whole keeps its connection usable even when it was a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdforge.serve.api_error import APIError, invalid, server_error
from kdforge.serve.batches import BatchService, add_batch_routes, json_body
from kdforge.serve.engine import Engine
from kdforge.serve.loader import ServedModel
from kdforge.serve.output import Delta
from kdforge.serve.responses import chat_logprobs, completion_logprobs, echo, joined, prompt_logprobs, usage
from kdforge.serve.sampling import SamplingParams
from kdforge.serve.limits import DEFAULT_MAX_BODY_BYTES
from kdforge.serve.schemas import ChatCompletionRequest, CompletionRequest
from kdforge.serve.vocab import Vocab

Job = tuple[list[int], SamplingParams]


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


async def _until_disconnect(request: Request) -> None:
    """Returns once the client has gone (the body is read already, so `receive` now only reports
    a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(engine: Engine, jobs: list[Job], stream: bool, low: bool = False) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from all jobs, in the order the engine releases them (one delta per
    job unless `stream`). The jobs are submitted in one call, so a request's prompts (and its n
    choices) are prefilled together in one forward pass when the batch has room."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def emitter(i: int):
        def emit(ev: object) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, (i, ev))
            except RuntimeError:  # event loop already closed: nobody is listening
                pass
        return emit

    tickets = engine.submit([(ids, p, emitter(i)) for i, (ids, p) in enumerate(jobs)], incremental=stream, low=low)
    try:
        left = len(jobs)
        while left:
            i, ev = await q.get()
            if isinstance(ev, BaseException):
                raise ev
            yield i, ev
            left -= ev.finish_reason is not None
    finally:
        for t in tickets:  # client gone or error: cancel the rest (the engine drops their rows)
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

    def __init__(self, req: CompletionRequest, vocab: Vocab, job_prompts: list[list[int]]):
        self.req, self.vocab, self.job_prompts = req, vocab, job_prompts
        self.sent: dict[int, int] = {}  # choice -> characters sent so far (text_offset), echo included

    def choice(self, i: int, d: Delta) -> dict:
        """A choice's first delta (the whole of it, unless streamed) carries the echoed prompt."""
        req, text, lps, extra = self.req, d.text, None, {}
        if i not in self.sent:
            self.sent[i] = 0
            if req.echo:
                prompt_text, lps = echo(self.job_prompts[i], d.prompt_logprobs, self.vocab, req.logprobs or 0)
                text, self.sent[i] = prompt_text + text, len(prompt_text)
            if req.prompt_logprobs is not None:
                extra["prompt_logprobs"] = prompt_logprobs(d.prompt_logprobs, self.vocab, req.prompt_logprobs)
        eos_id, eos_lp = d.eos or (None, None)
        if req.logprobs is not None:
            gen = completion_logprobs(d.logprobs, self.vocab, self.sent[i], eos_lp)
            lps = joined(lps, gen) if lps else gen
        else:
            lps = None
        self.sent[i] += len(d.text)
        out = {"index": i, "text": text, "logprobs": lps, "finish_reason": d.finish_reason} | extra
        # the eos was generated (usage counts it): its id is listed too, as vLLM does
        ids = d.token_ids + ([eos_id] if eos_id is not None else [])
        return out | ({"token_ids": ids} if req.return_token_ids else {})

    def opening(self, i: int) -> dict | None:
        return None

    chunk = choice


def _tokens_param(body: dict, n_vocab: int) -> list[int]:
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise invalid("tokens", "tokens must be a list of token ids (integers)")
    if any(not 0 <= t < n_vocab for t in ids):
        raise invalid("tokens", f"token ids must lie in [0, {n_vocab})")
    return ids


def add_tokenize_routes(app, served: ServedModel, tok, chat_ids, off_loop, auth) -> None:
    """vLLM's `POST /tokenize` (`prompt`, or chat `messages` through the model's template, as the
    chat route renders them) and `POST /detokenize` (`tokens` -> `prompt`), behind `auth`."""

    def check_model(body: dict) -> None:
        if body.get("model") not in (None, served.name):
            raise APIError(f"The model `{body.get('model')}` does not exist. This server serves `{served.name}`.",
                           status=404, param="model", code="model_not_found")

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(request: Request):
        body = await json_body(request)
        check_model(body)
        prompt, messages = body.get("prompt"), body.get("messages")
        if (prompt is None) == (messages is None):
            raise invalid("prompt", "send exactly one of `prompt` (a string) or `messages` (a chat)")
        if messages is not None:
            try:
                msgs = [{"role": m.role, "content": m.text()} for m in
                        ChatCompletionRequest(model=served.name, messages=messages).messages]
            except (ValueError, TypeError) as e:
                raise invalid("messages", f"Invalid 'messages': {str(e)[:300]}") from None
            ids = await off_loop(chat_ids, msgs)
        elif not isinstance(prompt, str):
            raise invalid("prompt", "prompt must be a string")
        else:
            special = body.get("add_special_tokens", True) is not False
            ids = (await off_loop(lambda: tok(prompt, add_special_tokens=special)))["input_ids"]
        out = {"count": len(ids), "max_model_len": served.context_len, "tokens": ids}
        return out | ({"token_strs": tok.convert_ids_to_tokens(ids)} if body.get("return_token_strs") else {})

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(request: Request):
        body = await json_body(request)
        check_model(body)
        ids = _tokens_param(body, len(tok))
        return {"prompt": await off_loop(lambda: tok.decode(ids, skip_special_tokens=False,
                                                            clean_up_tokenization_spaces=False))}


def build_app(engine: Engine, served: ServedModel, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, batch_dir: str | None = None):
    """The ASGI app serving `served` through `engine`. With `api_key`, every /v1 route (and
    /stats) needs `Authorization: Bearer <api_key>` (401 otherwise). The Batch API's files live
    under `batch_dir` (default: a new temp dir); see `batches.py`."""
    app = FastAPI(title="kdforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    tok = served.tokenizer
    vocab = Vocab(tok)
    # token ids a logit_bias may name: in the tokenizer and in the model's logits
    n_logits = min(len(tok), getattr(served.model.config, "vocab_size", None) or len(tok))
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
        return server_error(e).response()

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

    # One worker: tokenizers are not meant to be shared across threads, and one long prompt at a
    # time is what the engine could use anyway. The engine decodes with its own copy.
    tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kdforge-tokenize")
    tokenize_jobs = 0

    async def off_loop(fn, *args):
        nonlocal tokenize_jobs
        tokenize_jobs += 1
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def jobs_for(req, prompt_ids: list[int], param: str, logprobs: bool, top: int,
                 prompt_top: int | None = None) -> list[Job]:
        if not prompt_ids:
            raise invalid(param, "the prompt is empty: it must hold at least one token")
        room = served.context_len - len(prompt_ids)
        max_tokens = room if req.limit is None else req.limit
        # max_tokens 0 (scoring) may fill the whole context; generating needs room for a token
        if room < 0 or max_tokens > room or (req.limit is None and room < 1):
            raise APIError(f"This model's maximum context length is {served.context_len} tokens; the prompt "
                           f"has {len(prompt_ids)} and max_tokens asks for {max_tokens}. Shorten the prompt "
                           "or lower max_tokens.", param="max_tokens" if room > 0 else param,
                           code="context_length_exceeded")
        p = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                           stop=tuple(req.stop or ()), seed=req.seed, logprobs=logprobs, top_logprobs=top,
                           prompt_logprobs=prompt_top, logit_bias=req.logit_bias_pairs(n_logits),
                           presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                           repetition_penalty=req.repetition_penalty, top_k=max(req.top_k, 0),
                           min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
        # n choices of one prompt: distinct but reproducible seeds
        return [(prompt_ids, p if req.seed is None else replace(p, seed=req.seed + j)) for j in range(req.n)]

    async def respond(request: Request | None, req, fmt, jobs: list[Job], prompt_tokens: int, extra: dict):
        """The answer to one request. `request` None: a Batch API row (no client to watch, low
        priority in the engine, never streamed)."""
        rid, created = fmt.prefix + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": served.name, "system_fingerprint": None}
        if req.stream and request is not None:
            return StreamingResponse(_sse(req, fmt, jobs, prompt_tokens, head), media_type="text/event-stream")
        deltas: list[list[Delta]] = [[] for _ in jobs]

        async def collect() -> None:
            async for i, d in _merged(engine, jobs, stream=False, low=request is None):
                deltas[i].append(d)

        if request is None:
            await collect()
            return body(head, fmt, deltas, prompt_tokens, extra)

        # Nothing is sent until the end, so nothing else notices a client that left: watch for it,
        # and cancel the generation (its rows leave the engine) instead of finishing it for nobody.
        work, gone = asyncio.create_task(collect()), asyncio.create_task(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if work.cancelled():  # the client left: nobody reads this answer
            return Response(status_code=499)
        work.result()  # an engine error propagates as the route's own
        return body(head, fmt, deltas, prompt_tokens, extra)

    def body(head: dict, fmt, deltas: list[list[Delta]], prompt_tokens: int, extra: dict) -> dict:
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
            yield "data: " + json.dumps(server_error(e).body()) + "\n\n"
            return
        if req.include_usage:
            yield event([], usage=usage(prompt_tokens, sum(sampled)))
        yield "data: [DONE]\n\n"

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    @app.get("/stats", dependencies=[Depends(authorized)])
    async def stats():
        return engine.stats() | {"tokenize_jobs": tokenize_jobs}

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

    def chat_ids(messages: list[dict]) -> list[int]:
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation
            raise invalid("messages", f"cannot apply the chat template: {e}") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatCompletionRequest, request: Request):
        return await chat_answer(req, request)

    async def chat_answer(req: ChatCompletionRequest, request: Request | None):
        """Online (`request`: the HTTP request) or a Batch API row (`request` None): one code path."""
        req.check()
        served_model(req.model)
        if not tok.chat_template:
            raise invalid("messages", f"model {served.name} has no chat template; use /v1/completions")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise invalid("messages", str(e)) from None
        ids = await off_loop(chat_ids, messages)
        jobs = jobs_for(req, ids, "messages", req.logprobs, req.top_logprobs or 0)
        extra = {"prompt_token_ids": ids} if req.return_token_ids else {}
        return await respond(request, req, _ChatFormat(req, vocab), jobs, len(ids), extra)

    def tokenized(prompts: list[str | list[int]]) -> list[list[int]]:
        return [p if isinstance(p, list) else tok(p)["input_ids"] for p in prompts]

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        return await completion_answer(req, request)

    async def completion_answer(req: CompletionRequest, request: Request | None):
        """Online or a Batch API row (`request` None), as `chat_answer`."""
        req.check()
        served_model(req.model)
        prompt_ids = await off_loop(tokenized, req.prompts())
        jobs: list[Job] = []
        for ids in prompt_ids:
            if any(not 0 <= t < len(tok) for t in ids):
                raise invalid("prompt", f"token ids must lie in [0, {len(tok)})")
            jobs += jobs_for(req, ids, "prompt", req.logprobs is not None, req.logprobs or 0, req.prompt_top)
        job_prompts = [ids for ids in prompt_ids for _ in range(req.n)]
        extra = {"prompt_token_ids": prompt_ids} if req.return_token_ids else {}
        return await respond(request, req, _TextFormat(req, vocab, job_prompts), jobs,
                             sum(map(len, prompt_ids)), extra)

    add_tokenize_routes(app, served, tok, chat_ids, off_loop, Depends(authorized))

    endpoints = {"/v1/chat/completions": (ChatCompletionRequest, chat_answer),
                 "/v1/completions": (CompletionRequest, completion_answer)}
    add_batch_routes(app, BatchService(batch_dir, endpoints), Depends(authorized))
    return _BodyCap(app, max_body_bytes)
