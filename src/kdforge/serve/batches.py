"""OpenAI's Batch API for `kdforge serve`: files and batches, processed in the background.

Routes (behind the same API key as /v1): `POST /v1/files` (multipart, `purpose=batch`),
`GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `POST /v1/batches` (endpoint
`/v1/chat/completions`), `GET /v1/batches/{id}`, `GET /v1/batches` (newest first, `after`,
`limit`), `POST /v1/batches/{id}/cancel`.

A batch is validated (every line JSON with a unique `custom_id`, `method` POST, `url` the batch's
endpoint; else the batch fails with the line named), then its rows go through the chat route's own
code (`chat_answer` in app.py) with no client attached, so the engine runs them at low priority,
beside online requests, and a greedy row equals the online answer to the same body. Rows that
answer an error go to the error file with their status. Cancelling stops new rows; the rows done
keep their results (output file), as OpenAI does.

Everything lives under `root` (`--batch-dir`): `files/<id>` with `files/<id>.json` (its object),
`batches/<id>.json`, each written atomically. A server restarted on the same folder serves its
files and batches again and runs the unfinished batches from the start.
"""

from __future__ import annotations

import asyncio
import email.parser
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from kdforge.atomic import atomic_write_bytes, atomic_write_json
from kdforge.serve.api_error import APIError, invalid, server_error
from kdforge.serve.schemas import ChatCompletionRequest

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
ROWS_IN_FLIGHT = 8  # rows of one batch handed to the engine at once: it batches them, online requests go first
MAX_METADATA = 16  # OpenAI's limit on metadata pairs

ChatAnswer = Callable[[ChatCompletionRequest, None], Awaitable[dict]]


def _id(prefix: str) -> str:
    """Ids sort in creation order (nanosecond clock first), so the list is newest first by id alone."""
    return f"{prefix}_{time.time_ns():016x}{uuid.uuid4().hex[:8]}"


def _not_found(kind: str, oid: str) -> APIError:
    return APIError(f"No {kind} with id '{oid}' on this server.", status=404, param="id", code="not_found")


class BatchService:
    def __init__(self, root: str | Path | None, chat_answer: ChatAnswer):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="kdforge-batches-"))
        self.chat_answer = chat_answer
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "batches").mkdir(parents=True, exist_ok=True)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        for p in (self.root / "files").glob("*.json"):
            self.files[p.stem] = json.loads(p.read_text())
        for p in (self.root / "batches").glob("*.json"):
            self.batches[p.stem] = json.loads(p.read_text())
        self._tasks: dict[str, asyncio.Task] = {}

    # ---------------------------------------------------------------- files
    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = _id("file")
        atomic_write_bytes(self.root / "files" / fid, data)
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        atomic_write_json(self.root / "files" / f"{fid}.json", meta)
        self.files[fid] = meta
        return meta

    def file(self, fid: str) -> dict:
        if fid not in self.files:
            raise _not_found("file", fid)
        return self.files[fid]

    def content(self, fid: str) -> bytes:
        self.file(fid)
        return (self.root / "files" / fid).read_bytes()

    # ---------------------------------------------------------------- batches
    def _save(self, b: dict) -> None:
        atomic_write_json(self.root / "batches" / f"{b['id']}.json", b, durable=b["status"] in TERMINAL)

    def batch(self, bid: str) -> dict:
        if bid not in self.batches:
            raise _not_found("batch", bid)
        return self.batches[bid]

    def create(self, body: dict) -> dict:
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or fid not in self.files:
            raise invalid("input_file_id", f"No file with id '{fid}': upload it first (POST /v1/files, purpose=batch)")
        if self.files[fid]["purpose"] != "batch":
            raise invalid("input_file_id", f"file '{fid}' was uploaded with purpose "
                                           f"'{self.files[fid]['purpose']}'; a batch needs purpose=batch")
        if body.get("endpoint") != ENDPOINT:
            raise invalid("endpoint", f"this server runs batches for {ENDPOINT} only")
        if body.get("completion_window") != "24h":
            raise invalid("completion_window", "the completion window must be '24h'")
        meta = body.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or len(meta) > MAX_METADATA
                                 or not all(isinstance(v, str) for v in meta.values())):
            raise invalid("metadata", f"metadata is at most {MAX_METADATA} string pairs")
        now = int(time.time())
        b = {"id": _id("batch"), "object": "batch", "endpoint": ENDPOINT, "errors": None, "input_file_id": fid,
             "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
             "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
             "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
             "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": meta}
        self.batches[b["id"]] = b
        self._save(b)
        self.resume()
        return b

    def listing(self, after: str | None, limit: int) -> dict:
        items = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        if after is not None:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def cancel(self, bid: str) -> dict:
        b = self.batch(bid)
        if b["status"] not in TERMINAL and b["status"] != "cancelling":
            b["status"], b["cancelling_at"] = "cancelling", int(time.time())
            self._save(b)
            if bid not in self._tasks:  # nothing runs it (not started yet): cancelled at once
                self._finish(b, [], [], "cancelled")
        return b

    def resume(self) -> None:
        """Run every unfinished batch that has no task (new ones; those of an earlier server)."""
        for bid, b in self.batches.items():
            if b["status"] not in TERMINAL and bid not in self._tasks:
                if b["status"] == "cancelling":
                    self._finish(b, [], [], "cancelled")
                    continue
                self._tasks[bid] = asyncio.get_running_loop().create_task(self._run(b))

    # ---------------------------------------------------------------- processing
    def _validate(self, b: dict) -> list[dict] | None:
        rows, seen, errors = [], set(), []
        for i, line in enumerate(self.content(b["input_file_id"]).decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                errors.append({"code": "invalid_json", "message": "the line is not JSON", "param": None, "line": i})
                continue
            cid = row.get("custom_id") if isinstance(row, dict) else None
            problem = ("custom_id is missing" if not isinstance(cid, str) else
                       f"custom_id '{cid}' is used twice" if cid in seen else
                       f"method must be POST" if row.get("method") != "POST" else
                       f"url must be {ENDPOINT}" if row.get("url") != ENDPOINT else
                       "body must be an object" if not isinstance(row.get("body"), dict) else None)
            if problem:
                errors.append({"code": "invalid_request", "message": problem, "param": None, "line": i})
                continue
            seen.add(cid)
            rows.append(row)
        if errors or not rows:
            errors = errors or [{"code": "empty_file", "message": "the input file has no requests", "param": None,
                                 "line": None}]
            b["errors"] = {"object": "list", "data": errors[:100]}
            return None
        return rows

    async def _answer(self, row: dict) -> tuple[int, dict]:
        try:
            req = ChatCompletionRequest.model_validate(row["body"])
            if req.stream:
                raise invalid("stream", "a batch row cannot stream")
            return 200, await self.chat_answer(req, None)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            return 400, invalid(param, f"Invalid '{param}': {err.get('msg')}").body()
        except APIError as e:
            return e.status, e.body()
        except Exception as e:  # noqa: BLE001 - one bad row must not fail the batch
            err = server_error(e)
            return err.status, err.body()

    async def _run(self, b: dict) -> None:
        try:
            rows = self._validate(b)
            if rows is None:
                return self._finish(b, [], [], "failed")
            if b["status"] == "cancelling":  # cancelled before a row ran
                return self._finish(b, [], [], "cancelled")
            b["status"], b["in_progress_at"] = "in_progress", int(time.time())
            b["request_counts"]["total"] = len(rows)
            self._save(b)
            out: list[dict] = []
            err: list[dict] = []
            queue = iter(rows)

            async def worker() -> None:
                for row in queue:
                    if b["status"] == "cancelling":
                        return
                    status, body = await self._answer(row)
                    line = {"id": _id("batch_req"), "custom_id": row["custom_id"], "error": None,
                            "response": {"status_code": status, "request_id": _id("req"), "body": body}}
                    (out if status == 200 else err).append(line)
                    b["request_counts"]["completed" if status == 200 else "failed"] += 1

            await asyncio.gather(*(worker() for _ in range(ROWS_IN_FLIGHT)))
            self._finish(b, out, err, "cancelled" if b["status"] == "cancelling" else "completed")
        finally:
            self._tasks.pop(b["id"], None)

    def _finish(self, b: dict, out: list[dict], err: list[dict], status: str) -> None:
        b["finalizing_at"] = int(time.time())
        for key, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
                name = f"{b['id']}_{'output' if key == 'output_file_id' else 'error'}.jsonl"
                b[key] = self.add_file(name, "batch_output", data)["id"]
        b["status"], b[f"{status}_at"] = status, int(time.time())
        self._save(b)


def _multipart(content_type: str, raw: bytes) -> dict:
    """{field name: (filename, bytes)} of a multipart/form-data body (stdlib parser: no extra package)."""
    msg = email.parser.BytesParser().parsebytes(b"content-type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    if not msg.is_multipart():
        raise invalid(None, "POST /v1/files takes multipart/form-data with fields 'file' and 'purpose'")
    return {p.get_param("name", header="content-disposition"): (p.get_filename(), p.get_payload(decode=True) or b"")
            for p in msg.get_payload()}


def add_batch_routes(app, service: BatchService, auth) -> None:
    """Register the Files and Batches routes on `app`, each behind `auth` (a Depends)."""

    @app.post("/v1/files", dependencies=[auth])
    async def upload(request: Request):
        parts = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in parts:
            raise invalid("file", "the multipart field 'file' is missing")
        purpose = parts.get("purpose", (None, b""))[1].decode()
        if purpose != "batch":
            raise invalid("purpose", f"this server keeps files for purpose 'batch' only, got '{purpose}'")
        name, data = parts["file"]
        return service.add_file(name or "upload.jsonl", purpose, data)

    @app.get("/v1/files/{file_id}", dependencies=[auth])
    async def file(file_id: str):
        return service.file(file_id)

    @app.get("/v1/files/{file_id}/content", dependencies=[auth])
    async def content(file_id: str):
        return Response(service.content(file_id), media_type="application/octet-stream")

    @app.post("/v1/batches", dependencies=[auth])
    async def create(request: Request):
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            raise APIError(f"Could not parse the JSON body: {e}") from None
        if not isinstance(body, dict):
            raise invalid(None, "the body must be a JSON object")
        return service.create(body)

    @app.get("/v1/batches", dependencies=[auth])
    async def listing(after: str | None = None, limit: int = 20):
        if not 1 <= limit <= 100:
            raise invalid("limit", "limit must lie in [1, 100]")
        service.resume()
        return service.listing(after, limit)

    @app.get("/v1/batches/{batch_id}", dependencies=[auth])
    async def retrieve(batch_id: str):
        service.resume()
        return service.batch(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", dependencies=[auth])
    async def cancel(batch_id: str):
        return service.cancel(batch_id)
