from __future__ import annotations

import pytest

from controlplane.core.ports import PortRequest, PortUnavailableError, choose_port, warmup_ports


def req(
    model: str,
    pinned: int | None = None,
    warm: tuple[str, ...] = (),
    others: set[int] | None = None,
) -> PortRequest:
    return PortRequest(model, pinned, warm, others or set())


def free(_: int) -> bool:
    return True


def test_warmup_models_take_ports_in_registry_order() -> None:
    assert warmup_ports(["a", "b", "c"], set(), 8051) == {"a": 8051, "b": 8052, "c": 8053}
    assert warmup_ports(["a", "b"], {8051}, 8051) == {"a": 8052, "b": 8053}
    assert choose_port(req("b", warm=("a", "b")), 8051, 8099, set(), free) == 8052


def test_other_models_take_the_lowest_port_not_reserved() -> None:
    assert choose_port(req("x", warm=("a", "b")), 8051, 8099, set(), free) == 8053
    assert choose_port(req("x"), 8051, 8099, {8051, 8052}, free) == 8053
    assert choose_port(req("x", others={8051}), 8051, 8099, set(), free) == 8052


def test_pinned_port_is_used_and_must_be_free() -> None:
    assert choose_port(req("x", pinned=8070), 8051, 8099, set(), free) == 8070
    with pytest.raises(PortUnavailableError, match="8070"):
        choose_port(req("x", pinned=8070), 8051, 8099, set(), lambda p: p != 8070)
    with pytest.raises(PortUnavailableError):
        choose_port(req("x", pinned=8070), 8051, 8099, {8070}, free)


def test_ports_held_by_foreign_processes_are_skipped() -> None:
    held = {8051, 8053}
    assert choose_port(req("x"), 8051, 8099, set(), lambda p: p not in held) == 8052
    # A warmup model whose reserved port is held takes the lowest free port instead.
    assert choose_port(req("a", warm=("a",)), 8051, 8099, set(), lambda p: p != 8051) == 8052


def test_reserved_ports_are_used_last_and_range_can_run_out() -> None:
    # Only 8051-8052 exist, both reserved for absent warmup models: still usable as a last resort.
    assert choose_port(req("x", warm=("a", "b")), 8051, 8052, set(), free) == 8051
    with pytest.raises(PortUnavailableError, match="8051-8052"):
        choose_port(req("x"), 8051, 8052, {8051, 8052}, free)
