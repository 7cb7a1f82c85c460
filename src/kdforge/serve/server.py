"""`kdforge serve`: load the model, start the engine, run uvicorn until SIGINT/SIGTERM, which
shut it down gracefully (in-flight requests get up to 5 s) and exit 0.

When the socket is listening and the model loaded, one line goes to stdout (flushed), which
callers wait for:

    kdforge serve: listening on http://127.0.0.1:PORT/v1 (model NAME)

`port=0` binds a free port; the line names the real one.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from kdforge.errors import UsageError


@dataclass
class ServeOptions:
    model_dir: str
    adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    api_key_env: str | None = None  # name of the env var holding the key; unset var: no auth
    model_name: str | None = None  # default: MODEL_DIR's folder name
    max_batch_size: int = 32  # rows generated together
    device: str = "auto"
    dtype: str = "auto"


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port "
                         "(--port 0 takes a free one)") from None
    sock.listen(2048)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def set_torch_threads() -> None:
    """Honour OMP_NUM_THREADS (the intra-op pool); one inter-op thread is enough for decoding."""
    import torch

    n = os.environ.get("OMP_NUM_THREADS", "")
    if n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or the pool already started
        pass


def run_server(opts: ServeOptions) -> None:
    """Serve until interrupted. Raises UsageError for a bad folder, port or option."""
    if opts.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {opts.max_batch_size}")
    api_key = os.environ.get(opts.api_key_env) if opts.api_key_env else None
    if opts.api_key_env and not api_key:
        print(f"kdforge serve: {opts.api_key_env} is not set: serving without an API key", file=sys.stderr)
    from kdforge.serve.loader import load_served_model, resolve_folders

    resolve_folders(opts.model_dir, opts.adapter)  # bad folders and taken ports fail fast, before torch loads
    sock = _bind(opts.host, opts.port)

    import uvicorn

    from kdforge.serve.app import build_app
    from kdforge.serve.engine import Engine

    set_torch_threads()
    served = load_served_model(opts.model_dir, opts.adapter, model_name=opts.model_name,
                               device=opts.device, dtype=opts.dtype)
    engine = Engine(served.model, served.tokenizer, max_batch_size=opts.max_batch_size)
    app = build_app(engine, served, api_key=api_key)
    port = sock.getsockname()[1]
    ready = f"kdforge serve: listening on http://{_url_host(opts.host)}:{port}/v1 (model {served.name})"

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(ready, flush=True)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured SIGINT/SIGTERM after shutting down; a server stopped on
            # request has done its job, so it exits 0 instead.
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="off")
    try:
        _Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    print("kdforge serve: stopped", flush=True)
