"""`kdforge status --watch`: a live terminal view of a daemon (rich Live).

Read-only: it reads `status/training_status.json` and the tail of the newest `logs/daemon_*.log`
once per refresh and writes nothing, so it cannot disturb the daemon (the status file is replaced
atomically, so a read never sees half of one). The loss sparkline comes from the log's
`step N loss X` lines, the held-out one from the status's `eval_history`; the ETA from the steps
this view has seen advance. `q` or Ctrl-C ends it with exit 0.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time
from datetime import datetime
from pathlib import Path

from kdforge.daemon.status import normalize, pid_alive, read_status

SPARKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40  # points per sparkline
LOG_TAIL_BYTES = 64 * 1024  # read of the day's log per refresh: enough for SPARK_WIDTH step lines
LOG_LINES_SHOWN = 5
STEP_LINE = re.compile(r"\bstep (\d+) loss ([0-9.eE+-]+|nan)")


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """The last `width` values as block characters, lowest ▁ to highest █."""
    vals = [v for v in values[-width:] if v == v]  # NaN out
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * len(SPARKS)))] for v in vals)


def newest_log(logs: Path) -> Path | None:
    files = sorted(logs.glob("daemon_*.log"))  # daemon_YYYYMMDD.log: the name sorts by day
    return files[-1] if files else None


def tail_lines(path: Path | None, n_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1:] if len(data) >= n_bytes else lines  # the first may be cut mid-line


def loss_points(lines: list[str]) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2))) for line in lines if (m := STEP_LINE.search(line))]


class _Rate:
    """Steps per second, from the (time, step) pairs this view has seen."""

    def __init__(self):
        self.seen: list[tuple[float, int]] = []

    def add(self, step: int) -> None:
        now = time.monotonic()
        if self.seen and step < self.seen[-1][1]:
            self.seen.clear()  # a rollback or a new run: the old pace means nothing
        if not self.seen or step != self.seen[-1][1]:
            self.seen.append((now, step))
        del self.seen[:-20]

    def eta(self, step: int, total: int) -> str:
        if len(self.seen) < 2 or not total or step >= total:
            return "-"
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        if s1 <= s0 or t1 <= t0:
            return "-"
        left = (total - step) * (t1 - t0) / (s1 - s0)
        return f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"


def view(status: dict | None, lines: list[str], rate: _Rate, where: Path):
    """The rich renderable of one refresh."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    if status is None:
        grid.add_row("status", f"waiting for {where} (no daemon has written it yet, or it holds no status)")
    else:
        s = normalize(status)
        state = s.get("status") or "?"
        if state != "stopped" and not pid_alive(s.get("pid")):
            state += f" (daemon pid {s.get('pid')} is not running)"
        grid.add_row("status", state)
        if s.get("current_file"):
            grid.add_row("batch", f"#{s.get('batch_number')} {s['current_file']} "
                                  f"(step {s.get('batch_step')}/{s.get('batch_steps')} of this batch)")
        else:
            grid.add_row("batch", f"{s.get('batch_number') or 0} done")
        step, total = s.get("current_step") or 0, s.get("total_steps") or 0
        rate.add(step)
        grid.add_row("step", f"{step}" + (f" / {total}" if total else "") + f"   ETA {rate.eta(step, total)}")
        points = loss_points(lines)
        if s.get("loss") is not None and (not points or points[-1][0] < step):
            points.append((step, s["loss"]))
        if points:
            grid.add_row("loss", f"{points[-1][1]:.4f}  {sparkline([v for _, v in points])}")
        held = [e.get("ce") for e in s.get("eval_history") or [] if e.get("ce") is not None]
        if held:
            moved = (s.get("eval") or {}).get("change_since_first")
            grid.add_row("held-out ce", f"{held[-1]:.4f}  {sparkline(held)}"
                         + (f"  ({moved:+.1%} since the first)" if moved is not None else ""))
        grid.add_row("queue", f"{s.get('batch_queue_size') or 0} file(s) waiting in inbox/")
        grid.add_row("last checkpoint", s.get("last_checkpoint") or "-")
        grid.add_row("last error", Text(s.get("last_error") or "-", style="red" if s.get("last_error") else ""))
        if s.get("last_wait"):  # a wait for the machine that ended (kdforge status shows it too)
            grid.add_row("last wait", s["last_wait"])
    log = Text("\n".join(lines[-LOG_LINES_SHOWN:]) or "(no log yet)", overflow="ellipsis", no_wrap=True)
    foot = Text(f"q or Ctrl-C to quit · read {datetime.now():%H:%M:%S}", style="dim")
    return Group(Panel(grid, title="kdforge daemon"), Panel(log, title="newest log lines"), foot)


def read_status_or_none(path: Path) -> dict | None:
    """The status, its fields normalized; None while there is none to show (not yet written, or
    not a daemon's: the view says it is waiting rather than stopping on it)."""
    from kdforge.errors import UsageError

    try:
        return normalize(read_status(path))
    except UsageError:
        return None


def watch(status_path: Path, logs: Path, interval: float = 1.0) -> int:
    """Refresh the view every `interval` seconds until `q` or Ctrl-C; returns 0."""
    from rich.console import Console
    from rich.live import Live

    rate = _Rate()
    keys = _Keys()

    def frame():
        return view(read_status_or_none(status_path), tail_lines(newest_log(logs)), rate, status_path)

    try:
        with keys, Live(frame(), console=Console(), auto_refresh=False, transient=False) as live:
            while not keys.quit_within(interval):
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: not an interruption of anything
    return 0


class _Keys:
    """`q` on a terminal's stdin, read without waiting for Enter (cbreak: Ctrl-C still signals)."""

    def __init__(self):
        self.fd = sys.stdin.fileno() if sys.stdin and sys.stdin.isatty() else None
        self.saved = None

    def __enter__(self):
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def quit_within(self, seconds: float) -> bool:
        if self.fd is None:
            time.sleep(seconds)
            return False
        ready, _, _ = select.select([self.fd], [], [], seconds)
        return bool(ready) and os.read(self.fd, 64).decode(errors="ignore").lower().count("q") > 0
