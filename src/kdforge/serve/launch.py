"""Start `kdforge serve` in a subprocess and wait until it answers.

    with launch("examples/teacher") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")

The server binds a free port itself (`--port 0`) and names it on its ready line, so two
launches never race for a port. Its stdout and stderr go to `log_path` (a pipe left unread
could fill and stall it). `stop()` sends SIGTERM, then SIGKILL after `grace` seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdforge.errors import KdforgeError, UsageError

READY = re.compile(r"kdforge serve: listening on (http://\S+/v1) \(model (.*)\)")


class ServerHandle:
    """A running `kdforge serve`. `base_url` ends in /v1, ready for an OpenAI client."""

    def __init__(self, process: subprocess.Popen, base_url: str, model: str, log_path: Path,
                 owned_dir: Path | None = None):
        self.process, self.base_url, self.model, self.log_path = process, base_url, model, log_path
        self.owned_dir = owned_dir  # the temp folder `launch` made for the log: removed by stop()

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1].split("/")[0])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM; SIGKILL if still running after `grace` seconds. Returns the exit status."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owned_dir is not None:  # no /tmp/kdforge-serve-* left behind by a server stopped here
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None
        return self.process.returncode

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def launch(model_dir: str | Path, port: int | None = None, env: dict | None = None, *,
           adapter: str | Path | None = None, host: str = "127.0.0.1", api_key_env: str | None = None,
           model_name: str | None = None, extra_args: list[str] | None = None,
           log_path: str | Path | None = None, timeout: float = 180.0) -> ServerHandle:
    """Start `kdforge serve model_dir` (on a free port unless `port`) and return once it listens.

    `env` is the child's whole environment (default: this one; OMP_NUM_THREADS is kept as
    given). Raises KdforgeError with the server's last log lines if it exits or is not ready
    within `timeout` seconds.
    """
    cmd = [sys.executable, "-m", "kdforge", "serve", str(model_dir), "--host", host, "--port", str(port or 0)]
    for flag, val in (("--adapter", adapter), ("--api-key-env", api_key_env), ("--model-name", model_name)):
        if val is not None:
            cmd += [flag, str(val)]
    cmd += list(extra_args or [])
    owned_dir = None
    if log_path is None:  # a temp folder of our own, removed when the handle stops the server
        owned_dir = Path(tempfile.mkdtemp(prefix="kdforge-serve-"))
        log_path = owned_dir / "serve.log"
    log_path = Path(log_path)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env)
    handle = None
    deadline = time.monotonic() + timeout
    try:
        while handle is None:
            m = READY.search(log_path.read_text(errors="replace"))
            if m:
                handle = ServerHandle(proc, m.group(1), m.group(2), log_path, owned_dir)
            elif proc.poll() is not None:
                cls = UsageError if proc.returncode == UsageError.exit_code else KdforgeError
                raise cls(f"kdforge serve exited with status {proc.returncode} before it was ready; "
                                   f"its log ({log_path}) ends:\n{_tail(log_path)}")
            elif time.monotonic() > deadline:
                raise KdforgeError(f"kdforge serve was not ready within {timeout:.0f}s; its log ({log_path}) "
                                   f"ends:\n{_tail(log_path)}")
            else:
                time.sleep(0.1)
    except BaseException:  # includes Ctrl-C while waiting: never leave a server behind
        ServerHandle(proc, "", "", log_path).stop(grace=5)
        raise
    return handle
