"""CLI: `kdforge daemon`, `kdforge status`, `kdforge verify` (continuous training).

Thin: parse, call `kdforge.daemon`, turn its results into output and exit codes. Torch is
imported only once the base dir lock is held, so a second daemon is refused at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

BASE_HELP = "the daemon's base dir (inbox/, current_model/, status/, logs/, snapshots/, rejected/)"


def daemon(
    base_dir: Path = typer.Option(..., "--base-dir", help=BASE_HELP),
    config: List[Path] = typer.Option([], "--config", "-c",
                                      help="YAML files, merged left to right (default: BASE/daemon.yaml)"),
    once: bool = typer.Option(False, "--once", help="train what the inbox holds, then exit"),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides, e.g. train.lr=1e-4"),
):
    """Continuous training: train every *.jsonl batch dropped in BASE/inbox/, continuing from the
    newest checkpoint. Stop with `touch BASE/.stop`, SIGTERM or Ctrl-C (saves first)."""
    from kdforge.daemon.infra import machine_errors

    with machine_errors(f"kdforge daemon on {base_dir}"):  # a full disk at start: one line, exit 1
        return _daemon(base_dir, config, once, overrides)


def _daemon(base_dir: Path, config: List[Path], once: bool, overrides: Optional[List[str]]) -> int:
    from kdforge.config import load_config
    from kdforge.config_checks import check_config
    from kdforge.daemon.inbox import BaseDirLock
    from kdforge.daemon.layout import Layout
    from kdforge.errors import ConfigError, UsageError

    paths = Layout(base_dir.resolve())
    if not config:
        default = paths.base / "daemon.yaml"
        if not default.is_file():
            raise UsageError(f"no config: pass --config FILE or put one at {default} (example: configs/daemon.yaml)")
        config = [default]
    cfg = load_config(config, list(overrides or []), job="daemon")
    problems = check_config(cfg, for_run=True, job="daemon")
    if problems:  # before the lock, which would create the base dir for a start that is refused
        raise ConfigError(problems)
    lock = BaseDirLock(paths.lock_file).acquire()
    try:
        from kdforge.daemon.service import Daemon

        if sys.stdout.isatty() and not os.environ.get("CI"):
            with _BatchBar() as bar:
                return Daemon(paths.base, cfg, echo=bar.echo, progress=bar.update).run(once=once, lock=lock)
        from kdforge.stdout import line_printer

        return Daemon(paths.base, cfg, echo=line_printer()).run(once=once, lock=lock)  # survives `| tee`, Ctrl-C
    finally:
        lock.release()


class _BatchBar:
    """The foreground daemon on a terminal: a bar for the batch in training, log lines above it."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=Console(),
                            transient=True)
        self.task, self.batch = None, None

    def echo(self, line: str) -> None:
        self.bar.console.print(line, markup=False, highlight=False)

    def update(self, status: dict) -> None:
        if status.get("batch_number") != self.batch:  # a new batch: a new bar
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.batch = status.get("batch_number")
            self.task = self.bar.add_task(f"batch #{self.batch} {status.get('current_file')}",
                                          total=status.get("batch_steps") or None, info="")
        loss = status.get("loss")
        self.bar.update(self.task, completed=status.get("batch_step") or 0,
                        info="" if loss is None else f"loss {loss:.4f}")

    def __enter__(self) -> "_BatchBar":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def status(
    base_dir: Path = typer.Option(..., "--base-dir", help=BASE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the status file as JSON"),
    watch: bool = typer.Option(False, "--watch", help="a live view (q or Ctrl-C quits); reads only"),
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="--watch: seconds between refreshes"),
):
    """The daemon's status: state, step, batch, loss, queue, last checkpoint."""
    from kdforge.daemon.layout import Layout
    from kdforge.daemon.status import pid_alive, read_status, render
    from kdforge.errors import UsageError

    layout = Layout(base_dir.resolve())
    path = layout.status_file
    if watch and not as_json:  # a watch may start before the daemon: it waits for the status file
        from kdforge.daemon.watch import watch as watch_view

        return watch_view(path, layout.logs, interval)
    if not path.exists():
        raise UsageError(f"no status file at {path}: no daemon has run on {base_dir} "
                         f"(start one: kdforge daemon --base-dir {base_dir} --config CFG)")
    data = read_status(path)  # whatever it holds: a dict, or exit 2 naming the file
    if as_json:
        print(json.dumps({**data, "daemon_running": pid_alive(data.get("pid"))}, indent=2))
    else:
        print(render(data))


def verify(base_dir: Path = typer.Option(..., "--base-dir", help=BASE_HELP)):
    """The continuous-training verification report; exit 0 only if every check passes (else 1)."""
    from kdforge.daemon.verify import verify as run_verify

    result = run_verify(base_dir)
    print(result.report, end="")
    print(f"report: {result.report_path}")
    return 0 if result.ok else 1


def register(app: typer.Typer) -> None:
    app.command("daemon")(daemon)
    app.command("status")(status)
    app.command("verify")(verify)
