"""Registry entries: one model each (``model_pool_registry.yaml``), validated key by key.

Every error names the entry's key and the value and says what was expected; the rules between
entries and the settings (unique ids and ports, known nodes and warmups) are ``check_registry``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from controlplane.core.eviction import PRIORITIES
from controlplane.core.schedule import ScheduleError, Window, parse_window
from controlplane.nodeconfig import LOCAL, check_labels, check_node_name
from controlplane.validate import (
    ConfigError,
    check_bool,
    check_number,
    check_port,
    check_str,
    check_str_list,
    check_url,
    validate_model_id,
)

if TYPE_CHECKING:
    from controlplane.settings import Settings

BACKENDS: Final = ("ollama", "llamacpp", "openai")
#: Backends that hold the model in the worker's own process: its RSS is the model's memory.
IN_PROCESS_BACKENDS: Final = frozenset({"llamacpp"})


@dataclass(frozen=True)
class ModelEntry:
    """One registered model."""

    model_id: str
    display_name: str = ""
    model_type: str = "general"
    warmup: bool = False
    ttl_minutes: float | None = None
    priority: str = "normal"
    tags: tuple[str, ...] = ()
    backend: str = "ollama"
    model_path: str = ""
    upstream_url: str = ""
    upstream_model: str = ""
    port: int | None = None
    memory_mb: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Pull the model into Ollama on its first load if Ollama does not have it.
    pull: bool = False
    #: Warmup windows, e.g. ``[{"days": "mon-fri", "start": "08:00", "end": "18:00"}]``.
    schedule: tuple[Mapping[str, Any], ...] = ()
    #: Nodes the model may be loaded on (empty: any).
    nodes: tuple[str, ...] = ()
    #: Labels a node must carry to take the model.
    labels: tuple[str, ...] = ()
    #: Workers serving it: (min, max) from ``replicas: {min, max}``; (1, 1) is one worker.
    replicas: tuple[int, int] = (1, 1)

    @property
    def min_replicas(self) -> int:
        return self.replicas[0]

    @property
    def max_replicas(self) -> int:
        return self.replicas[1]

    def windows(self) -> tuple[Window, ...]:
        return tuple(parse_window(f"schedule[{i}]", w) for i, w in enumerate(self.schedule))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        data["nodes"] = list(self.nodes)
        data["labels"] = list(self.labels)
        data["options"] = dict(self.options)
        data["schedule"] = [dict(w) for w in self.schedule]
        low, high = self.replicas
        data["replicas"] = {} if self.replicas == (1, 1) else {"min": low, "max": high}
        return {k: v for k, v in data.items() if v not in (None, "", [], {}) or k == "model_id"}


def _finite(key: str, value: Any) -> None:
    """Reject NaN and infinities anywhere in a JSON-like value (nothing can forward them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite(f"{key}.{k}", v)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _finite(f"{key}[{i}]", v)


def parse_entry(raw: Any, where: str = "model") -> ModelEntry:
    """Validate one registry entry; errors name ``where.key``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: {raw!r} is not a mapping")
    known = {f.name for f in fields(ModelEntry)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where}.{key}: unknown key (known keys: {', '.join(sorted(known))})"
            )
    if "model_id" not in raw:
        raise ConfigError(f"{where}.model_id: missing")

    def k(name: str) -> str:
        return f"{where}.{name}"

    model_id = validate_model_id(raw["model_id"], k("model_id"))
    values: dict[str, Any] = {"model_id": model_id}
    for name in ("display_name", "model_type", "model_path", "upstream_model"):
        if raw.get(name) is not None:
            values[name] = check_str(k(name), raw[name])
    for name in ("warmup", "pull"):
        if raw.get(name) is not None:
            values[name] = check_bool(k(name), raw[name])
    if raw.get("ttl_minutes") is not None:
        values["ttl_minutes"] = check_number(k("ttl_minutes"), raw["ttl_minutes"], minimum=0)
    if raw.get("priority") is not None:
        prio = check_str(k("priority"), raw["priority"])
        if prio not in PRIORITIES:
            raise ConfigError(f"{k('priority')}: {prio!r} is not one of {', '.join(PRIORITIES)}")
        values["priority"] = prio
    if raw.get("tags") is not None:
        values["tags"] = check_str_list(k("tags"), raw["tags"])
    if raw.get("nodes") is not None:
        names = check_str_list(k("nodes"), raw["nodes"])
        values["nodes"] = tuple(
            check_node_name(f"{k('nodes')}[{i}]", n) for i, n in enumerate(names)
        )
    if raw.get("labels") is not None:
        values["labels"] = check_labels(k("labels"), raw["labels"])
    backend = check_str(k("backend"), raw.get("backend", "ollama"))
    if backend not in BACKENDS:
        raise ConfigError(f"{k('backend')}: {backend!r} is not one of {', '.join(BACKENDS)}")
    values["backend"] = backend
    if raw.get("upstream_url") is not None:  # false, 0 and the like are errors, not "none"
        values["upstream_url"] = check_url(k("upstream_url"), raw["upstream_url"], empty_ok=True)
    if backend == "openai" and not values.get("upstream_url"):
        raise ConfigError(f"{k('upstream_url')}: required for backend openai")
    if backend == "llamacpp" and not values.get("model_path"):
        raise ConfigError(f"{k('model_path')}: required for backend llamacpp")
    if raw.get("port") is not None:
        values["port"] = check_port(k("port"), raw["port"])
    if raw.get("memory_mb") is not None:
        values["memory_mb"] = check_number(k("memory_mb"), raw["memory_mb"], minimum=0)
    if raw.get("options") is not None:
        opts = raw["options"]
        if not isinstance(opts, Mapping) or not all(isinstance(x, str) for x in opts):
            raise ConfigError(f"{k('options')}: {opts!r} is not a mapping of option names")
        _finite(k("options"), opts)
        try:
            json.dumps(opts, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{k('options')}: not plain JSON data ({exc})") from None
        values["options"] = dict(opts)
    if raw.get("schedule") is not None:
        windows = raw["schedule"]
        if not isinstance(windows, list):
            raise ConfigError(f"{k('schedule')}: {windows!r} is not a list of windows")
        try:
            for i, w in enumerate(windows):
                parse_window(f"{k('schedule')}[{i}]", w)
        except ScheduleError as exc:
            raise ConfigError(str(exc)) from None
        values["schedule"] = tuple(dict(w) for w in windows)
    if raw.get("replicas") is not None:
        values["replicas"] = check_replicas(k("replicas"), raw["replicas"])
    return ModelEntry(**values)


#: The most workers one model may have.
MAX_REPLICAS: Final = 32


def check_replicas(key: str, value: Any) -> tuple[int, int]:
    """``{min, max}``: 1 <= min <= max <= MAX_REPLICAS (either may be left out: 1)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: {value!r} is not a mapping like {{min: 1, max: 3}}")
    for name in value:
        if name not in ("min", "max"):
            raise ConfigError(f"{key}.{name}: unknown key (expected min, max)")
    low = check_number(f"{key}.min", value.get("min", 1), minimum=1, integer=True)
    high = check_number(f"{key}.max", value.get("max", max(1, low)), minimum=1, integer=True)
    if high > MAX_REPLICAS:
        raise ConfigError(f"{key}.max: {high} is more than {MAX_REPLICAS}")
    if low > high:
        raise ConfigError(f"{key}.min: {low} is above max {high}")
    return int(low), int(high)


def resolve_model_path(path: str) -> str:
    """A registry ``model_path``: absolute as given, else relative to the project directory."""
    if not path or os.path.isabs(path):
        return path
    return str(Path(__file__).resolve().parent.parent / path)


def parse_registry(raw: Any, settings: Settings) -> tuple[ModelEntry, ...]:
    """Validate a whole registry document (``{"models": [...]}``) against ``settings``."""
    if raw is None:
        raw = {"models": []}
    if not isinstance(raw, Mapping) or set(raw) - {"models"}:
        raise ConfigError("registry: expected a mapping with one key, models (a list)")
    models = raw.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"models: {models!r} is not a list")
    entries = tuple(parse_entry(m, f"models[{i}]") for i, m in enumerate(models))
    check_registry(entries, settings)
    return entries


def check_registry(entries: tuple[ModelEntry, ...], settings: Settings) -> None:
    """Cross-entry rules: unique ids, unique pinned ports inside the range, known warmups."""
    seen: set[str] = set()
    ports: dict[int, str] = {}
    pr = settings.port_range
    for i, e in enumerate(entries):
        if e.model_id in seen:
            raise ConfigError(f"models[{i}].model_id: {e.model_id!r} is registered twice")
        seen.add(e.model_id)
        if e.port is not None:
            if not pr.start <= e.port <= pr.end:
                raise ConfigError(
                    f"models[{i}].port: {e.port} is outside port_range {pr.start}-{pr.end}"
                )
            if e.port in ports:
                raise ConfigError(
                    f"models[{i}].port: {e.port} is already pinned by {ports[e.port]!r}"
                )
            ports[e.port] = e.model_id
    nodes = {n.name for n in settings.nodes} | ({LOCAL} if settings.local_node else set())
    for i, e in enumerate(entries):
        for j, name in enumerate(e.nodes):
            if name not in nodes:
                raise ConfigError(
                    f"models[{i}].nodes[{j}]: {name!r} is not a node (known: "
                    f"{', '.join(sorted(nodes))})"
                )
    for i, w in enumerate(settings.warmup_models):
        if w not in seen:
            raise ConfigError(f"warmup_models[{i}]: {w!r} is not in the registry")


def warmup_ids(entries: tuple[ModelEntry, ...], settings: Settings) -> tuple[str, ...]:
    """Warmup models in registry order: entries flagged ``warmup`` or listed in the config."""
    listed = set(settings.warmup_models)
    return tuple(e.model_id for e in entries if e.warmup or e.model_id in listed)
