"""An OpenAI-compatible HTTP server with continuous batching (`fastllm serve`; needs the [serve] extra:
fastapi and uvicorn). create_app(llm, ...) builds the FastAPI app (app.py); the Engine (scheduler.py) runs
the model in one thread and batches every running request into each decode step."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from .app import create_app
from .scheduler import Engine, Rejected

__all__ = ["create_app", "Engine", "Rejected", "model_name", "running", "serve"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def model_name(path: str | None) -> str:
    """The id the API serves a model under: the bundled model's name, or the file / directory name."""
    if path is None:
        return DEFAULT_MODEL_NAME
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    return base[:-len(".gguf")] if base.endswith(".gguf") else base


def serve(path: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, device=None,
          api_key: str | None = None, log_level: str = "info", load_options: dict | None = None,
          **engine_options) -> None:
    """Load the model at `path` (None: the bundled SmolLM2-135M-Instruct) and serve it until interrupted;
    load_options go to LLM.load (act, kv_cache), engine_options to the Engine (max_seqs, max_queue, context_len,
    kv_cache_tokens, block_size)."""
    import uvicorn

    from ..llm import LLM

    app = create_app(LLM.load(path, device=device, **(load_options or {})), model_name=model_name(path),
                     api_key=api_key, **engine_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", timeout_s: float = 30.0):
    """Serve `app` with uvicorn in a background thread on a free port of `host` (tests, benchmarks,
    notebooks); yields the base URL and stops the server (and the app's engine) on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start within {timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
