"""What the ``modelpool`` commands share: their errors and exit codes, the directories and
settings they act on, and a small client of the control API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from controlplane.adapters.worker import local_session
from controlplane.app import (
    config_store,
    default_dirs,
)
from controlplane.configstore import ConfigStore
from controlplane.settings import ConfigError, Settings

EXIT_FAILED, EXIT_USAGE, EXIT_DOWN = 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(config dir, run dir), absolute: the options, else the environment, else the defaults
    (``run/`` and the run dir's ``config/``)."""
    config_dir, run_dir = default_dirs(Path(args.run_dir) if args.run_dir else None)
    if args.config_dir:
        config_dir = Path(args.config_dir)
    return config_dir.resolve(), run_dir.resolve()


def settings_of(config_dir: Path, store: ConfigStore | None = None) -> Settings:
    try:
        settings, _ = (store or config_store(config_dir)).load()
    except ConfigError as exc:
        raise CliError(f"invalid configuration: {exc}", EXIT_USAGE) from None
    return settings


class Api:
    """A small client of the control API."""

    def __init__(self, url: str, api_key: str = "") -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = local_session()

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        try:
            resp = self.session.request(
                method, self.url + path, json=body, headers=self.headers, timeout=timeout
            )
        except requests.ConnectionError:
            raise CliError(
                f"the control plane is not reachable at {self.url} (start it: modelpool up)",
                EXIT_DOWN,
            ) from None
        except requests.Timeout:
            raise CliError(f"{method} {path}: no answer within {timeout:g} s") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": {"message": resp.text.strip()}}
        if resp.status_code >= 400:
            msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise CliError(f"{msg or resp.reason} (HTTP {resp.status_code})")
        return data


def api_for(args: argparse.Namespace) -> Api:
    url = args.url or os.environ.get("MODELPOOL_URL")
    api_key = os.environ.get("MODELPOOL_API_KEY", "")
    if not url:
        settings = settings_of(dirs(args)[0])
        host = "127.0.0.1" if settings.bind_host in ("0.0.0.0", "") else settings.bind_host
        url = f"http://{host}:{settings.control_port}"
        api_key = api_key or settings.api_key
    return Api(url, api_key)


def mid(model_id: str) -> str:
    return quote(model_id, safe=":@+")


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
