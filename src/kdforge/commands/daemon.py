"""CLI: `kdforge daemon`, `kdforge status`, `kdforge verify` (continuous training).

Thin: parse, call `kdforge.daemon`, turn its results into output and exit codes. Torch is
imported only once the base dir lock is held, so a second daemon is refused at once.
"""

from __future__ import annotations

import json
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
    from kdforge.config import load_config
    from kdforge.daemon.inbox import BaseDirLock
    from kdforge.daemon.layout import Layout
    from kdforge.errors import UsageError

    paths = Layout(base_dir.resolve())
    if not config:
        default = paths.base / "daemon.yaml"
        if not default.is_file():
            raise UsageError(f"no config: pass --config FILE or put one at {default} (example: configs/daemon.yaml)")
        config = [default]
    cfg = load_config(config, list(overrides or []))
    lock = BaseDirLock(paths.lock_file).acquire()
    try:
        from kdforge.daemon.service import Daemon

        return Daemon(paths.base, cfg, echo=lambda line: print(line, flush=True)).run(once=once, lock=lock)
    finally:
        lock.release()


def status(
    base_dir: Path = typer.Option(..., "--base-dir", help=BASE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the status file as JSON"),
):
    """The daemon's status: state, step, batch, loss, queue, last checkpoint."""
    from kdforge.daemon.layout import Layout
    from kdforge.daemon.status import pid_alive, read_status, render
    from kdforge.errors import UsageError

    path = Layout(base_dir.resolve()).status_file
    if not path.is_file():
        raise UsageError(f"no status file at {path}: no daemon has run on {base_dir} "
                         f"(start one: kdforge daemon --base-dir {base_dir} --config CFG)")
    data = read_status(path)
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
