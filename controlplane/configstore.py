"""The config files: where the live settings and registry are read from and saved to (atomically,
with the shipped comments kept), and the defaults a new config dir is created from."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from controlplane.settings import (
    CONFIG_BASENAME,
    REGISTRY_BASENAME,
    ModelEntry,
    Settings,
    parse_registry,
    parse_settings,
)
from controlplane.validate import (
    ConfigError as ConfigError,
)
from controlplane.validate import (
    PortRange as PortRange,
)

# --- files ------------------------------------------------------------------------------------

#: The defaults the repo ships; a stack's live config dir is created from them on first use.
SHIPPED_CONFIG_DIR: Final = Path(__file__).resolve().parent.parent / "config"


def _find(config_dir: Path, basename: str) -> Path:
    for ext in (".yaml", ".yml", ".json"):
        path = config_dir / f"{basename}{ext}"
        if path.exists():
            return path
    return config_dir / f"{basename}.yaml"


def _read(path: Path) -> Any:
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """``value`` as JSON and safe YAML can hold it: tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _header(path: Path) -> str:
    """The comment lines that open ``path`` (with the blank lines among them), if any."""
    if not path.exists() or path.suffix == ".json":
        return ""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    text = "".join(lines)
    return text.rstrip("\n") + "\n" if text.strip() else ""


def _dump(path: Path, data: Any, header: str = "") -> str:
    """``data`` in the file's format; a YAML file starts with ``header`` (comment lines)."""
    if path.suffix == ".json":
        return json.dumps(_plain(data), indent=2) + "\n"
    if not data:
        return header
    return header + yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=False)


@dataclass(frozen=True)
class ConfigStore:
    """Where settings and registry live on disk, and how they are read and written.

    ``config_dir`` holds the live files. ``defaults_dir`` (the shipped ``config/``) holds the
    defaults: a key the live config file does not set takes its value from the defaults' config
    file, else the built-in default, and saving writes only the keys that differ from those. A
    config dir with neither file is created from the defaults on first use (``seed``): the
    registry copied as it is, the config file with a header comment and no key. A config dir
    that has either file is used as it is.
    """

    config_dir: Path
    defaults_dir: Path | None = None

    @property
    def config_path(self) -> Path:
        return _find(self.config_dir, CONFIG_BASENAME)

    @property
    def registry_path(self) -> Path:
        return _find(self.config_dir, REGISTRY_BASENAME)

    @property
    def _shipped(self) -> Path | None:
        """The defaults dir, unless it is the config dir itself (then the built-ins are it)."""
        if self.defaults_dir is None or self.defaults_dir.resolve() == self.config_dir.resolve():
            return None
        return self.defaults_dir

    def fresh(self) -> bool:
        """Whether the config dir has neither file yet (it is then read from the defaults)."""
        return not self.config_path.exists() and not self.registry_path.exists()

    def defaults(self) -> Settings:
        """The settings of every key the live config file does not set."""
        if self._shipped is None:
            return Settings()
        path = _find(self._shipped, CONFIG_BASENAME)
        try:
            return parse_settings(_read(path) or {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def load(self) -> tuple[Settings, tuple[ModelEntry, ...]]:
        """Read and validate both files; ConfigError names the file and key. Writes nothing."""
        base = self.defaults()
        path = self.config_path
        try:
            settings = parse_settings(_read(path) or {}, base)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        path = self.registry_path
        if self._shipped is not None and self.fresh():
            path = _find(self._shipped, REGISTRY_BASENAME)
        try:
            entries = parse_registry(_read(path), settings)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return settings, entries

    def seed(self) -> bool:
        """Create a fresh config dir from the defaults; return whether it did."""
        if self._shipped is None or not self.fresh():
            return False
        registry = _find(self._shipped, REGISTRY_BASENAME)
        if registry.exists():
            atomic_write(self.config_dir / registry.name, registry.read_text(encoding="utf-8"))
        path = self.config_dir / f"{CONFIG_BASENAME}.yaml"
        atomic_write(path, self._config_header())
        return True

    def _config_header(self) -> str:
        shipped = self._shipped
        where = f"{_find(shipped, CONFIG_BASENAME)}, then " if shipped is not None else ""
        return (
            "# modelpool settings of this stack: only the keys that differ from the defaults,\n"
            f"# which are {where}the built-in ones.\n"
            "# PATCH /config rewrites this file (keeping these opening comments).\n"
        )

    def save_settings(self, settings: Settings) -> None:
        """Write the keys of ``settings`` that differ from the defaults (a mapping whole)."""
        defaults = self.defaults().to_dict()
        data = {k: v for k, v in settings.to_dict().items() if _plain(v) != _plain(defaults[k])}
        path = self.config_path
        atomic_write(path, _dump(path, data, _header(path) or self._config_header()))

    def save_registry(self, entries: tuple[ModelEntry, ...]) -> None:
        """Write the whole registry, keeping the file's opening comments."""
        path = self.registry_path
        data = {"models": [e.to_dict() for e in entries]}
        atomic_write(path, _dump(path, data, _header(path)))
