"""`kdforge serve MODEL_DIR`: an OpenAI-compatible server for a local causal LM (see kdforge.serve)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from kdforge.serve.limits import DEFAULT_MAX_BODY_BYTES


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model_dir: str = typer.Argument(..., help="Hugging Face model folder, or a checkpoint-N/ / PEFT adapter folder."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT (LoRA) adapter folder to apply on MODEL_DIR."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
        api_key_env: Optional[str] = typer.Option(
            None, "--api-key-env", help="Env var holding the API key (must be set and non-empty); requests then need `Authorization: Bearer <key>`."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id clients send (default: MODEL_DIR's folder name)."),
        max_batch_size: int = typer.Option(32, "--max-batch-size", help="Most sequences generated together."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."),
        max_body_bytes: int = typer.Option(DEFAULT_MAX_BODY_BYTES, "--max-body-bytes", help="Largest request body accepted (413 above)."),
        batch_dir: Optional[str] = typer.Option(None, "--batch-dir", help="Folder for Batch API files and batches (default: a temp dir removed when the server stops); a restart on it resumes them."),
    ) -> None:
        """Serve a local model with the OpenAI API (chat, completions, streaming, logprobs)."""
        from kdforge.serve.server import ServeOptions, run_server

        run_server(ServeOptions(model_dir, adapter, host, port, api_key_env, model_name, max_batch_size,
                                device, dtype, max_body_bytes, batch_dir))
        # Stopped cleanly and nothing is left to save: skip the interpreter's teardown of torch and
        # friends, which takes seconds on a busy machine and delays whoever waits for our exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
