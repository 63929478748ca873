"""The ``nodes:`` config key: the hosts whose supervisord runs model workers.

Each node is a stock supervisord with an authenticated ``[inet_http_server]`` and the
``supervisor_twiddler`` RPC interface (``modelpool node up`` starts one). The stack's own
supervisord is the node named ``local``: it takes the global ``port_range``,
``memory_limit_mb``, ``max_concurrent_models`` and ``ollama_base_url`` (and ``local_node: false``
keeps models off it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from controlplane.validate import (
    ConfigError,
    PortRange,
    check_host,
    check_number,
    check_port_range,
    check_str,
    check_str_list,
    check_url,
)

LOCAL: Final = "local"
#: The username of every node's XML-RPC server (``modelpool node up`` sets it).
NODE_USER: Final = "modelpool"
NODE_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LABEL_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class NodeConfig:
    """One ``nodes:`` entry."""

    name: str
    url: str
    password_file: str
    address: str
    port_range: PortRange = field(default_factory=PortRange)
    memory_limit_mb: float = 32000.0
    max_concurrent_models: int = 5
    ollama_base_url: str = "http://localhost:11434"
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "password_file": self.password_file,
            "address": self.address,
            "port_range": {"start": self.port_range.start, "end": self.port_range.end},
            "memory_limit_mb": self.memory_limit_mb,
            "max_concurrent_models": self.max_concurrent_models,
            "ollama_base_url": self.ollama_base_url,
            "labels": list(self.labels),
        }


REQUIRED: Final = ("name", "url", "password_file")
KNOWN: Final = (*REQUIRED, *(k for k in NodeConfig.__dataclass_fields__ if k not in REQUIRED))


def check_node_name(key: str, value: Any) -> str:
    name = check_str(key, value)
    if not NODE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} is not a node name (lower-case letters, digits, - and _, "
            "starting with a letter or digit, at most 63)"
        )
    return name


def check_labels(key: str, value: Any) -> tuple[str, ...]:
    labels = check_str_list(key, value)
    for i, label in enumerate(labels):
        if not LABEL_RE.fullmatch(label):
            raise ConfigError(f"{key}[{i}]: {label!r} is not a label (letters, digits, . _ -)")
    return labels


def _split(key: str, url: str) -> SplitResult:
    """``url`` split, with a host and a numeric port if any (ConfigError otherwise)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{key}: {url!r} is not a URL ({exc})") from None
    if not parts.hostname:
        raise ConfigError(f"{key}: {url!r} has no host")
    return parts


def parse_node(raw: Any, key: str) -> NodeConfig:
    """One ``nodes:`` entry; errors name ``key.field``."""
    if isinstance(raw, NodeConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: {raw!r} is not a mapping (expected {', '.join(REQUIRED)}, ...)")
    for k in raw:
        if k not in KNOWN:
            raise ConfigError(f"{key}.{k}: unknown key (known keys: {', '.join(KNOWN)})")
    for k in REQUIRED:
        if k not in raw:
            raise ConfigError(f"{key}.{k}: missing")
    name = check_node_name(f"{key}.name", raw["name"])
    if name == LOCAL:
        raise ConfigError(
            f"{key}.name: {LOCAL!r} is the stack's own supervisord (its limits are the global "
            "settings); give a remote node another name"
        )
    url = check_url(f"{key}.url", raw["url"])
    parts = _split(f"{key}.url", url)
    if parts.scheme != "http":
        raise ConfigError(
            f"{key}.url: {url!r}: supervisord's XML-RPC server speaks plain http (keep nodes on "
            "a private network, or reach them through a tunnel)"
        )
    if parts.username or parts.password or parts.path not in ("", "/RPC2"):
        raise ConfigError(
            f"{key}.url: {url!r}: expected http://HOST:PORT (the password is read from "
            "password_file, never from the URL)"
        )
    password_file = check_str(f"{key}.password_file", raw["password_file"])
    if not password_file.startswith("/"):
        raise ConfigError(f"{key}.password_file: {password_file!r} is not an absolute path")
    address = check_host(f"{key}.address", raw.get("address", parts.hostname or ""))
    if address in ("0.0.0.0", "::"):
        raise ConfigError(
            f"{key}.address: {address!r} is not an address clients can reach; give the "
            "node's own address"
        )
    values: dict[str, Any] = {}
    if "port_range" in raw:
        values["port_range"] = check_port_range(f"{key}.port_range", raw["port_range"])
    if "memory_limit_mb" in raw:
        values["memory_limit_mb"] = check_number(
            f"{key}.memory_limit_mb", raw["memory_limit_mb"], minimum=0
        )
    if "max_concurrent_models" in raw:
        values["max_concurrent_models"] = check_number(
            f"{key}.max_concurrent_models", raw["max_concurrent_models"], minimum=1, integer=True
        )
    if "ollama_base_url" in raw:
        values["ollama_base_url"] = check_url(f"{key}.ollama_base_url", raw["ollama_base_url"])
        _split(f"{key}.ollama_base_url", values["ollama_base_url"])
    if "labels" in raw:
        values["labels"] = check_labels(f"{key}.labels", raw["labels"])
    return NodeConfig(
        name=name,
        url=url.removesuffix("/RPC2"),
        password_file=password_file,
        address=address,
        **values,
    )


def parse_nodes(key: str, value: Any) -> tuple[NodeConfig, ...]:
    """The whole ``nodes:`` list: valid entries with unique names and URLs."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: {value!r} is not a list of nodes")
    nodes = tuple(parse_node(v, f"{key}[{i}]") for i, v in enumerate(value))
    seen: dict[str, int] = {}
    urls: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.name in seen:
            raise ConfigError(f"{key}[{i}].name: {n.name!r} is already node {seen[n.name]}")
        if n.url in urls:
            raise ConfigError(f"{key}[{i}].url: {n.url!r} is already node {urls[n.url]}")
        seen[n.name], urls[n.url] = i, i
    return nodes
