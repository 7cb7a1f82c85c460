"""Response cache: one SQLite (WAL) row per exact request, so no request is ever paid twice.

Key: sha256 of the canonical request, i.e. the normalised base URL plus the JSON body (model,
messages, every sampling parameter), keys sorted. The API key is not part of the body and so
never reaches the key or the file. Each row stores the answer with a sha256 of its bytes; a row
whose bytes no longer match (disk corruption, a bad copy, a hand edit) is counted, deleted and
reported as a miss, so the caller refetches it. A database file SQLite cannot open at all is
moved aside (`*.corrupt-<time>`) and a fresh one started.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable

SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL
)"""


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(base_url: str, body: dict) -> str:
    """Cache key of one chat request: base URL + the full request body (no credentials)."""
    return hashlib.sha256(canonical({"base_url": base_url.rstrip("/"), "body": body}).encode()).hexdigest()


class ResponseCache:
    """get/put of JSON answers by request key, with integrity checks (see the module docstring)."""

    def __init__(self, path: str | Path, log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = self.corrupted = 0
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.log(f"warning: response cache {self.path} is not a readable SQLite database ({e}); "
                     f"moved it to {aside} and started a fresh cache")
            self.corrupted += 1
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process death
        db.execute(SCHEMA)
        return db

    def get(self, key: str) -> dict | None:
        """The stored answer, or None on a miss or a corrupted row (which is then deleted)."""
        try:
            row = self._db.execute("SELECT body, sha256 FROM responses WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as e:
            return self._bad(key, f"unreadable row ({e})")
        if row is None:
            self.misses += 1
            return None
        body, digest = row
        if isinstance(body, str):
            body = body.encode()
        if hashlib.sha256(body).hexdigest() != digest:
            return self._bad(key, "checksum mismatch")
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._bad(key, "not JSON")
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            return self._bad(key, "not an answer")
        self.hits += 1
        return obj

    def _bad(self, key: str, why: str) -> None:
        self.corrupted += 1
        self.misses += 1
        self.log(f"warning: corrupted cache entry {key[:12]} in {self.path} ({why}); refetching it")
        try:
            self._db.execute("DELETE FROM responses WHERE key = ?", (key,))
        except sqlite3.DatabaseError:
            pass
        return None

    def put(self, key: str, answer: dict) -> None:
        body = canonical(answer).encode()
        self._db.execute("INSERT OR REPLACE INTO responses (key, body, sha256, created) VALUES (?, ?, ?, ?)",
                         (key, body, hashlib.sha256(body).hexdigest(), time.time()))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()
