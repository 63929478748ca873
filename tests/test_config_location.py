"""Where the live config lives: shipped defaults stay as shipped; a stack writes its own dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.app import CONFIG_DIR_ENV, RUN_DIR_ENV, default_dirs
from controlplane.configstore import ConfigStore
from controlplane.node import PROJECT_DIR
from controlplane.settings import parse_registry, parse_settings
from tests.ollama_standin import OllamaStandin
from tests.stack import ROOT, Stack

SHIPPED = ROOT / "config"


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """A copy of the repo's shipped config dir (the tracked one is never written by a test)."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "shipped"))


def _contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_reading_a_fresh_config_dir_writes_nothing_and_reads_the_defaults(
    shipped: Path, tmp_path: Path
) -> None:
    live = tmp_path / "run" / "config"
    settings, entries = ConfigStore(live, shipped).load()
    assert not live.exists()
    assert (settings, entries) == ConfigStore(shipped).load()


def test_running_the_stack_dirties_the_checkout_patch_and_register_write_the_live_dir(
    shipped: Path, tmp_path: Path
) -> None:
    """Deterministic: file operations only, no process and no clock."""
    before = _contents(shipped)
    store = ConfigStore(tmp_path / "live", shipped)
    assert store.seed() and not store.seed()  # first use only
    # The registry is copied as shipped (comments and all); the config holds no key yet.
    assert (store.config_dir / "model_pool_registry.yaml").read_bytes() == (
        shipped / "model_pool_registry.yaml"
    ).read_bytes()
    assert yaml.safe_load(store.config_path.read_text()) is None
    settings, entries = store.load()
    store.save_settings(parse_settings({"default_ttl_minutes": 7.5}, settings))
    extra = [{"model_id": "new:1b", "tags": ["x"]}]
    store.save_registry(entries + parse_registry({"models": extra}, settings))
    assert _contents(shipped) == before
    assert yaml.safe_load(store.config_path.read_text()) == {"default_ttl_minutes": 7.5}
    assert store.config_path.read_text().startswith("# ")
    registry = store.registry_path.read_text()
    shipped_header = (shipped / "model_pool_registry.yaml").read_text().split("models:")[0]
    assert registry.startswith(shipped_header.rstrip("\n") + "\n")
    s2, e2 = store.load()
    assert s2.default_ttl_minutes == 7.5 and [e.model_id for e in e2][-1] == "new:1b"
    # Back to the default: the key leaves the file.
    store.save_settings(parse_settings({"default_ttl_minutes": 15}, s2))
    assert yaml.safe_load(store.config_path.read_text()) is None
    # A mapping that differs is written whole.
    store.save_settings(parse_settings({"port_range": {"end": 8090}}, s2))
    assert yaml.safe_load(store.config_path.read_text())["port_range"] == {
        "start": 8051,
        "end": 8090,
    }


def test_a_config_dir_that_has_files_is_used_as_it_is(shipped: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    (live / "model_pool_config.yaml").write_text("max_concurrent_models: 2\n")
    store = ConfigStore(live, shipped)
    assert not store.seed()
    assert _contents(live) == {"model_pool_config.yaml": b"max_concurrent_models: 2\n"}
    settings, entries = store.load()
    assert settings.max_concurrent_models == 2 and entries == ()


def test_the_seeds_json_files_stay_readable_and_json(shipped: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    (live / "model_pool_config.json").write_text(json.dumps({"default_ttl_minutes": 20}))
    (live / "model_pool_registry.json").write_text(json.dumps({"models": [{"model_id": "a:1"}]}))
    store = ConfigStore(live, shipped)
    settings, entries = store.load()
    assert settings.default_ttl_minutes == 20 and entries[0].model_id == "a:1"
    store.save_settings(parse_settings({"max_concurrent_models": 3}, settings))
    assert json.loads((live / "model_pool_config.json").read_text()) == {
        "default_ttl_minutes": 20,
        "max_concurrent_models": 3,
    }


def test_default_config_dir_is_in_the_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    assert default_dirs() == (PROJECT_DIR / "run" / "config", PROJECT_DIR / "run")
    assert default_dirs(Path("/x/run")) == (Path("/x/run/config"), Path("/x/run"))
    monkeypatch.setenv(RUN_DIR_ENV, "/y/run")
    assert default_dirs() == (Path("/y/run/config"), Path("/y/run"))
    monkeypatch.setenv(CONFIG_DIR_ENV, "/y/conf")
    assert default_dirs(Path("/x/run")) == (Path("/y/conf"), Path("/x/run"))


# --- end to end --------------------------------------------------------------------------------


class ShippedStack(Stack):
    """A stack started without --config-dir: its config dir is the run dir's ``config/``,
    created from a "shipped" dir (this stack's test config, with a comment) that
    MODELPOOL_DEFAULTS_DIR names in place of the repo's ``config/``."""

    def __init__(self, models: list[dict[str, Any]], ollama_url: str) -> None:
        super().__init__(models, ollama_url=ollama_url)
        self.shipped_dir = self.root / "shipped"
        self.config_dir.rename(self.shipped_dir)
        registry = self.shipped_dir / "model_pool_registry.yaml"
        registry.write_text("# Shipped registry: this comment stays.\n" + registry.read_text())
        self.config_dir = self.run_dir / "config"

    def cli(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "controlplane.cli", "--run-dir", str(self.run_dir), *args]
        env = {**os.environ, "MODELPOOL_DEFAULTS_DIR": str(self.shipped_dir)}
        env.pop(CONFIG_DIR_ENV, None)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def shipped_stack(standin: OllamaStandin) -> Iterator[ShippedStack]:
    stack = ShippedStack([{"model_id": "qwen2.5-coder:7b"}], standin.url)
    yield from stack.running()


def test_stack_config_defaults_to_the_run_dir_seeded_from_the_shipped_dir(
    shipped_stack: ShippedStack,
) -> None:
    """Deterministic: each step waits for the control plane's answer before the files are read."""
    stack = shipped_stack
    before = _contents(stack.shipped_dir)
    live = stack.run_dir / "config"
    assert (live / "model_pool_registry.yaml").read_bytes() == before["model_pool_registry.yaml"]
    assert stack.get("/config").json()["control_port"] == stack.control_port
    r = stack.request("PATCH", "/config", json={"default_ttl_minutes": 7.5})
    assert r.status_code == 200, r.text
    r = stack.post("/models/register", {"model_id": "new:1b", "upstream_model": "tiny:1b"})
    assert r.status_code == 201, r.text
    assert _contents(stack.shipped_dir) == before
    assert yaml.safe_load((live / "model_pool_config.yaml").read_text()) == {
        "default_ttl_minutes": 7.5
    }
    registry = (live / "model_pool_registry.yaml").read_text()
    assert registry.startswith("# Shipped registry: this comment stays.\n")
    assert [m["model_id"] for m in yaml.safe_load(registry)["models"]] == [
        "qwen2.5-coder:7b",
        "new:1b",
    ]
    # The CLI finds the live config from the run dir alone.
    out = stack.cli("config", "get", "default_ttl_minutes", check=True).stdout
    assert out.strip() == "7.5"
