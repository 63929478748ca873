"""The control plane's app factory: wiring only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml
from flask import Flask, Response, request

from controlplane import ui
from controlplane.adapters.proxy import WorkerProxy
from controlplane.adapters.rundir import RunDirLock
from controlplane.api import control, errors, jobs, leases, metrics, ollama, openai, ops
from controlplane.configstore import SHIPPED_CONFIG_DIR, ConfigStore
from controlplane.core.states import State
from controlplane.node import PROJECT_DIR
from controlplane.records import Record
from controlplane.service import PoolService
from model_service.auth import bearer_ok

RUN_DIR_ENV = "MODELPOOL_RUN_DIR"
CONFIG_DIR_ENV = "MODELPOOL_CONFIG_DIR"
DEFAULTS_DIR_ENV = "MODELPOOL_DEFAULTS_DIR"
EXT = "modelpool"
LOCK_EXT = "modelpool.run_dir_lock"
OPENAPI = Path(__file__).resolve().parent / "openapi.yaml"
#: How long a control plane waits for the run dir's lock while a predecessor of the same stack
#: still holds it (an orphaned worker of a killed gunicorn master drains first), and while
#: another process does (``modelpool up`` starting the stack holds it for a moment).
LOCK_WAIT_SAME_STACK = 30.0
LOCK_WAIT = 3.0


def default_dirs(run_dir: Path | None = None) -> tuple[Path, Path]:
    """(config dir, run dir): from the environment, else ``<run dir>/config`` and ``run/``.

    ``run_dir``, when given, is the run dir (and the default config dir is in it).
    """
    run_dir = run_dir or Path(os.environ.get(RUN_DIR_ENV) or PROJECT_DIR / "run")
    config_dir = Path(os.environ.get(CONFIG_DIR_ENV) or run_dir / "config")
    return config_dir, run_dir


def config_store(config_dir: Path) -> ConfigStore:
    """The live config in ``config_dir`` over the shipped defaults (``config/``, or the env's)."""
    defaults = Path(os.environ.get(DEFAULTS_DIR_ENV) or SHIPPED_CONFIG_DIR)
    return ConfigStore(config_dir, defaults)


def is_public(path: str, public: tuple[str, ...]) -> bool:
    """Whether ``path`` needs no API key: listed, or under a listed ``prefix/*``."""
    return any(path == p or (p.endswith("/*") and path.startswith(p[:-1])) for p in public)


def create_app(service: PoolService | None = None) -> Flask:
    """Build the control plane. The pool starts in gunicorn's ``post_worker_init``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    lock = None
    if service is None:
        config_dir, run_dir = default_dirs()
        store = config_store(config_dir)
        settings, _ = store.load()
        # Before anything touches the run dir: a second control plane on it would take this
        # one's workers for orphans and stop them. Raising here makes gunicorn give up.
        lock = RunDirLock.acquire(
            run_dir,
            config_dir,
            settings.control_port,
            wait=LOCK_WAIT,
            wait_same_stack=LOCK_WAIT_SAME_STACK,
        )
        store.seed()
        service = PoolService(store, run_dir)
    app = Flask("controlplane")
    if lock is not None:
        app.extensions[LOCK_EXT] = lock  # held for the life of the process
    # Chat requests carry whole conversations: the same limit as a worker's.
    app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXT] = service
    proxy = WorkerProxy()
    app.extensions[openai.PROXY_EXT] = proxy

    def drop_idle(rec: Record, old: State, new: State) -> None:
        # A worker that starts to drain (or died) needs no idle connection of ours.
        if new in (State.UNLOADING, State.FAILED) and rec.port is not None:
            proxy.forget(service.pool.address_of(rec.node), rec.port)

    service.pool.listeners.append(drop_idle)
    errors.register(app)

    @app.before_request
    def require_api_key() -> Response | None:
        settings = service.pool.settings
        if not settings.api_key or is_public(request.path, settings.public_paths):
            return None
        if bearer_ok(request.headers.get("Authorization"), settings.api_key):
            return None
        resp = errors.error_body(
            "missing or wrong API key: send Authorization: Bearer <api_key>",
            "invalid_request_error",
            "invalid_api_key",
            401,
        )
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    app.register_blueprint(ops.bp)
    app.register_blueprint(control.bp)
    app.register_blueprint(leases.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(ollama.bp)  # before ui: Ollama clients probe GET /
    app.register_blueprint(ui.bp)
    document = json.dumps(yaml.safe_load(OPENAPI.read_text(encoding="utf-8")))

    @app.get("/openapi.json")
    def openapi_document() -> Response:
        return Response(document, mimetype="application/json")

    metrics.install(app, service)
    return app
