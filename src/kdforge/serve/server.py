"""`kdforge serve`: load the model, start the engine, run uvicorn until SIGINT/SIGTERM, which
shut it down gracefully (in-flight requests get up to 5 s) and exit 0.

When the socket is listening and the model loaded, one line goes to stdout (flushed), which
callers wait for:

    kdforge serve: listening on http://127.0.0.1:PORT/v1 (model NAME)

`port=0` binds a free port; the line names the real one.

Authentication fails closed: `--api-key-env VAR` with VAR unset or empty is a usage error (exit 2),
never a server without a key; a non-loopback `--host` without any key gets a loud warning.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
from dataclasses import dataclass

from kdforge.errors import UsageError
from kdforge.serve.limits import DEFAULT_MAX_BODY_BYTES


@dataclass
class ServeOptions:
    model_dir: str
    adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    api_key_env: str | None = None  # name of the env var holding the key; it must be set and non-empty
    model_name: str | None = None  # default: MODEL_DIR's folder name
    max_batch_size: int = 32  # rows generated together
    device: str = "auto"
    dtype: str = "auto"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request bodies above this get 413
    batch_dir: str | None = None  # Batch API files and batches (default: a new temp dir)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
        # says TCP. Without it Nagle holds the body behind the headers until the client's delayed
        # ACK: +40 ms per response on a kept-alive connection (3x slower requests at c=1).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def api_key_from_env(name: str | None, host: str) -> str | None:
    """The key named by --api-key-env. A name whose variable is unset or empty is an error, not
    "no authentication": a typo or a missing secret must not open the server to everyone."""
    if name is None:
        if not _loopback(host):
            print(f"kdforge serve: WARNING: listening on {host} with no API key: anyone who can reach this "
                  "address can use the model. Pass --api-key-env VAR (VAR holding the key) or bind 127.0.0.1.",
                  file=sys.stderr, flush=True)
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        state = "is empty" if name in os.environ else "is not set"
        raise UsageError(f"--api-key-env {name}: the variable {name} {state}; export {name}=<key> "
                         "(or drop --api-key-env to serve without authentication on 127.0.0.1)")
    return key


def run_server(opts: ServeOptions) -> None:
    """Serve until interrupted. Raises UsageError for a bad folder, port, key or option."""
    if opts.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {opts.max_batch_size}")
    if opts.max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes must be at least 1024, got {opts.max_body_bytes}")
    api_key = api_key_from_env(opts.api_key_env, opts.host)
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
    # Without --batch-dir the Batch API's files live in a temp folder of this run, removed at the stop
    # (a server killed with SIGKILL leaves it: pass --batch-dir to keep batches across restarts).
    scratch = None if opts.batch_dir else tempfile.TemporaryDirectory(prefix="kdforge-batches-")
    batch_dir = opts.batch_dir or scratch.name
    app = build_app(engine, served, api_key=api_key, max_body_bytes=opts.max_body_bytes, batch_dir=batch_dir)
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
        if scratch is not None:
            scratch.cleanup()
    print("kdforge serve: stopped", flush=True)
