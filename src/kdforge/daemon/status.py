"""`status/training_status.json`: what the daemon is doing, rewritten atomically on every change.

Fields (SPEC "daemon", plus a few an operator wants): status (starting, idle, training,
consolidating, waiting (the machine refused: a full disk; last_error says why, until what waited is
written: then the wait moves to last_wait, "waited until TIME: why"), stopping, stopped,
error), current_step, total_steps (the global step the current
batch ends at), batch_number, batch_step / batch_steps, batch_queue_size, current_file, loss,
learning_rate, tokens_per_s, last_checkpoint, last_snapshot, base_model, generation, pid,
started_at, updated_at, last_error; with `daemon.eval_file`, `eval` (the newest held-out numbers:
step, after, ce, perplexity, kl, ..., change_since_first) and `eval_history` (the last 20).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from kdforge.atomic import atomic_write_json

STATES = ("starting", "idle", "training", "consolidating", "waiting", "stopping", "stopped", "error")


class StatusFile:
    def __init__(self, path: Path, now: Callable[[], datetime] = datetime.now):
        self.path = path
        self.now = now
        self.data: dict[str, Any] = {
            "status": "starting", "current_step": 0, "total_steps": 0, "batch_number": 0,
            "batch_step": 0, "batch_steps": 0, "batch_queue_size": 0, "current_file": None,
            "loss": None, "learning_rate": None, "tokens_per_s": None, "last_checkpoint": None,
            "last_snapshot": None, "base_model": None, "generation": 0, "pid": os.getpid(),
            "started_at": now().isoformat(timespec="seconds"), "updated_at": None, "last_error": None,
            "last_wait": None,
        }

    def update(self, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in STATES:
            raise ValueError(f"unknown daemon status {fields['status']!r}")
        self.data.update(fields)
        self.data["updated_at"] = self.now().isoformat(timespec="milliseconds")
        atomic_write_json(self.path, self.data, durable=False)  # rewritten every step: atomic, no fsync


def read_status(path: Path) -> dict:
    """The status file as a dict. Anything else (missing, empty, truncated, not UTF-8, not a JSON
    object, nested past the parser) is a UsageError (exit 2) in one line naming the file."""
    from kdforge.errors import UsageError

    path = Path(path)
    fix = ("the daemon rewrites it whole at its next change; if none runs, start one "
           f"(kdforge daemon --base-dir {path.parent.parent}) or remove the file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no status file (no daemon has run on {path.parent.parent})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the status file ({e.strerror or e}); {fix}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}), so no daemon wrote it; {fix}") from None
    except json.JSONDecodeError as e:
        what = "empty" if not raw.strip() else f"not a complete JSON object ({e.msg} at line {e.lineno} column {e.colno})"
        raise UsageError(f"{path}: the status file is {what}; {fix}") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply to be a daemon's status; {fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: holds a JSON {type(data).__name__}, not the object a daemon writes; {fix}")
    return data


INT_FIELDS = ("current_step", "total_steps", "batch_number", "batch_step", "batch_steps", "batch_queue_size",
              "generation", "pid")
FLOAT_FIELDS = ("loss", "learning_rate", "tokens_per_s")
TEXT_FIELDS = ("status", "current_file", "last_checkpoint", "last_snapshot", "base_model", "started_at",
               "updated_at", "last_error", "last_wait")
TEXT_CAP = 2000  # characters of one field shown: a status file is not a place for megabytes


def _int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, str) and len(x) < 20 and x.strip().lstrip("+-").isdigit():
        return int(x)
    return None


def _float(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        return None
    try:
        return float(x)  # "NaN", "inf", "1.5" as a writer other than json.dumps may put them
    except (ValueError, OverflowError):
        return None


def _text(x: Any) -> str | None:
    """Printable text: control characters escaped line by line (a status file cannot drive the
    terminal), other JSON values shown as JSON."""
    from kdforge.daemon.inbox import shown

    if x is None:
        return None
    s = x if isinstance(x, str) else json.dumps(x, default=str)
    s = s if len(s) <= TEXT_CAP else s[:TEXT_CAP] + "..."
    return "\n".join(shown(line) for line in s.split("\n"))


def normalize(status: dict) -> dict:
    """The fields `render` and the watch view read, each of its type or None, whatever the file
    held: numbers as numbers ("NaN" -> nan), text escaped, eval/eval_history as dicts of floats."""
    s = dict(status)
    s.update({k: _int(status.get(k)) for k in INT_FIELDS})
    s.update({k: _float(status.get(k)) for k in FLOAT_FIELDS})
    s.update({k: _text(status.get(k)) for k in TEXT_FIELDS})
    ev = status.get("eval") if isinstance(status.get("eval"), dict) else {}
    s["eval"] = {"ce": _float(ev.get("ce")), "change_since_first": _float(ev.get("change_since_first")),
                 "after": _text(ev.get("after"))}
    history = status.get("eval_history") if isinstance(status.get("eval_history"), list) else []
    s["eval_history"] = [{"ce": _float(e.get("ce"))} for e in history if isinstance(e, dict)]
    return s


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` exists. Only a positive pid: kill(-1, 0) asks about every process."""
    pid = _int(pid)
    if pid is None or not 0 < pid < 2 ** 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def render(status: dict) -> str:
    """A readable block for `kdforge status`, for any dict a status file held."""
    s = normalize(status)
    alive = pid_alive(s.get("pid"))
    state = s.get("status") or "?"
    if state not in ("stopped",) and not alive:
        state += f" (daemon pid {s.get('pid')} is not running)"
    lines = [f"status:           {state}"]
    if s.get("current_file"):
        lines.append(f"batch:            #{s.get('batch_number')} {s['current_file']} "
                     f"(step {s.get('batch_step')}/{s.get('batch_steps')} of this batch)")
    else:
        lines.append(f"batches done:     {s.get('batch_number')}")
    lines.append(f"global step:      {s.get('current_step')}"
                 + (f" / {s['total_steps']}" if s.get("total_steps") else ""))
    if s.get("loss") is not None:
        lines.append(f"loss:             {s['loss']:.4f}   lr {s.get('learning_rate') or 0:.2e}   "
                     f"{s.get('tokens_per_s') or 0:,.0f} tokens/s")
    ev = s.get("eval") or {}
    if ev.get("ce") is not None:
        moved = ev.get("change_since_first")
        lines.append(f"held-out ce:      {ev['ce']:.4f} after {ev.get('after')}"
                     + (f" ({moved:+.1%} since the first eval)" if moved is not None else ""))
    lines += [
        f"queue:            {s.get('batch_queue_size') or 0} file(s) waiting in inbox/",
        f"last checkpoint:  {s.get('last_checkpoint') or '-'}",
        f"last snapshot:    {s.get('last_snapshot') or '-'}",
        f"base model:       {s.get('base_model') or '-'} (generation {s.get('generation') or 0})",
        f"pid:              {s.get('pid')}   started {s.get('started_at')}   updated {s.get('updated_at')}",
    ]
    if s.get("last_error"):
        lines.append(f"last error:       {s['last_error']}")
    if s.get("last_wait"):
        lines.append(f"last wait:        {s['last_wait']}")
    return "\n".join(lines)
