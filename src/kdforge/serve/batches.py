"""OpenAI's Batch API for `kdforge serve`: files and batches, processed in the background.

Routes (behind the same API key as /v1): `POST /v1/files` (multipart, `purpose=batch`),
`GET /v1/files` (newest first; `purpose`, `order`, `after`, `limit`), `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`, `POST /v1/batches` (endpoint
`/v1/chat/completions` or `/v1/completions`), `GET /v1/batches/{id}`, `GET /v1/batches` (newest
first, `after`, `limit`), `POST /v1/batches/{id}/cancel`.

A batch is validated (every line JSON with a unique `custom_id`, `method` POST, `url` the batch's
endpoint; else the batch fails with the lines named), then its rows go through the route's own
code (`chat_answer` / `completion_answer` in routes.py) with no client attached, so the engine runs
them at low priority, beside online requests, and a greedy row equals the online answer to the
same body. Rows that answer an error go to the error file with their status. Cancelling stops new
rows; the rows done keep their results (output file), as OpenAI does. A batch that cannot be read
or run (a line nested too deeply to parse, a server error) ends "failed" with the reason in
`errors`; it is never left "validating".

Storage is bounded by what clients send, and nothing grows in memory with a batch's size: the
input is read line by line (twice: validation, then the rows), and each result line is appended
to the batch's output or error file as its row finishes (`files/<id>.partial`, renamed to
`files/<id>` when the batch ends). Metadata is capped as OpenAI caps it (16 pairs, keys <= 64
characters, values <= 512); files can be deleted.

Everything lives under `root` (`--batch-dir`): `files/<id>` with `files/<id>.json` (its object),
`batches/<id>.json`, each written atomically. A server restarted on the same folder serves its
files and batches again: an unfinished batch goes on from the rows already written (a torn last
line is cut), a batch cancelled before the restart finishes with those rows, and its counts are
the lines of its files.
"""

from __future__ import annotations

import asyncio
import email.message
import email.parser
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable, Iterator

from fastapi import Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError

from kdforge.atomic import AppendFile, atomic_write_bytes, atomic_write_json
from kdforge.serve.api_error import APIError, invalid, server_error

TERMINAL = ("completed", "failed", "expired", "cancelled")
ROWS_IN_FLIGHT = 8  # rows of one batch handed to the engine at once: it batches them, online requests go first
MAX_METADATA = 16  # OpenAI's limits on metadata: pairs, key and value length
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512
MAX_ERRORS = 100  # validation errors kept per batch
MAX_FILES_LIST = 10000  # OpenAI's largest `limit` on GET /v1/files

Answer = Callable[[BaseModel, None], Awaitable[dict]]
Endpoints = dict[str, tuple[type[BaseModel], Answer]]  # url -> (request body model, the route's answer)


def _id(prefix: str) -> str:
    """Ids sort in creation order (nanosecond clock first), so the list is newest first by id alone."""
    return f"{prefix}_{time.time_ns():016x}{uuid.uuid4().hex[:8]}"


def _not_found(kind: str, oid: str) -> APIError:
    return APIError(f"No {kind} with id '{oid}' on this server.", status=404, param="id", code="not_found")


def check_metadata(meta: object) -> dict | None:
    """OpenAI's rules for `metadata`: up to 16 string pairs, keys <= 64 and values <= 512
    characters (400 naming the rule broken); a server keeps and lists it, so it must stay small."""
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise invalid("metadata", "metadata must be an object of string keys and string values")
    if len(meta) > MAX_METADATA:
        raise invalid("metadata", f"metadata holds at most {MAX_METADATA} pairs, got {len(meta)}")
    for k, v in meta.items():
        if len(k) > MAX_METADATA_KEY:
            raise invalid("metadata", f"metadata keys are at most {MAX_METADATA_KEY} characters, got {len(k)}")
        if not isinstance(v, str):
            raise invalid("metadata", f"metadata values must be strings (key {k[:64]!r})")
        if len(v) > MAX_METADATA_VALUE:
            raise invalid("metadata", f"metadata values are at most {MAX_METADATA_VALUE} characters, "
                                      f"got {len(v)} (key {k[:64]!r})")
    return meta


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a JSONL file, read as it goes; only "\\n" ends a line (a JSON string
    may hold U+2028 and the like, which str.splitlines would split on)."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield i, line


def _parse_row(line: bytes, endpoint: str) -> tuple[dict | None, str | None, str]:
    """(row, None, code) for a good line; (None, problem, code) otherwise. Never raises: a line
    nested too deeply for the parser is a bad line like any other."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "the line is not UTF-8", "invalid_json"
    except RecursionError:
        return None, "the line is not JSON this server can read (nested too deeply)", "invalid_json"
    except ValueError:
        return None, "the line is not JSON", "invalid_json"
    if not isinstance(row, dict):
        return None, "the line must be a JSON object", "invalid_request"
    cid = row.get("custom_id")
    problem = ("custom_id is missing (a string)" if not isinstance(cid, str) else
               "method must be POST" if row.get("method") != "POST" else
               f"url must be {endpoint}, the batch's endpoint" if row.get("url") != endpoint else
               "body must be an object" if not isinstance(row.get("body"), dict) else None)
    return (None, problem, "invalid_request") if problem else (row, None, "")


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the `limit` items after the one with id `after`."""
    if after is not None:
        ids = [x["id"] for x in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _done_rows(path: Path) -> tuple[set[str], int]:
    """The custom_ids of a results file and its line count, read line by line, after cutting a
    torn last line (a server killed mid-write)."""
    if not path.exists():
        return set(), 0
    ids, end = set(), 0
    with open(path, "r+b") as f:
        for line in f:
            if not line.endswith(b"\n"):
                f.truncate(end)
                break
            end += len(line)
            ids.add(json.loads(line)["custom_id"])
    return ids, len(ids)


class BatchService:
    def __init__(self, root: str | Path | None, endpoints: Endpoints):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="kdforge-batches-"))
        self.endpoints = endpoints
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "batches").mkdir(parents=True, exist_ok=True)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        for p in (self.root / "files").glob("*.json"):
            self.files[p.stem] = json.loads(p.read_text())
        for p in (self.root / "batches").glob("*.json"):
            self.batches[p.stem] = json.loads(p.read_text())
        self._tasks: dict[str, asyncio.Task] = {}
        self._broken: set[str] = set()  # batches whose failure could not even be recorded: not retried

    # ---------------------------------------------------------------- files
    def _file_meta(self, fid: str, filename: str, purpose: str) -> dict:
        meta = {"id": fid, "object": "file", "bytes": (self.root / "files" / fid).stat().st_size,
                "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                "status": "processed", "status_details": None}
        atomic_write_json(self.root / "files" / f"{fid}.json", meta)
        self.files[fid] = meta
        return meta

    def add_file(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = _id("file")
        atomic_write_bytes(self.root / "files" / fid, data)
        return self._file_meta(fid, filename, purpose)

    def file(self, fid: str) -> dict:
        if fid not in self.files:
            raise _not_found("file", fid)
        return self.files[fid]

    def path(self, fid: str) -> Path:
        self.file(fid)
        return self.root / "files" / fid

    def file_list(self, purpose: str | None, limit: int, order: str, after: str | None) -> dict:
        items = sorted((f for f in self.files.values() if purpose is None or f["purpose"] == purpose),
                       key=lambda f: f["id"], reverse=order == "desc")
        return _page(items, after, limit)

    def delete_file(self, fid: str) -> dict:
        self.file(fid)
        users = [b["id"] for b in self.batches.values() if b["input_file_id"] == fid and b["status"] not in TERMINAL]
        if users:
            raise APIError(f"file '{fid}' is the input of batch {users[0]}, which has not finished: cancel the "
                           "batch (or wait for it) first", status=409, param="file_id", code="file_in_use")
        for p in (self.root / "files" / fid, self.root / "files" / f"{fid}.json"):
            p.unlink(missing_ok=True)
        del self.files[fid]
        return {"id": fid, "object": "file", "deleted": True}

    # ---------------------------------------------------------------- batches
    def _save(self, b: dict) -> None:
        atomic_write_json(self.root / "batches" / f"{b['id']}.json", b, durable=True)

    def batch(self, bid: str) -> dict:
        if bid not in self.batches:
            raise _not_found("batch", bid)
        return self.batches[bid]

    def create(self, body: dict) -> dict:
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or fid not in self.files:
            raise invalid("input_file_id", f"No file with id '{str(fid)[:80]}': upload it first (POST /v1/files, "
                                           "purpose=batch)")
        if self.files[fid]["purpose"] != "batch":
            raise invalid("input_file_id", f"file '{fid}' was uploaded with purpose "
                                           f"'{self.files[fid]['purpose']}'; a batch needs purpose=batch")
        endpoint = body.get("endpoint")
        if endpoint not in self.endpoints:
            raise invalid("endpoint", f"this server runs batches for {' and '.join(self.endpoints)}")
        if body.get("completion_window") != "24h":
            raise invalid("completion_window", "the completion window must be '24h'")
        meta = check_metadata(body.get("metadata"))
        now = int(time.time())
        bid = _id("batch")
        b = {"id": bid, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": fid,
             "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
             "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
             "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
             "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": meta}
        self.batches[bid] = b
        self._save(b)
        self.resume()
        return b

    def listing(self, after: str | None, limit: int) -> dict:
        items = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        return _page(items, after, limit)

    def cancel(self, bid: str) -> dict:
        b = self.batch(bid)
        if b["status"] not in TERMINAL and b["status"] != "cancelling":
            b["status"], b["cancelling_at"] = "cancelling", int(time.time())
            self._save(b)
            if bid not in self._tasks:  # nothing runs it (not started yet): cancelled at once
                self._finish(b, "cancelled")
        return b

    def resume(self) -> None:
        """Run every unfinished batch that has no task (new ones; those of an earlier server)."""
        for bid, b in self.batches.items():
            if b["status"] in TERMINAL or bid in self._tasks or bid in self._broken:
                continue
            if b["status"] == "cancelling":
                self._guarded(b, lambda: self._finish(b, "cancelled"))
                continue
            self._tasks[bid] = asyncio.get_running_loop().create_task(self._run(b))

    # ---------------------------------------------------------------- processing
    def _results(self, b: dict, kind: str) -> Path:
        """Where the batch's `kind` ("out" / "err") lines are appended while it runs. The file id
        is the batch's own, so a restarted server finds the lines again."""
        return self.root / "files" / f"file_{b['id'].removeprefix('batch_')}{kind}.partial"

    def _validate(self, b: dict) -> int:
        """The number of rows, or 0 with `b["errors"]` set: every line read once, only the
        custom_ids kept (duplicates are errors)."""
        seen, errors, n = set(), [], 0
        for i, line in _lines(self.path(b["input_file_id"])):
            row, problem, code = _parse_row(line, b["endpoint"])
            if row is not None and row["custom_id"] in seen:
                row, problem, code = None, f"custom_id '{row['custom_id'][:80]}' is used twice", "invalid_request"
            if row is None:
                if len(errors) < MAX_ERRORS:
                    errors.append({"code": code, "message": problem, "param": None, "line": i})
                continue
            seen.add(row["custom_id"])
            n += 1
        if errors or not n:
            errors = errors or [{"code": "empty_file", "message": "the input file has no requests", "param": None,
                                 "line": None}]
            b["errors"] = {"object": "list", "data": errors}
            return 0
        return n

    async def _answer(self, endpoint: str, row: dict) -> tuple[int, dict]:
        model, answer = self.endpoints[endpoint]
        try:
            req = model.model_validate(row["body"])
            if req.stream:
                raise invalid("stream", "a batch row cannot stream")
            return 200, await answer(req, None)
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
            await self._process(b)
        except Exception as e:  # noqa: BLE001 - whatever it was, the batch must end, not stay "validating"
            err = server_error(e)
            b["errors"] = {"object": "list", "data": [{"code": "server_error", "message": err.message,
                                                       "param": None, "line": None}]}
            self._guarded(b, lambda: self._finish(b, "failed"))
        finally:
            self._tasks.pop(b["id"], None)

    def _guarded(self, b: dict, finish: Callable[[], None]) -> None:
        try:
            finish()
        except Exception as e:  # noqa: BLE001 - e.g. a full disk: say it failed, do not retry on every GET
            server_error(e)
            b["status"], b["failed_at"] = "failed", int(time.time())
            self._broken.add(b["id"])

    async def _process(self, b: dict) -> None:
        total = self._validate(b)
        if not total:
            return self._finish(b, "failed")
        if b["status"] == "cancelling":  # cancelled before a row ran
            return self._finish(b, "cancelled")
        out_path, err_path = self._results(b, "out"), self._results(b, "err")
        done_out, n_out = _done_rows(out_path)
        done_err, n_err = _done_rows(err_path)
        done = done_out | done_err
        b["status"], b["in_progress_at"] = "in_progress", b["in_progress_at"] or int(time.time())
        b["request_counts"] = {"total": total, "completed": n_out, "failed": n_err}
        self._save(b)
        rows = (row for _, line in _lines(self.path(b["input_file_id"]))
                if (row := _parse_row(line, b["endpoint"])[0]) is not None and row["custom_id"] not in done)
        out, err = AppendFile(out_path), AppendFile(err_path)
        try:
            async def worker() -> None:
                for row in rows:
                    if b["status"] == "cancelling":
                        return
                    status, body = await self._answer(b["endpoint"], row)
                    line = {"id": _id("batch_req"), "custom_id": row["custom_id"], "error": None,
                            "response": {"status_code": status, "request_id": _id("req"), "body": body}}
                    (out if status == 200 else err).append(line)  # on disk as it finishes, not held
                    b["request_counts"]["completed" if status == 200 else "failed"] += 1

            await asyncio.gather(*(worker() for _ in range(ROWS_IN_FLIGHT)))
        finally:
            out.close()
            err.close()
        self._finish(b, "cancelled" if b["status"] == "cancelling" else "completed")

    def _finish(self, b: dict, status: str) -> None:
        """End the batch: its results files become file objects, its counts their line counts."""
        b["finalizing_at"] = int(time.time())
        counts = b["request_counts"]
        for kind, key, count in (("out", "output_file_id", "completed"), ("err", "error_file_id", "failed")):
            partial = self._results(b, kind)
            fid = partial.stem
            final = partial.with_suffix("")
            if partial.exists():
                _done_rows(partial)  # cut a torn tail
                os.replace(partial, final)
            if final.exists() and final.stat().st_size:
                counts[count] = _done_rows(final)[1]
                b[key] = fid
                if fid not in self.files:
                    self._file_meta(fid, f"{b['id']}_{'output' if kind == 'out' else 'error'}.jsonl", "batch_output")
            else:
                final.unlink(missing_ok=True)
                counts[count] = 0
        b["status"], b[f"{status}_at"] = status, int(time.time())
        self._save(b)


def _disposition(part: email.message.Message) -> email.message.Message:
    """A part's Content-Disposition read as UTF-8 (what browsers and httpx send for a non-ASCII
    filename); the stdlib parser would replace those bytes. Not UTF-8: 400."""
    raw = next((v for k, v in part._headers if k.lower() == "content-disposition"), "")  # undecoded (surrogates)
    try:
        text = raw.encode("ascii", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise invalid("file", "a multipart field name or filename is not valid UTF-8") from None
    disp = email.message.Message()
    disp["content-disposition"] = text
    return disp


def _multipart(content_type: str, raw: bytes) -> dict:
    """{field name: (filename, bytes)} of a multipart/form-data body (stdlib parser: no extra package)."""
    try:
        head = b"content-type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    except UnicodeError:
        raise invalid(None, "the Content-Type header is not Latin-1") from None
    msg = email.parser.BytesParser().parsebytes(head + raw)
    if not msg.is_multipart():
        raise invalid(None, "POST /v1/files takes multipart/form-data with fields 'file' and 'purpose'")
    parts = {}
    for p in msg.get_payload():
        disp = _disposition(p)
        name = disp.get_param("name", header="content-disposition")
        if isinstance(name, str):
            parts[name] = (disp.get_filename(), p.get_payload(decode=True) or b"")
    return parts


async def json_body(request: Request) -> dict:
    """A request's JSON object body, or 400 (a body nested too deeply to parse included)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as e:
        raise APIError(f"Could not parse the JSON body: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise invalid(None, "the body must be a JSON object")
    return body


def add_batch_routes(app, service: BatchService, auth) -> None:
    """Register the Files and Batches routes on `app`, each behind `auth` (a Depends)."""

    @app.post("/v1/files", dependencies=[auth])
    async def upload(request: Request):
        parts = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in parts:
            raise invalid("file", "the multipart field 'file' is missing")
        try:
            purpose = parts.get("purpose", (None, b""))[1].decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("purpose", "purpose is not valid UTF-8: send purpose=batch") from None
        if purpose != "batch":
            raise invalid("purpose", f"this server keeps files for purpose 'batch' only, got '{purpose[:80]}'")
        name, data = parts["file"]
        return service.add_file(name or "upload.jsonl", purpose, data)

    @app.get("/v1/files", dependencies=[auth])
    async def file_list(purpose: str | None = None, limit: int = MAX_FILES_LIST, order: str = "desc",
                        after: str | None = None):
        if not 1 <= limit <= MAX_FILES_LIST:
            raise invalid("limit", f"limit must lie in [1, {MAX_FILES_LIST}]")
        if order not in ("asc", "desc"):
            raise invalid("order", "order is 'asc' or 'desc'")
        return service.file_list(purpose, limit, order, after)

    @app.get("/v1/files/{file_id}", dependencies=[auth])
    async def file(file_id: str):
        return service.file(file_id)

    @app.delete("/v1/files/{file_id}", dependencies=[auth])
    async def delete_file(file_id: str):
        return service.delete_file(file_id)

    @app.get("/v1/files/{file_id}/content", dependencies=[auth])
    async def content(file_id: str):
        return FileResponse(service.path(file_id), media_type="application/octet-stream")  # streamed from disk

    @app.post("/v1/batches", dependencies=[auth])
    async def create(request: Request):
        return service.create(await json_body(request))

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
