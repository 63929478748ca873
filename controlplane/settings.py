"""Settings: each key declared once with its default, validator and doc (registry entries are
``controlplane.entries``, re-exported here).

Config is read from ``model_pool_config.yaml`` (or the seed's ``model_pool_config.json``) and the
registry from ``model_pool_registry.yaml`` (or ``.json``) in the config directory. Every error
names the key and the value and says what was expected; nothing is clamped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from controlplane.core.eviction import ORDERS
from controlplane.core.placement import STRATEGIES
from controlplane.entries import (  # the registry's entries: re-exported for their users
    BACKENDS as BACKENDS,
)
from controlplane.entries import (
    IN_PROCESS_BACKENDS as IN_PROCESS_BACKENDS,
)
from controlplane.entries import (
    MAX_REPLICAS as MAX_REPLICAS,
)
from controlplane.entries import (
    ModelEntry as ModelEntry,
)
from controlplane.entries import (
    check_registry as check_registry,
)
from controlplane.entries import (
    check_replicas as check_replicas,
)
from controlplane.entries import (
    parse_entry as parse_entry,
)
from controlplane.entries import (
    parse_registry as parse_registry,
)
from controlplane.entries import (
    resolve_model_path as resolve_model_path,
)
from controlplane.entries import (
    warmup_ids as warmup_ids,
)
from controlplane.nodeconfig import NodeConfig, parse_nodes
from controlplane.validate import (
    ConfigError as ConfigError,
)
from controlplane.validate import (
    PortRange as PortRange,
)
from controlplane.validate import (
    check_api_key,
    check_bool,
    check_choice,
    check_host,
    check_int,
    check_number,
    check_paths,
    check_port,
    check_port_range,
    check_range,
    check_str_list,
    check_url,
)

CONFIG_BASENAME: Final = "model_pool_config"
REGISTRY_BASENAME: Final = "model_pool_registry"
#: Threads of the control plane's Flask app (controlplane/asgi.py): load waiters, the requests
#: Flask relays and the API share them (streams relayed on the event loop hold none). Load
#: waiters may take all but ``RESERVED_THREADS``, so the control API always answers.
CONTROL_THREADS: Final = 1536
RESERVED_THREADS: Final = 64
MAX_WAITING_TOTAL: Final = CONTROL_THREADS - RESERVED_THREADS


# --- settings ---------------------------------------------------------------------------------


REGISTRY_PATH_NAMES: Final = ("register", "heartbeat", "deregister")


def _registry_paths(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: {value!r} is not a mapping of {', '.join(REGISTRY_PATH_NAMES)}")
    paths = {"register": "/register", "heartbeat": "/heartbeat", "deregister": "/deregister"}
    for name, path in value.items():
        if name not in REGISTRY_PATH_NAMES:
            raise ConfigError(
                f"{key}.{name}: unknown key (expected {', '.join(REGISTRY_PATH_NAMES)})"
            )
        if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() for c in path):
            raise ConfigError(f"{key}.{name}: {path!r} is not a URL path starting with /")
        paths[name] = path
    return paths


@dataclass(frozen=True)
class Setting:
    """One configuration key: its validator and what it means (defaults live on Settings)."""

    name: str
    check: Callable[[str, Any], Any]
    doc: str
    #: Takes effect only when the stack restarts (reported by PATCH /config).
    restart: bool = False


YEAR_MINUTES: Final = 525600.0
DAY_SECONDS: Final = 86400.0


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "default_ttl_minutes",
        check_range(0, YEAR_MINUTES),
        "TTL of models whose entry sets none; 0 = never",
    ),
    Setting("min_ttl_minutes", check_range(0, YEAR_MINUTES), "lower bound of a model's TTL"),
    Setting(
        "max_ttl_minutes", check_range(0, YEAR_MINUTES), "upper bound of a TTL and of extend-ttl"
    ),
    Setting(
        "grace_period_minutes", check_range(0, YEAR_MINUTES), "COOLING time after the deadline"
    ),
    Setting(
        "check_interval_seconds", check_range(0.01, DAY_SECONDS), "longest sleep of the reaper"
    ),
    Setting("warmup_models", check_str_list, "model ids loaded at start and never expired"),
    Setting("port_range", check_port_range, "worker ports {start, end}"),
    Setting("max_concurrent_models", check_int(1), "most models loaded at once"),
    Setting("memory_limit_mb", check_range(0, 1e9), "most memory in use by models; 0 = no limit"),
    Setting("auto_unload", check_bool, "unload models whose TTL and grace period passed"),
    Setting(
        "graceful_shutdown_seconds", check_range(0, DAY_SECONDS), "drain time of in-flight requests"
    ),
    Setting(
        "load_timeout_seconds", check_range(1, DAY_SECONDS), "WARMING longer than this is FAILED"
    ),
    Setting(
        "max_queue_per_model",
        lambda k, v: check_number(k, v, minimum=1, integer=True),
        f"requests that may wait for one model's load; more get 503 at once (all models: "
        f"at most {MAX_WAITING_TOTAL})",
    ),
    Setting(
        "default_memory_mb",
        check_range(0, 1e9),
        "memory estimate of a model whose entry gives no memory_mb (and no GGUF file to size)",
    ),
    Setting("ollama_base_url", check_url, "Ollama's HTTP API"),
    Setting("control_port", check_port, "control plane port", restart=True),
    Setting("bind_host", check_host, "address the control plane and workers bind", True),
    Setting(
        "service_registry_url",
        lambda k, v: check_url(k, v, empty_ok=True),
        "PAS service registry; empty turns it off",
        restart=True,
    ),
    Setting(
        "service_registry_paths",
        _registry_paths,
        "registry paths: register, heartbeat, deregister",
        restart=True,
    ),
    Setting(
        "service_registry_heartbeat_seconds",
        check_range(0.05, DAY_SECONDS),
        "heartbeat interval while HOT",
        restart=True,
    ),
    Setting("api_key", check_api_key, "bearer token required by the API; empty = no auth"),
    Setting(
        "min_resident_seconds",
        check_range(0, DAY_SECONDS),
        "a model loaded this recently is not evicted for another load (at most)",
    ),
    Setting(
        "resident_load_multiple",
        check_range(0, 1000),
        "residency is this many times a model's load time (capped by min_resident_seconds); "
        "0 = min_resident_seconds for every model",
    ),
    Setting(
        "min_idle_seconds",
        check_range(0, 3600),
        "a model that began or ended a request this recently is not evicted for another load "
        "(the next request of a burst is on its way)",
    ),
    Setting(
        "eviction_order",
        check_choice(ORDERS),
        "cost (priority, then reload cost) or lru (plain LRU, for comparison)",
    ),
    Setting(
        "capacity_wait_seconds",
        check_range(0, DAY_SECONDS),
        "a load that finds no room waits this long, in order, before 503",
    ),
    Setting("nodes", parse_nodes, "remote nodes (supervisord hosts) for workers", restart=True),
    Setting("local_node", check_bool, "load models on the stack's own supervisord too"),
    Setting(
        "node_timeout_seconds", check_range(1, DAY_SECONDS), "unreachable this long: node DOWN"
    ),
    Setting("placement", check_choice(STRATEGIES), "spread (most free memory) or pack"),
    Setting(
        "scale_up_in_flight",
        check_range(0.1, 1e6),
        "requests in flight per serving replica that count as busy (replicas.max > 1)",
    ),
    Setting(
        "scale_up_seconds",
        check_range(0.1, DAY_SECONDS),
        "busy this long adds a replica; also the least time between two scale changes",
    ),
    Setting(
        "scale_down_idle_minutes",
        check_range(0, YEAR_MINUTES),
        "a replica beyond replicas.min idle this long is drained and unloaded",
    ),
    Setting(
        "public_paths", check_paths, "paths that need no api_key; a trailing * matches a prefix"
    ),
)
SETTINGS_BY_NAME: Final = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """Validated pool settings (see SETTINGS for each key)."""

    default_ttl_minutes: float = 15.0
    min_ttl_minutes: float = 5.0
    max_ttl_minutes: float = 60.0
    grace_period_minutes: float = 2.0
    check_interval_seconds: float = 30.0
    warmup_models: tuple[str, ...] = ()
    port_range: PortRange = field(default_factory=PortRange)
    max_concurrent_models: int = 5
    memory_limit_mb: float = 32000.0
    auto_unload: bool = True
    graceful_shutdown_seconds: float = 30.0
    load_timeout_seconds: float = 300.0
    max_queue_per_model: int = 256
    default_memory_mb: float = 1024.0
    ollama_base_url: str = "http://localhost:11434"
    control_port: int = 8050
    bind_host: str = "127.0.0.1"
    service_registry_url: str = "http://localhost:6121"
    service_registry_paths: Mapping[str, str] = field(
        default_factory=lambda: {
            "register": "/register",
            "heartbeat": "/heartbeat",
            "deregister": "/deregister",
        }
    )
    service_registry_heartbeat_seconds: float = 30.0
    api_key: str = ""
    min_resident_seconds: float = 30.0
    resident_load_multiple: float = 0.5
    min_idle_seconds: float = 1.0
    eviction_order: str = "cost"
    capacity_wait_seconds: float = 30.0
    nodes: tuple[NodeConfig, ...] = ()
    local_node: bool = True
    node_timeout_seconds: float = 10.0
    placement: str = "spread"
    scale_up_in_flight: float = 4.0
    scale_up_seconds: float = 5.0
    scale_down_idle_minutes: float = 2.0
    public_paths: tuple[str, ...] = (
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/sd/workers",
        "/openapi.json",
        "/",
        "/ui",
        "/ui/*",
    )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["warmup_models"] = list(self.warmup_models)
        data["public_paths"] = list(self.public_paths)
        data["service_registry_paths"] = dict(self.service_registry_paths)
        data["nodes"] = [n.to_dict() for n in self.nodes]
        return data

    def public_dict(self) -> dict[str, Any]:
        """As ``to_dict`` but with the API key hidden."""
        data = self.to_dict()
        if data["api_key"]:
            data["api_key"] = "***"
        return data


def parse_settings(raw: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Validate ``raw`` (a partial or whole config) on top of ``base``; raise ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: {raw!r} is not a mapping of keys to values")
    for key in raw:
        if key not in SETTINGS_BY_NAME:
            raise ConfigError(
                f"{key}: unknown key (known keys: {', '.join(sorted(SETTINGS_BY_NAME))})"
            )
    base = base or Settings()
    merged = dict(raw)
    if isinstance(raw.get("port_range"), Mapping):
        pr = base.port_range
        merged["port_range"] = {"start": pr.start, "end": pr.end, **raw["port_range"]}
    if isinstance(raw.get("service_registry_paths"), Mapping):
        merged["service_registry_paths"] = {
            **base.service_registry_paths,
            **raw["service_registry_paths"],
        }
    values = {k: SETTINGS_BY_NAME[k].check(k, v) for k, v in merged.items()}
    settings = replace(base, **values)
    _check_settings(settings)
    return settings


def _check_settings(s: Settings) -> None:
    if not s.local_node and not s.nodes:
        raise ConfigError("local_node: false needs at least one entry in nodes")
    if s.max_ttl_minutes < s.min_ttl_minutes:
        raise ConfigError(
            f"max_ttl_minutes: {s.max_ttl_minutes} is below min_ttl_minutes {s.min_ttl_minutes}"
        )
    if s.port_range.start <= s.control_port <= s.port_range.end:
        raise ConfigError(
            f"control_port: {s.control_port} is inside port_range "
            f"{s.port_range.start}-{s.port_range.end}"
        )
