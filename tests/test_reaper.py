"""The reaper as the state file's one writer, with a fake supervisord (no processes)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from controlplane.adapters.supervisord import SupervisorUnavailable
from controlplane.reaper import Reaper, StateFile
from controlplane.settings import ModelEntry
from tests.test_pool import hot, make


class SlowSupervisor:
    """``all_processes`` blocks until released: a reaper pass that takes its time."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.away = False

    def all_processes(self) -> list[Any]:
        self.entered.set()
        self.release.wait(10)
        if self.away:
            raise SupervisorUnavailable("socket gone")
        return []


class CountingStateFile(StateFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.fail = False

    def write(self, data: dict[str, Any]) -> None:
        self.writes.append((threading.current_thread().name, data))
        if self.fail:
            raise OSError("disk full")
        super().write(data)


class NoProbe:
    def health(self, host: str, port: int, timeout: float) -> None:
        return None


def test_a_slow_pass_outlasting_stop_is_saved_by_the_reaper_alone(tmp_path: Path) -> None:
    """Regression: stop() wrote state.json itself after a 5 s join that a slow pass could
    outlast, so two threads wrote it. Deterministic: the pass blocks until the test releases it.
    """
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    sup = SlowSupervisor()
    states = CountingStateFile(tmp_path / "state.json")
    reaper = Reaper(pool, sup, NoProbe(), "127.0.0.1", states)  # type: ignore[arg-type]
    reaper.start()
    assert sup.entered.wait(5)
    reaper.stop(timeout=0.1)  # returns while the pass is still running
    assert states.writes == []
    pool.unload("a")  # a change made after stop() was called
    sup.release.set()
    assert reaper._thread is not None
    reaper._thread.join(5)
    assert not reaper._thread.is_alive()
    assert {name for name, _ in states.writes} == {"modelpool-reaper"}
    assert states.writes[-1][1]["models"]["a"]["state"] == "UNLOADING"
    assert not pool.dirty


def test_a_failed_write_is_tried_again(tmp_path: Path) -> None:
    """Regression: persisted() cleared the dirty flag before the write, so a failed write was
    never repeated."""
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    states = CountingStateFile(tmp_path / "state.json")
    sup = SlowSupervisor()
    sup.release.set()
    reaper = Reaper(pool, sup, NoProbe(), "127.0.0.1", states)  # type: ignore[arg-type]
    states.fail = True
    reaper.tick()
    assert len(states.writes) == 1 and pool.dirty
    states.fail = False
    reaper.tick()
    assert len(states.writes) == 2 and not pool.dirty
    assert (tmp_path / "state.json").exists()
    reaper.tick()
    assert len(states.writes) == 2  # nothing changed: nothing written


def test_supervisord_going_away_is_recorded_through_the_pool(tmp_path: Path) -> None:
    pool, _, _ = make([ModelEntry("a")])
    sup = SlowSupervisor()
    sup.release.set()
    sup.away = True
    reaper = Reaper(pool, sup, NoProbe(), "127.0.0.1", CountingStateFile(tmp_path / "s"))  # type: ignore[arg-type]
    reaper.tick()
    assert pool.available is False
    sup.away = False
    reaper.tick()
    assert pool.available is True
