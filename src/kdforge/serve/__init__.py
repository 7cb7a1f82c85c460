"""`kdforge serve`: an OpenAI-compatible server for a local Hugging Face causal LM.

Files: `loader.py` (model/adapter/checkpoint folders), `engine.py` (batching generation on a
background thread), `kv_batch.py` (left-padded KV-cache batches), `sampling.py` (token choice,
logprobs), `output.py` (detokenizing, stop strings), `vocab.py` (token text/bytes),
`schemas.py` / `app.py` / `routes.py` / `state.py` / `responses.py` / `api_error.py` (the HTTP
API), `batches.py` (the Batch API: files and batches run in the background at low priority),
`server.py` (uvicorn),
`launch.py` (a server in a subprocess, for the demo and tests).

Importing this package is cheap: torch loads only when a server or engine is built.
"""

from kdforge.serve.launch import ServerHandle, launch

__all__ = ["launch", "ServerHandle"]
