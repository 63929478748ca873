"""gunicorn settings of a model worker (one process per model; see the comments for why)."""

from __future__ import annotations

from typing import Any

# One process: the model lives in it once. gthread holds many slow streams at once (each
# stream is a thread mostly waiting on the backend); sync would serialise them and gevent
# freezes on a blocking C call such as llama.cpp's.
workers = 1
worker_class = "gthread"
# Enough threads that a thousand concurrent streams are held at once rather than queued; the
# pool creates them only as they are needed.
threads = 1100
worker_connections = 2048
# gthread's heartbeat keeps running while a long stream is served, so this only catches hangs.
timeout = 120
keepalive = 5
# gunicorn >= 25.1 opens a control socket at a shared default path: one worker stopping would
# remove another's. Not needed here.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = "info"


def worker_exit(server: Any, worker: Any) -> None:
    """Release the model in the backend (Ollama: keep_alive 0) when the worker stops."""
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("modelpool_worker") if app is not None else None
    if state is not None:
        try:
            state.backend.unload()
        except Exception as exc:  # best effort: the process is going away anyway
            server.log.warning("unloading the model failed: %s", exc)
