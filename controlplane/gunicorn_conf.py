"""gunicorn settings of the control plane.

One worker process, because that process owns the pool state (a second one would run a second
pool). gunicorn's asyncio worker (``asgi``): the front door relays streams on the event loop, a
thousand at once without a thread each, and runs the Flask app in a pool of threads for the rest
(requests that wait for a model to load each hold one while mostly waiting); see
controlplane/asgi.py.
"""

from __future__ import annotations

from typing import Any

from model_service.asgi import prepare_worker

workers = 1
worker_class = "asgi"
# The Flask app's threads (created as needed) are controlplane.asgi's own: CONTROL_THREADS.
worker_connections = 4096
# The startup and shutdown of the pool are the hooks below, not ASGI lifespan events.
asgi_lifespan = "off"
timeout = 120
graceful_timeout = 10
# Idle keep-alive connections are kept longer than a client waits before it asks again (a
# Retry-After is mostly 1-5 s): with 5 s, a client that slept a 5 s Retry-After sent its retry on
# the connection just as gunicorn closed it (about one such retry in twenty failed). Idle
# connections are closed at once when the process stops (model_service.asgi).
keepalive = 65
# A shared default control-socket path would be removed by another gunicorn stopping.
control_socket_disable = True
# No --preload: threads do not survive the fork, and the pool must live in the worker.
preload_app = False
errorlog = "-"
loglevel = "info"


def _extensions(worker: Any) -> dict[str, Any]:
    app = getattr(worker, "asgi", None) or getattr(worker, "wsgi", None)
    return getattr(app, "extensions", None) or {}


def post_worker_init(worker: Any) -> None:
    """Start the pool (adoption, reaper thread, warmup) inside the worker process."""
    prepare_worker(worker)
    _extensions(worker)["modelpool"].start()


def worker_exit(server: Any, worker: Any) -> None:
    svc = _extensions(worker).get("modelpool")
    if svc is not None:
        svc.stop()
