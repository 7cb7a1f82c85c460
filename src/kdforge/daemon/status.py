"""`status/training_status.json`: what the daemon is doing, rewritten atomically on every change.

Fields (SPEC "daemon", plus a few an operator wants): status (starting, idle, training,
consolidating, stopping, stopped, error), current_step, total_steps (the global step the current
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

STATES = ("starting", "idle", "training", "consolidating", "stopping", "stopped", "error")


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
        }

    def update(self, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in STATES:
            raise ValueError(f"unknown daemon status {fields['status']!r}")
        self.data.update(fields)
        self.data["updated_at"] = self.now().isoformat(timespec="milliseconds")
        atomic_write_json(self.path, self.data, durable=False)  # rewritten every step: atomic, no fsync


def read_status(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render(status: dict) -> str:
    """A readable block for `kdforge status`."""
    s = status
    alive = pid_alive(s.get("pid"))
    state = s.get("status", "?")
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
        f"queue:            {s.get('batch_queue_size', 0)} file(s) waiting in inbox/",
        f"last checkpoint:  {s.get('last_checkpoint') or '-'}",
        f"last snapshot:    {s.get('last_snapshot') or '-'}",
        f"base model:       {s.get('base_model') or '-'} (generation {s.get('generation', 0)})",
        f"pid:              {s.get('pid')}   started {s.get('started_at')}   updated {s.get('updated_at')}",
    ]
    if s.get("last_error"):
        lines.append(f"last error:       {s['last_error']}")
    return "\n".join(lines)
