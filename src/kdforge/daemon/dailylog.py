"""The daemon's log: `logs/daemon_YYYYMMDD.log`, a new file each day (by the daemon's clock).

One line per event, `YYYY-MM-DD HH:MM:SS LEVEL message`; errors carry their traceback on the
following lines. Only the daemon starts a line: every continuation line (of a message or a
traceback) is indented and control characters are escaped, so text that came from data (a file
name, a record's key, an exception's message) can never forge an event line `verify` would read. Each write opens, appends and closes, so the day's file switches at midnight
without a restart and a kill never loses more than the line being written.
"""

from __future__ import annotations

import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable


def _clean(text: str) -> str:
    """Control characters escaped, newlines kept but followed by an indent."""
    out = "".join(c if c == "\n" or c.isprintable() else ascii(c)[1:-1] for c in text)
    return out.replace("\n", "\n  ")


class DailyLog:
    def __init__(self, folder: Path, now: Callable[[], datetime] = datetime.now,
                 echo: Callable[[str], None] | None = None):
        self.folder = folder
        self.now = now
        self.echo = echo

    def path_for(self, when: datetime) -> Path:
        return self.folder / f"daemon_{when:%Y%m%d}.log"

    def write(self, level: str, message: str, exc: BaseException | None = None) -> None:
        when = self.now()
        text = f"{when:%Y-%m-%d %H:%M:%S} {level:<7} {message}"
        if exc is not None:
            text += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        text = _clean(text)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path_for(when), "a", encoding="utf-8") as f:
            f.write(text + "\n")
        if self.echo:
            self.echo(text)

    def info(self, message: str) -> None:
        self.write("INFO", message)

    def warning(self, message: str, exc: BaseException | None = None) -> None:
        self.write("WARNING", message, exc)

    def error(self, message: str, exc: BaseException | None = None) -> None:
        self.write("ERROR", message, exc)
