"""The output JSONL is the journal of a run: a sample exists once its line is in the file.

- Each line is written with a single `write()` of the whole line, newline included, on an
  O_APPEND descriptor, so it reaches the kernel as it is written and survives a SIGKILL.
  `fsync` runs every `atomic.FSYNC_EVERY` seconds and on close (power loss may cost the last second).
- On open, the file is checked first and repaired second: the ids and prompt keys of the complete
  lines are loaded (a re-run skips them), then a torn last line (a run killed mid-write: no
  trailing newline, starting as our lines do) is cut off.
- A line that is not a sample (or a torn tail that is not ours) means the file is not ours to
  fix: DataError naming file:line, and the file is left byte for byte as it was.
- Failed samples go to a separate `failures.jsonl` in the checkpoint directory, never into
  the dataset; permanent failures (4xx) are skipped by later runs, transient ones retried.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kdforge.atomic import AppendFile
from kdforge.errors import DataError
from kdforge.teacher.prompts import prompt_key

TORN_PREFIX = '{"id": '  # how every sample line starts (json.dumps of a record whose first key is id)


def repair_torn_tail(path: Path) -> int:
    """Cut an incomplete last line (no newline) off `path`; returns the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline, 64 KiB at a time.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class Journal:
    """The dataset file, opened for resuming: `ids`, `keys` and `count` describe what is done."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.ids: set[str] = set()
        self.keys: set[str] = set()  # prompt keys (see prompts.prompt_key)
        self.count = 0
        self.completion_tokens = 0  # of the lines already there, for the dry-run estimate
        if self.path.exists():
            self._load()  # first: a file that is not ours is refused untouched
        self.repaired_bytes = 0 if readonly else repair_torn_tail(self.path)
        self._file = None if readonly else AppendFile(self.path)

    def _foreign(self, line: int) -> DataError:
        return DataError("this file is not a kdforge dataset (the line is not a kdforge sample) and was left as "
                         "it is: pass a new --out, or remove the line to resume", str(self.path), line)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise self._foreign(i) from None
                if not line.endswith("\n"):
                    # A torn last line is ours only if it starts as every line we write does.
                    if line.strip() and not line.startswith(TORN_PREFIX):
                        raise self._foreign(i)
                    continue  # cut by the repair (a read-only open leaves it for the real run)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    msgs = obj.get("messages") or [{"role": "user", "content": obj["prompt"]}]
                    key = prompt_key(msgs)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise self._foreign(i) from None
                if obj.get("id") in self.ids or key in self.keys:
                    continue  # a duplicate written by hand; counted once
                self.ids.add(obj.get("id"))
                self.keys.add(key)
                self.count += 1
                self.completion_tokens += int(((obj.get("metadata") or {}).get("tokens") or {}).get("completion") or 0)

    def done(self, sample_id: str, key: str) -> bool:
        return sample_id in self.ids or key in self.keys

    def append(self, record: dict, key: str) -> None:
        """Write one sample line (flushed to the kernel before returning)."""
        self._file.append(record)
        self.ids.add(record["id"])
        self.keys.add(key)
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class FailureLog:
    """`failures.jsonl`: one line per failed sample, with the reason; never part of the dataset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        repair_torn_tail(self.path)
        self.permanent: set[str] = set()  # ids that failed with a 4xx: not sent again
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("permanent"):
                    self.permanent.add(row.get("id"))
                else:  # the latest line of an id wins: a released rejection is sent again
                    self.permanent.discard(row.get("id"))
        self._file = AppendFile(self.path)

    def append(self, sample_id: str, prompt: str, source: str, reason: str, kind: str, attempts: int,
               permanent: bool) -> None:
        self._file.append({"id": sample_id, "prompt": prompt, "source": source, "reason": reason, "kind": kind,
                           "attempts": attempts, "permanent": permanent,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if permanent:
            self.permanent.add(sample_id)

    def release(self, sample_ids: list[str]) -> None:
        """Send these again on the next run: their rejection was the endpoint's fault, not theirs."""
        for sid in sample_ids:
            self._file.append({"id": sid, "kind": "released", "permanent": False,
                               "reason": "rejected in a streak of rejections: sent again on the next run",
                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            self.permanent.discard(sid)

    def close(self) -> None:
        self._file.close()
