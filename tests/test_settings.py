from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from controlplane.configstore import ConfigStore
from controlplane.settings import (
    SETTINGS,
    ConfigError,
    Settings,
    parse_entry,
    parse_registry,
    parse_settings,
)
from controlplane.validate import validate_model_id


def test_every_setting_is_declared_once() -> None:
    assert [s.name for s in SETTINGS] == [f.name for f in fields(Settings)]


def test_defaults_are_the_seeds() -> None:
    s = parse_settings({})
    assert (s.default_ttl_minutes, s.min_ttl_minutes, s.max_ttl_minutes) == (15, 5, 60)
    assert s.grace_period_minutes == 2 and s.check_interval_seconds == 30
    assert (s.port_range.start, s.port_range.end) == (8051, 8099)
    assert s.max_concurrent_models == 5 and s.memory_limit_mb == 32000
    assert s.control_port == 8050 and s.bind_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"nope": 1}, "nope: unknown key"),
        ({"default_ttl_minutes": "ten"}, "default_ttl_minutes: 'ten' is not a number"),
        ({"min_ttl_minutes": -1}, "min_ttl_minutes: -1 is below the minimum 0"),
        (
            {"max_ttl_minutes": 1, "min_ttl_minutes": 2},
            "max_ttl_minutes: 1.0 is below min_ttl_minutes 2.0",
        ),
        (
            {"port_range": {"start": 8051, "end": 8040}},
            "port_range.end: 8040 is below port_range.start 8051",
        ),
        ({"port_range": {"start": 8051, "stop": 9}}, "port_range.stop: unknown key"),
        ({"port_range": {"start": 70000}}, "port_range.start: 70000 is not a TCP port"),
        ({"max_concurrent_models": 0}, "max_concurrent_models: 0 is below the minimum 1"),
        ({"max_concurrent_models": 2.5}, "max_concurrent_models: 2.5 is not an integer"),
        ({"auto_unload": "yes"}, "auto_unload: 'yes' is not a boolean"),
        (
            {"ollama_base_url": "localhost:11434"},
            "ollama_base_url: 'localhost:11434' is not an http",
        ),
        ({"control_port": 8060}, "control_port: 8060 is inside port_range 8051-8099"),
        ({"warmup_models": "qwen"}, "warmup_models: 'qwen' is not a list"),
        ({"check_interval_seconds": True}, "check_interval_seconds: True is not a number"),
        ({"max_ttl_minutes": 1e308}, "max_ttl_minutes: 1e+308 is above the maximum 525600"),
        ({"api_key": "a\nb"}, "api_key: may hold only letters, digits"),
        ({"api_key": " k "}, "api_key: may hold only letters, digits"),
        ({"bind_host": ""}, "bind_host: '' is not an IP address or host name"),
        ({"public_paths": ["health"]}, "public_paths[0]: 'health' is not a URL path"),
        ({"service_registry_paths": {"register": "x"}}, "service_registry_paths.register: 'x'"),
    ],
)
def test_bad_settings_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert message in str(info.value)


def test_a_partial_mapping_keeps_the_rest_of_the_current_value() -> None:
    base = parse_settings({"port_range": {"start": 9000, "end": 9010}})
    assert parse_settings({"port_range": {"end": 9020}}, base).port_range.start == 9000
    paths = parse_settings({"service_registry_paths": {"heartbeat": "/hb"}})
    assert dict(paths.service_registry_paths) == {
        "register": "/register",
        "heartbeat": "/hb",
        "deregister": "/deregister",
    }


def test_minutes_are_floats() -> None:
    s = parse_settings({"default_ttl_minutes": 0.05, "min_ttl_minutes": 0.01})
    assert s.default_ttl_minutes == 0.05


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x" * 201,
        "a\nb",
        "%(here)s",
        "x]",
        "../etc",
        "a/../b",
        " lead",
        "a b",
        "x/health",
        "org/m/load",
    ],
)
def test_bad_model_ids(bad: str) -> None:
    with pytest.raises(ConfigError, match="model_id"):
        validate_model_id(bad)


@pytest.mark.parametrize("good", ["qwen2.5-coder:7b", "library/llama3.1:8b", "a", "org/m@v1+x"])
def test_good_model_ids(good: str) -> None:
    assert validate_model_id(good) == good


def test_entry_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.backend: 'tgi' is not one of"):
        parse_registry({"models": [{"model_id": "m", "backend": "tgi"}]}, Settings())
    with pytest.raises(ConfigError, match=r"model\.upstream_url: required for backend openai"):
        parse_entry({"model_id": "m", "backend": "openai"})
    with pytest.raises(ConfigError, match=r"model\.colour: unknown key"):
        parse_entry({"model_id": "m", "colour": "red"})
    with pytest.raises(ConfigError, match=r"model\.ttl_minutes: -1 is below"):
        parse_entry({"model_id": "m", "ttl_minutes": -1})
    with pytest.raises(ConfigError, match=r"model\.options\.temperature: nan is not a finite"):
        parse_entry({"model_id": "m", "options": {"temperature": float("nan")}})
    with pytest.raises(ConfigError, match=r"model\.pull: 'yes' is not"):
        parse_entry({"model_id": "m", "pull": "yes"})
    assert parse_entry({"model_id": "m", "pull": True}).pull is True


def test_registry_cross_checks() -> None:
    with pytest.raises(ConfigError, match="registered twice"):
        parse_registry({"models": [{"model_id": "a"}, {"model_id": "a"}]}, Settings())
    with pytest.raises(ConfigError, match=r"models\[0\]\.port: 9000 is outside port_range"):
        parse_registry({"models": [{"model_id": "a", "port": 9000}]}, Settings())
    with pytest.raises(ConfigError, match="already pinned by 'a'"):
        parse_registry(
            {"models": [{"model_id": "a", "port": 8060}, {"model_id": "b", "port": 8060}]},
            Settings(),
        )
    with pytest.raises(ConfigError, match=r"warmup_models\[0\]: 'ghost' is not in the registry"):
        parse_registry({"models": []}, parse_settings({"warmup_models": ["ghost"]}))


def test_seed_json_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "model_pool_config.json").write_text(
        json.dumps(
            {
                "default_ttl_minutes": 15,
                "warmup_models": ["qwen2.5-coder:7b"],
                "port_range": {"start": 8051, "end": 8099},
                "auto_unload": True,
            }
        )
    )
    (tmp_path / "model_pool_registry.json").write_text(
        json.dumps(
            {
                "models": [
                    {
                        "model_id": "qwen2.5-coder:7b",
                        "display_name": "Qwen",
                        "model_type": "code",
                        "warmup": True,
                        "ttl_minutes": 0,
                        "priority": "high",
                        "tags": ["code"],
                    }
                ]
            }
        )
    )
    settings, entries = ConfigStore(tmp_path).load()
    assert settings.warmup_models == ("qwen2.5-coder:7b",)
    assert entries[0].tags == ("code",) and entries[0].ttl_minutes == 0


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "model_pool_config.yaml").write_text("max_concurrent_models: -3\n")
    with pytest.raises(ConfigError) as info:
        ConfigStore(tmp_path).load()
    assert "model_pool_config.yaml" in str(info.value)
    assert "max_concurrent_models: -3" in str(info.value)
    (tmp_path / "model_pool_config.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ConfigStore(tmp_path).load()


def test_save_round_trip(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    s = parse_settings({"default_ttl_minutes": 7.5, "port_range": {"start": 9000, "end": 9010}})
    store.save_settings(s)
    entries = parse_registry({"models": [{"model_id": "m:1", "tags": ["x"], "port": 9001}]}, s)
    store.save_registry(entries)
    s2, e2 = store.load()
    assert s2 == s and e2 == entries


def test_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    settings, entries = ConfigStore(root / "config").load()
    assert settings.control_port == 8050
    assert {"qwen2.5-coder:7b", "llama3.1:8b"} <= {e.model_id for e in entries}


def test_options_must_be_plain_json() -> None:
    """Options travel to the worker as JSON and are fingerprinted: a YAML date is refused."""
    import datetime

    with pytest.raises(ConfigError, match=r"model\.options: not plain JSON"):
        parse_entry({"model_id": "m", "options": {"since": datetime.date(2026, 1, 1)}})


@pytest.mark.parametrize("key", ["=", "==", "abc\n", "a b"])
def test_api_keys_no_header_can_carry_are_refused(key: str) -> None:
    """Regression: a trailing newline passed the bearer-token check (and the document let "="
    alone through, which the server refuses)."""
    with pytest.raises(ConfigError, match="api_key"):
        parse_settings({"api_key": key})


def test_a_model_id_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match="model_id"):
        parse_entry({"model_id": "tiny:1b\n"})


def test_the_id_register_is_reserved() -> None:
    """/models/register is a route: a model of that id could be registered but not reached."""
    with pytest.raises(ConfigError, match="reserved"):
        parse_entry({"model_id": "register"})
    assert parse_entry({"model_id": "register:1b"}).model_id == "register:1b"


@pytest.mark.parametrize("value", [False, 0, [], "ftp://x"])
def test_an_upstream_url_that_is_not_a_url_is_refused(value: object) -> None:
    """Regression: a falsy non-string (false) was taken for "no upstream" and accepted."""
    with pytest.raises(ConfigError, match=r"^model\.upstream_url: "):
        parse_entry({"model_id": "m", "upstream_url": value})
    assert parse_entry({"model_id": "m", "upstream_url": ""}).upstream_url == ""
