"""The routes of `kdforge serve`, each reading the app's `ServeState` (`app.state.serve`).

`public`: `GET /health`. `router` (behind the API key when there is one): `GET /stats`,
`GET /v1/models[/{id}]`, `POST /v1/chat/completions`, `POST /v1/completions`, vLLM's
`POST /tokenize` and `/detokenize`. `chat_answer` / `completion_answer` are also what the Batch
API runs for a row (`request` None: no client to watch, low priority, never streamed).

A route checks the request, tokenizes the prompt off the event loop, hands one job per choice to
the engine and formats what comes back (`responses.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response, StreamingResponse

from kdforge.serve.api_error import APIError, invalid, server_error
from kdforge.serve.batches import json_body
from kdforge.serve.engine import Engine
from kdforge.serve.output import Delta
from kdforge.serve.responses import ChatFormat, TextFormat, usage
from kdforge.serve.sampling import SamplingParams
from kdforge.serve.schemas import ChatCompletionRequest, CompletionRequest
from kdforge.serve.state import ServeState, serve_state

Job = tuple[list[int], SamplingParams]


async def authorized(request: Request, authorization: str | None = Header(None)) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (when the server has a key)."""
    api_key = serve_state(request).api_key
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError("Incorrect API key provided. Send `Authorization: Bearer <key>` with the key in "
                       "the server's --api-key-env variable.", status=401, code="invalid_api_key")


public = APIRouter()
router = APIRouter(dependencies=[Depends(authorized)])


# ---- building jobs and answers --------------------------------------------------------------

def jobs_for(state: ServeState, req, prompt_ids: list[int], param: str, logprobs: bool, top: int,
             prompt_top: int | None = None) -> list[Job]:
    """One engine job per choice (`req.n`) of one prompt; 400 for an empty prompt or one that,
    with max_tokens, does not fit the model's context."""
    context_len = state.served.context_len
    if not prompt_ids:
        raise invalid(param, "the prompt is empty: it must hold at least one token")
    room = context_len - len(prompt_ids)
    max_tokens = room if req.limit is None else req.limit
    # max_tokens 0 (scoring) may fill the whole context; generating needs room for a token
    if room < 0 or max_tokens > room or (req.limit is None and room < 1):
        raise APIError(f"This model's maximum context length is {context_len} tokens; the prompt "
                       f"has {len(prompt_ids)} and max_tokens asks for {max_tokens}. Shorten the prompt "
                       "or lower max_tokens.", param="max_tokens" if room > 0 else param,
                       code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            stop=tuple(req.stop or ()), seed=req.seed, logprobs=logprobs, top_logprobs=top,
                            prompt_logprobs=prompt_top, logit_bias=req.logit_bias_pairs(state.n_logits),
                            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                            repetition_penalty=req.repetition_penalty, top_k=max(req.top_k, 0),
                            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
    # n choices of one prompt: distinct but reproducible seeds
    return [(prompt_ids, params if req.seed is None else replace(params, seed=req.seed + choice))
            for choice in range(req.n)]


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
    queue: asyncio.Queue = asyncio.Queue()

    def emitter(index: int):
        def emit(event: object) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # event loop already closed: nobody is listening
                pass
        return emit

    tickets = engine.submit([(ids, params, emitter(index)) for index, (ids, params) in enumerate(jobs)],
                            incremental=stream, low=low)
    try:
        left = len(jobs)
        while left:
            index, event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            yield index, event
            left -= event.finish_reason is not None
    finally:
        for ticket in tickets:  # client gone or error: cancel the rest (the engine drops their rows)
            ticket.cancel()


def _body(head: dict, fmt, deltas: list[list[Delta]], prompt_tokens: int, extra: dict) -> dict:
    completions = [Delta.join(parts) for parts in deltas]
    return {**head, "object": fmt.object,
            "choices": [fmt.choice(index, completion) for index, completion in enumerate(completions)],
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in completions)), **extra}


async def _sse(engine: Engine, req, fmt, jobs: list[Job], prompt_tokens: int, head: dict) -> AsyncIterator[str]:
    """A streamed answer: an opening chunk per choice (chat), then each delta as it comes, usage
    if asked, `[DONE]`. An error after the status line is reported in-band."""
    obj = fmt.object + (".chunk" if fmt.object.startswith("chat") else "")
    sampled = [0] * len(jobs)

    def event(choices: list[dict], **more) -> str:
        return "data: " + json.dumps({**head, "object": obj, "choices": choices, **more}) + "\n\n"

    openings = [opening for index in range(len(jobs)) if (opening := fmt.opening(index))]
    if openings:
        yield event(openings)
    try:
        async for index, delta in _merged(engine, jobs, stream=True):
            sampled[index] = delta.completion_tokens
            yield event([fmt.chunk(index, delta)])
    except Exception as e:  # noqa: BLE001 - the status line is sent already: report in-band
        yield "data: " + json.dumps(server_error(e).body()) + "\n\n"
        return
    if req.include_usage:
        yield event([], usage=usage(prompt_tokens, sum(sampled)))
    yield "data: [DONE]\n\n"


async def respond(state: ServeState, request: Request | None, req, fmt, jobs: list[Job], prompt_tokens: int,
                  extra: dict):
    """The answer to one request. `request` None: a Batch API row (no client to watch, low
    priority in the engine, never streamed)."""
    engine = state.engine
    head = {"id": fmt.prefix + uuid.uuid4().hex, "created": int(time.time()), "model": state.served.name,
            "system_fingerprint": None}
    if req.stream and request is not None:
        return StreamingResponse(_sse(engine, req, fmt, jobs, prompt_tokens, head), media_type="text/event-stream")
    deltas: list[list[Delta]] = [[] for _ in jobs]

    async def collect() -> None:
        async for index, delta in _merged(engine, jobs, stream=False, low=request is None):
            deltas[index].append(delta)

    if request is None:
        await collect()
        return _body(head, fmt, deltas, prompt_tokens, extra)

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
    return _body(head, fmt, deltas, prompt_tokens, extra)


async def chat_answer(state: ServeState, req: ChatCompletionRequest, request: Request | None):
    """Online (`request`: the HTTP request) or a Batch API row (`request` None): one code path."""
    req.check()
    state.check_model(req.model)
    if not state.tokenizer.chat_template:
        raise invalid("messages", f"model {state.served.name} has no chat template; use /v1/completions")
    try:
        messages = [{"role": message.role, "content": message.text()} for message in req.messages]
    except ValueError as e:
        raise invalid("messages", str(e)) from None
    ids = await state.off_loop(state.chat_ids, messages)
    jobs = jobs_for(state, req, ids, "messages", req.logprobs, req.top_logprobs or 0)
    extra = {"prompt_token_ids": ids} if req.return_token_ids else {}
    return await respond(state, request, req, ChatFormat(req, state.vocab), jobs, len(ids), extra)


async def completion_answer(state: ServeState, req: CompletionRequest, request: Request | None):
    """Online or a Batch API row (`request` None), as `chat_answer`."""
    req.check()
    state.check_model(req.model)
    prompt_ids = await state.off_loop(state.tokenized, req.prompts())
    n_tokens = len(state.tokenizer)
    jobs: list[Job] = []
    for ids in prompt_ids:
        if any(not 0 <= token < n_tokens for token in ids):
            raise invalid("prompt", f"token ids must lie in [0, {n_tokens})")
        jobs += jobs_for(state, req, ids, "prompt", req.logprobs is not None, req.logprobs or 0, req.prompt_top)
    job_prompts = [ids for ids in prompt_ids for _ in range(req.n)]
    extra = {"prompt_token_ids": prompt_ids} if req.return_token_ids else {}
    return await respond(state, request, req, TextFormat(req, state.vocab, job_prompts), jobs,
                         sum(map(len, prompt_ids)), extra)


# ---- routes ---------------------------------------------------------------------------------

@public.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": serve_state(request).served.name}


@router.get("/stats")
async def stats(request: Request):
    state = serve_state(request)
    return state.engine.stats() | {"tokenize_jobs": state.tokenize_jobs,
                                   "tokenize_running": state.tokenize_running}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [serve_state(request).model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    state = serve_state(request)
    state.check_model(model_id)
    return state.model_card()


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request):
    return await chat_answer(serve_state(request), req, request)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    return await completion_answer(serve_state(request), req, request)


def _token_ids_param(body: dict, n_vocab: int) -> list[int]:
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise invalid("tokens", "tokens must be a list of token ids (integers)")
    if any(not 0 <= token < n_vocab for token in ids):
        raise invalid("tokens", f"token ids must lie in [0, {n_vocab})")
    return ids


@router.post("/tokenize")
async def tokenize(request: Request):
    """vLLM's `POST /tokenize`: `prompt`, or chat `messages` through the model's template, as the
    chat route renders them."""
    state, body = serve_state(request), await json_body(request)
    state.check_model(body.get("model"), optional=True)
    tokenizer, prompt, messages = state.tokenizer, body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise invalid("prompt", "send exactly one of `prompt` (a string) or `messages` (a chat)")
    if messages is not None:
        try:
            chat_messages = [{"role": message.role, "content": message.text()} for message in
                             ChatCompletionRequest(model=state.served.name, messages=messages).messages]
        except (ValueError, TypeError) as e:
            raise invalid("messages", f"Invalid 'messages': {str(e)[:300]}") from None
        ids = await state.off_loop(state.chat_ids, chat_messages)
    elif not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string")
    else:
        special = body.get("add_special_tokens", True) is not False
        ids = (await state.off_loop(lambda: tokenizer(prompt, add_special_tokens=special)))["input_ids"]
    out = {"count": len(ids), "max_model_len": state.served.context_len, "tokens": ids}
    return out | ({"token_strs": tokenizer.convert_ids_to_tokens(ids)} if body.get("return_token_strs") else {})


@router.post("/detokenize")
async def detokenize(request: Request):
    """vLLM's `POST /detokenize`: `tokens` -> `prompt`, special tokens kept."""
    state, body = serve_state(request), await json_body(request)
    state.check_model(body.get("model"), optional=True)
    ids = _token_ids_param(body, len(state.tokenizer))
    return {"prompt": await state.off_loop(lambda: state.tokenizer.decode(
        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))}
