"""gunicorn settings of the control plane.

One worker process, because that process owns the pool state (a second one would run a second
pool); gthread with many threads, because requests that wait for a model to load, and streams
proxied through the front door, each hold a thread while mostly waiting.
"""

from __future__ import annotations

from typing import Any

from controlplane.settings import CONTROL_THREADS

workers = 1
worker_class = "gthread"
threads = CONTROL_THREADS  # created as needed: a thousand streams are held at once
worker_connections = 2048
timeout = 120
graceful_timeout = 10
keepalive = 5
# A shared default control-socket path would be removed by another gunicorn stopping.
control_socket_disable = True
# No --preload: threads do not survive the fork, and the pool must live in the worker.
preload_app = False
errorlog = "-"
loglevel = "info"


def post_worker_init(worker: Any) -> None:
    """Start the pool (adoption, reaper thread, warmup) inside the worker process."""
    worker.wsgi.extensions["modelpool"].start()


def worker_exit(server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    if app is not None and "modelpool" in getattr(app, "extensions", {}):
        app.extensions["modelpool"].stop()
