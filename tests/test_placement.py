"""Placement (pure) and the ``nodes:`` config: table tests, no processes."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.core.placement import NodeView, Want, eligible, place
from controlplane.core.policy import ModelView
from controlplane.core.states import State
from controlplane.settings import ConfigError, parse_entry, parse_registry, parse_settings


def node(name: str, memory: float = 4000, **kw: Any) -> NodeView:
    return NodeView(name=name, up=kw.pop("up", True), memory_limit_mb=memory, **kw)


def model(model_id: str, memory: float, state: State = State.HOT, **kw: Any) -> ModelView:
    return ModelView(model_id=model_id, state=state, warmup=False, memory_mb=memory, **kw)


A, B, C = node("a"), node("b"), node("c", 8000)


@pytest.mark.parametrize(
    ("nodes", "models", "want", "strategy", "expected"),
    [
        # spread: the most free memory wins
        ([A, B, C], {}, Want("m", 1000), "spread", "c"),
        ([A, B, C], {"c": [model("x", 5000)]}, Want("m", 1000), "spread", "a"),
        # ties: fewest models, then config order
        ([A, B], {"a": [model("x", 0)]}, Want("m", 1000), "spread", "b"),
        ([A, B], {}, Want("m", 1000), "spread", "a"),
        # pack: the least free memory that still fits
        ([A, B, C], {"a": [model("x", 2000)]}, Want("m", 1000), "pack", "a"),
        ([A, B, C], {"a": [model("x", 3500)]}, Want("m", 1000), "pack", "b"),
        # a pin and labels filter before the score
        ([A, B, C], {}, Want("m", 1000, pinned=("b",)), "spread", "b"),
        (
            [A, node("g", labels=frozenset({"gpu"})), C],
            {},
            Want("m", 1, labels=("gpu",)),
            "spread",
            "g",
        ),
        # a DOWN node, or one without a free port, takes nothing
        ([A, node("c", 8000, up=False)], {}, Want("m", 1000), "spread", "a"),
        ([A, node("c", 8000, free_ports=0)], {}, Want("m", 1000), "spread", "a"),
        # a node where the model fits now wins over one where it fits after an eviction
        ([node("a", 2000), B], {"b": [model("x", 3500)]}, Want("m", 1000), "spread", "a"),
        # no limit (0) counts as the most free memory
        ([A, node("u", 0)], {}, Want("m", 1000), "spread", "u"),
        # a node that holds a replica of the model already comes last, free memory or not
        ([A, B, C], {}, Want("m", 1000, replica_nodes=frozenset({"c"})), "spread", "a"),
        ([A, B, C], {}, Want("m", 1000, replica_nodes=frozenset({"a", "c"})), "pack", "b"),
        # ... but takes it when no other node can
        (
            [A, node("c", 8000, up=False)],
            {},
            Want("m", 1, replica_nodes=frozenset({"a"})),
            "spread",
            "a",
        ),
        # slots count too
        (
            [node("a", max_models=1), B],
            {"a": [model("x", 1, in_flight=1)]},
            Want("m", 1),
            "spread",
            "b",
        ),
    ],
)
def test_place_picks(
    nodes: list[NodeView],
    models: dict[str, list[ModelView]],
    want: Want,
    strategy: str,
    expected: str,
) -> None:
    result = place(nodes, models, want, strategy)
    assert result.node == expected and result.plan.ok, result


def test_full_nodes_evict_on_the_best_node() -> None:
    nodes = [node("a", 2000), node("b", 3000)]
    models = {
        "a": [model("old", 1500, last_used=1.0)],
        "b": [model("busy", 2500, in_flight=1), model("idle", 400, last_used=2.0)],
    }
    result = place(nodes, models, Want("m", 1000))
    # a: evict "old" (2000 free after); b: its only idle model frees too little.
    assert result.node == "a" and result.plan.evict == ("old",)


def test_no_node_can_take_it_says_why_node_by_node() -> None:
    nodes = [node("a", 1000), node("b", up=False), node("c", labels=frozenset())]
    result = place(nodes, {"a": [model("x", 900, in_flight=1)]}, Want("m", 500, pinned=("a", "b")))
    assert result.node is None
    assert "a: no capacity" in result.reason and "b: DOWN" in result.reason
    assert "c: not in the entry's nodes" in result.reason


def test_one_node_gives_its_own_reason_as_a_single_node_pool_did() -> None:
    result = place([node("local", 1000)], {}, Want("m", 2000))
    assert result.node is None
    assert result.reason == "model needs 2000 MB, more than memory_limit_mb 1000"


def test_eligible_reasons() -> None:
    assert eligible(A, Want("m", 1)) is None
    assert eligible(A, Want("m", 1, labels=("gpu", "nvme"))) == "lacks label(s) gpu, nvme"


# --- the nodes: config ------------------------------------------------------------------------

GOOD = {"name": "gpu-a", "url": "http://10.0.0.5:9001", "password_file": "/etc/mp/gpu-a"}


def test_a_node_entry_gets_defaults_and_its_address_from_the_url() -> None:
    s = parse_settings({"nodes": [GOOD]})
    (n,) = s.nodes
    assert n.address == "10.0.0.5" and n.port_range.start == 8051 and n.labels == ()
    assert s.to_dict()["nodes"][0]["name"] == "gpu-a"
    assert parse_settings(s.to_dict()) == s  # what is saved reads back the same


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"nodes": "x"}, "nodes: 'x' is not a list of nodes"),
        ({"nodes": [{**GOOD, "name": "local"}]}, "nodes[0].name: 'local' is the stack's own"),
        ({"nodes": [{**GOOD, "name": "Bad Name"}]}, "nodes[0].name: 'Bad Name' is not a node name"),
        ({"nodes": [{"name": "a", "url": "http://h:1"}]}, "nodes[0].password_file: missing"),
        ({"nodes": [{**GOOD, "url": "http://u:p@h:1"}]}, "the password is read from password_file"),
        ({"nodes": [{**GOOD, "password_file": "rel"}]}, "is not an absolute path"),
        ({"nodes": [{**GOOD, "url": "https://h:1"}]}, "speaks plain http"),
        (
            {"nodes": [{**GOOD, "url": "http://Wu[Yb/"}]},
            "nodes[0].url: 'http://Wu[Yb' is not a URL",
        ),
        ({"nodes": [{**GOOD, "url": "http://h:x"}]}, "is not a URL"),
        ({"nodes": [{**GOOD, "ollama_base_url": "http://h:x"}]}, "nodes[0].ollama_base_url:"),
        ({"nodes": [{**GOOD, "address": "0.0.0.0"}]}, "nodes[0].address: '0.0.0.0' is not an"),
        ({"nodes": [{**GOOD, "port_range": {"start": 9, "end": 1}}]}, "nodes[0].port_range.end"),
        ({"nodes": [{**GOOD, "max_concurrent_models": 0}]}, "max_concurrent_models: 0 is below"),
        ({"nodes": [{**GOOD, "labels": ["a b"]}]}, "nodes[0].labels[0]: 'a b' is not a label"),
        ({"nodes": [{**GOOD, "colour": 1}]}, "nodes[0].colour: unknown key"),
        ({"nodes": [GOOD, GOOD]}, "nodes[1].name: 'gpu-a' is already node 0"),
        ({"nodes": [GOOD, {**GOOD, "name": "b"}]}, "nodes[1].url: 'http://10.0.0.5:9001' is"),
        ({"local_node": False}, "local_node: false needs at least one entry in nodes"),
        ({"placement": "random"}, "placement: 'random' is not one of spread, pack"),
    ],
)
def test_bad_node_config_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert message in str(info.value)


def test_registry_pins_must_name_known_nodes() -> None:
    s = parse_settings({"nodes": [GOOD]})
    ok = parse_registry({"models": [{"model_id": "m", "nodes": ["gpu-a", "local"]}]}, s)
    assert ok[0].nodes == ("gpu-a", "local")
    with pytest.raises(ConfigError, match=r"models\[0\].nodes\[0\]: 'gpu-b' is not a node"):
        parse_registry({"models": [{"model_id": "m", "nodes": ["gpu-b"]}]}, s)
    without_local = parse_settings({"local_node": False}, s)
    with pytest.raises(ConfigError, match="'local' is not a node"):
        parse_registry({"models": [{"model_id": "m", "nodes": ["local"]}]}, without_local)
    with pytest.raises(ConfigError, match=r"model.labels\[0\]"):
        parse_entry({"model_id": "m", "labels": [""]})
