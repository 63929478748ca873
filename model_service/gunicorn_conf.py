"""gunicorn settings of a model worker (one process per model; see the comments for why)."""

from __future__ import annotations

from typing import Any

from model_service.asgi import prepare_worker

# One process: the model lives in it once. gunicorn's asyncio worker (``asgi``): a pass-through
# backend's streams are relayed on the event loop, and the Flask app runs in a pool of threads
# (model_service/worker_asgi.py), so a blocking call such as llama.cpp's blocks one thread, not
# the loop (gevent would freeze on it).
workers = 1
worker_class = "asgi"
worker_connections = 4096
# Nothing to do at ASGI startup: the model loads in a thread the Flask app starts.
asgi_lifespan = "off"
# The event loop notifies gunicorn every second, streams or not: this only catches a hung loop.
timeout = 120
# Idle keep-alive connections are kept longer than a client waits before it asks again (a
# Retry-After is mostly 1-5 s): with 5 s, a client that slept a 5 s Retry-After sent its retry on
# the connection just as gunicorn closed it (about one such retry in twenty failed). Idle
# connections are closed at once when the process stops (model_service.asgi).
keepalive = 65
# gunicorn >= 25.1 opens a control socket at a shared default path: one worker stopping would
# remove another's. Not needed here.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = "info"


def post_worker_init(worker: Any) -> None:
    prepare_worker(worker)


def worker_exit(server: Any, worker: Any) -> None:
    """Release the model in the backend (Ollama: keep_alive 0) when the worker stops."""
    app = getattr(worker, "asgi", None) or getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("modelpool_worker") if app is not None else None
    if state is not None:
        # Stop signals are ignored by now (model_service.asgi.prepare_worker): a forced stop's
        # second signal cannot cut this unload short.
        try:
            state.backend.unload()
        except Exception as exc:  # best effort: the process is going away anyway
            server.log.warning("unloading the model failed: %s", exc)
