"""PoolService: one node's pool wired to supervisord, its workers, the reaper and the config files.

Also the mutations that must be persisted (register, delete, PATCH /config): each is validated
as a whole first and changes nothing when invalid.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from controlplane.adapters.registry import RegistryAnnouncer, http_sender
from controlplane.adapters.supervisord import SupervisorClient, SupervisorUnavailable
from controlplane.adapters.worker import HttpWorkerProbe, WorkerProbe
from controlplane.configstore import ConfigStore, atomic_write
from controlplane.core.slug import PROGRAM_PREFIX
from controlplane.core.states import State
from controlplane.drift import DriftRepair
from controlplane.errors import Conflict, InvalidInput, PoolError
from controlplane.lifecycle import Workers
from controlplane.monitor import NodeMonitor, call_timeout
from controlplane.node import Node
from controlplane.nodeconfig import LOCAL
from controlplane.nodes import LocalNode, RemoteNode, WorkerNode, port_checker, reachable_ollama
from controlplane.pool import ModelPool
from controlplane.pool_nodes import LostWorker
from controlplane.reaper import Reaper, StateFile
from controlplane.records import Record, model_of
from controlplane.settings import (
    SETTINGS_BY_NAME,
    ConfigError,
    ModelEntry,
    Settings,
    check_registry,
    parse_entry,
    parse_settings,
    resolve_model_path,
)
from model_service.spec import WorkerSpec

log = logging.getLogger("modelpool.service")


#: The fingerprint given to an adopted worker that must be replaced whatever its entry says.
OUTDATED = "outdated"


def file_mb(path: str) -> float | None:
    """Size of a registry entry's model file in MiB; None if it has none or cannot be read."""
    if not path:
        return None
    try:
        return Path(resolve_model_path(path)).stat().st_size / (1024 * 1024)
    except OSError:
        return None


class PoolService:
    """The pool with everything it talks to: the stack's own supervisord, the remote nodes,
    their workers, the reaper and the config files."""

    def __init__(
        self,
        store: ConfigStore,
        run_dir: Path,
        *,
        supervisor: SupervisorClient | None = None,
        probe: WorkerProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings, entries = store.load()
        self.store = store
        self.node = Node.local(run_dir, settings)
        self.pool = ModelPool(settings, entries, clock)
        self.supervisor = supervisor or SupervisorClient(str(self.node.paths.socket))
        self.probe = probe or HttpWorkerProbe()
        self.nodes: dict[str, WorkerNode] = {LOCAL: LocalNode(self.node, self.supervisor)}
        timeout = call_timeout(settings.node_timeout_seconds)
        remotes = [RemoteNode(c, timeout) for c in settings.nodes]
        self.nodes.update((n.name, n) for n in remotes)
        self.pool.configure_nodes(settings.nodes)
        self.pool.fingerprint_for = self._fingerprint
        self.workers = Workers(self.pool, self.nodes, self.probe)
        self.pool.lifecycle = self.workers
        self.pool.is_port_free = port_checker(settings.bind_host)
        self.pool.file_mb = file_mb
        self.state_file = StateFile(self.node.paths.state_file)
        self.reaper = Reaper(
            self.pool, self.supervisor, self.probe, settings.bind_host, self.state_file, clock
        )
        self.pool.on_change = self.reaper.wake
        self.reaper.after_tick = self._keep_warm
        self.reaper.watch.remove = self._remove_orphan
        self.reaper.watch.drift = DriftRepair(
            self.pool,
            LOCAL,
            lambda: self.pool.settings.ollama_base_url,
            self.workers.spawn,
            self.workers.stopping,
        )
        self.monitors = [NodeMonitor(self.pool, n, self.probe) for n in remotes]
        for m, n in zip(self.monitors, remotes, strict=True):
            m.watch.remove = self._remove_orphan
            m.watch.drift = DriftRepair(
                self.pool,
                n.name,
                functools.partial(str, reachable_ollama(n.config)),
                self.workers.spawn,
                self.workers.stopping,
            )
        #: Each node's drift repair (it also lets go of what a cancelled load left in Ollama).
        self.drift: dict[str, DriftRepair | None] = {LOCAL: self.reaper.watch.drift}
        self.drift.update(
            (n.name, m.watch.drift) for m, n in zip(self.monitors, remotes, strict=True)
        )
        self.pool.listeners.append(self._after_cancel)
        self.announcer: RegistryAnnouncer | None = None
        if settings.service_registry_url:
            self.announcer = RegistryAnnouncer(
                http_sender(settings.service_registry_url),
                dict(settings.service_registry_paths),
                settings.service_registry_heartbeat_seconds,
            )
            self.pool.listeners.append(self._tell_registry)
            self.workers.before_stop = self._withdraw_before_stop
        self._mutate = threading.Lock()
        self._warming: set[str] = set()
        self._mutate_warming = threading.Lock()
        self.started = False

    # --- start and stop -----------------------------------------------------------------------

    def start(self, supervisor_wait: float = 15.0) -> None:
        """Adopt running workers, clean stale entries, start the reaper, load warmup models."""
        self.node.paths.create()
        self._write_key(self.pool.settings.api_key)
        procs = self._wait_supervisor(supervisor_wait)
        self._adopt(procs)
        self._restore_pins()
        self._contact_nodes()
        self.reaper.start()
        for monitor in self.monitors:
            monitor.start()
        if self.announcer is not None:
            self.announcer.start()
        self.started = True
        for model_id in self.pool.warmup_ids():
            self._load_in_background(model_id)

    def _remove_orphan(self, node: str, name: str) -> None:
        self.workers.spawn(f"orphan-{node}-{name}", self.workers.remove_stale, node, name)

    def _fingerprint(self, rec: Record) -> str:
        """What the record's worker would serve if started now on its node (pure: no I/O)."""
        node = self.nodes.get(rec.node or LOCAL, self.nodes[LOCAL])
        return node.spec(rec.entry, self.pool.settings, 0).fingerprint()

    def _contact_nodes(self) -> None:
        """Reach every remote node once, in parallel, before warmup models are placed: workers
        the state file says they run are adopted at first contact."""
        saved = self.state_file.read()
        for monitor in self.monitors:
            expected = {
                str(m.get("program")): LostWorker(
                    model_id,
                    int(m["port"]),
                    m.get("fingerprint"),
                    0,
                    m.get("deadline"),
                    m.get("leases"),
                )
                for model_id, m in saved.items()
                if isinstance(m, dict) and m.get("node") == monitor.node.name and m.get("port")
            }
            self.pool.expect_workers(monitor.node.name, expected)
        threads = [
            threading.Thread(target=m.check, name=f"modelpool-contact-{m.node.name}", daemon=True)
            for m in self.monitors
        ]
        for t in threads:
            t.start()
        limit = time.monotonic() + call_timeout(self.pool.settings.node_timeout_seconds) + 1
        for t in threads:
            t.join(max(0.0, limit - time.monotonic()))

    def _write_key(self, key: str) -> None:
        """Give every worker the current api_key: they re-read this file when it changes."""
        atomic_write(self.node.paths.api_key_file, key)

    def _withdraw_before_stop(self, model_id: str) -> None:
        """Deregister before the worker drains (bounded: the registry never holds a stop up)."""
        if (
            self.announcer is not None and model_of(model_id) == model_id
        ):  # replicas k >= 2: not announced
            self.announcer.withdraw(model_id).wait(2.0)

    def _after_cancel(self, rec: Record, old: State, new: State) -> None:
        """A cancelled load of an Ollama model: let go of it in Ollama should Ollama finish the
        load anyway (called under the pool lock: only starts a thread)."""
        cancelled = old is State.WARMING and new is State.UNLOADING
        if not cancelled or rec.unload_reason != "cancelled" or rec.entry.backend != "ollama":
            return
        drift = self.drift.get(rec.node or LOCAL)
        if drift is not None:
            name = rec.entry.upstream_model or rec.entry.model_id
            within = self.pool.settings.load_timeout_seconds
            drift.release_cancelled(rec.key, name, rec.gen, within)

    def _tell_registry(self, rec: Record, old: State, new: State) -> None:
        """Keep the service registry in line with a transition (called under the pool lock)."""
        assert self.announcer is not None
        if rec.replica != 1:
            return  # the registry names one endpoint per model: its first replica's
        model_id = rec.entry.model_id
        if new is State.HOT and rec.port is not None:
            endpoint = f"http://{self.pool.address_of(rec.node)}:{rec.port}"
            self.announcer.announce(
                model_id,
                {
                    "service_id": f"modelpool:{model_id}",
                    "name": model_id,
                    "model_id": model_id,
                    "display_name": rec.entry.display_name or model_id,
                    "endpoint": endpoint,
                    "url": endpoint + "/v1",
                    "health_url": endpoint + "/health",
                    "port": rec.port,
                    "tags": list(rec.entry.tags),
                    "model_type": rec.entry.model_type,
                    "backend": rec.entry.backend,
                    "state": new.value,
                },
            )
        elif new is State.COOLING:
            self.announcer.set_state(model_id, new.value)
        elif new in (State.UNLOADING, State.FAILED, State.COLD):
            self.announcer.withdraw(model_id)

    def stop(self) -> None:
        """Stop pending tasks and the reaper; workers keep running (a restart adopts them).

        Tasks first: what they report still reaches the state file, which the reaper (its only
        writer) saves as it ends.
        """
        # Bounded well below gunicorn's graceful_timeout (10 s), after which the process dies.
        self.workers.stopping.set()
        self.workers.join(2)
        for monitor in self.monitors:
            monitor.stop(timeout=2)
        self.reaper.stop(timeout=5)
        if self.announcer is not None:
            self.announcer.stop()

    def _wait_supervisor(self, timeout: float) -> list[Any]:
        limit = time.monotonic() + timeout
        while True:
            try:
                return self.supervisor.all_processes()
            except SupervisorUnavailable:
                if time.monotonic() >= limit:
                    raise
                time.sleep(0.2)

    def _restore_pins(self) -> None:
        """Replica counts pinned by hand before the restart, where the registry still allows."""
        for model_id, count in self.state_file.read_pinned().items():
            try:
                self.pool.pin_replicas(model_id, count)
            except PoolError as exc:
                log.warning("pinned replicas of %s not restored: %s", model_id, exc)

    def _adopt(self, procs: list[Any]) -> None:
        """Re-adopt workers that still run (replicas too); remove entries that belong to no
        model."""
        saved = self.state_file.read()
        by_program = self.pool.worker_programs()
        live = set()
        for info in procs:
            if not info.name.startswith(PROGRAM_PREFIX):
                continue
            model_id = by_program.get(info.name)  # a worker's key: model#k for a replica
            spec = self._read_spec(info.name)
            if (
                model_id is not None
                and spec is not None
                and spec.model_id == model_of(model_id)
                and info.state in ("STARTING", "RUNNING")
            ):
                entry = saved.get(model_id, {})
                deadline = entry.get("deadline") if isinstance(entry, dict) else None
                # A worker that does not read the pool's key file (started by an older
                # version, with the key in its spec) could not follow a key rotation: it is
                # adopted as outdated, so that it is drained and reloaded.
                reads_key = spec.api_key_file == str(self.node.paths.api_key_file)
                fingerprint = spec.fingerprint() if reads_key else OUTDATED
                saved_leases = entry.get("leases") if isinstance(entry, dict) else None
                if self.pool.adopt(
                    model_id, spec.port, info.pid, deadline, fingerprint, saved_leases
                ):
                    log.info("adopting model=%s program=%s port=%s", model_id, info.name, spec.port)
                    live.add(info.name)
                    continue
            log.info("removing stale program %s", info.name)
            if model_id is not None:
                # Its model may load at once under the same program name: finish first.
                self.workers.remove_stale(LOCAL, info.name)
            else:
                self.workers.spawn(
                    f"remove-{info.name}", self.workers.remove_stale, LOCAL, info.name
                )
            live.add(info.name)
        for conf in self.node.paths.conf_d.glob("*.conf"):
            if conf.stem not in live:
                self.node.delete_program(conf.stem)

    def _read_spec(self, program: str) -> WorkerSpec | None:
        try:
            return WorkerSpec.read(self.node.paths.spec_file(program))
        except (OSError, ValueError, TypeError):
            return None

    def _load_in_background(self, model_id: str, manual: bool = True) -> None:
        """Load a warmup model in a thread (at most one such thread per model)."""
        with self._mutate_warming:
            if model_id in self._warming:
                return
            self._warming.add(model_id)

        def run() -> None:
            try:
                # A warmup load does not queue for room ahead of requests: it is tried again.
                self.pool.ensure_loaded(model_id, manual=manual, queue=False)
            except Exception as exc:
                log.warning("warmup load of %s failed: %s", model_id, exc)
            finally:
                with self._mutate_warming:
                    self._warming.discard(model_id)

        self.workers.spawn(f"warmup-{model_id}", run)

    def _keep_warm(self) -> None:
        """Load warmup models (and those in a schedule window) that are COLD or FAILED.

        The failure backoff applies; a permanent failure is not retried.
        """
        if not self.pool.any_node_up() or self.workers.stopping.is_set():
            return
        now = self.pool.clock()
        kept = set(self.pool.warmup_ids()) | self.pool.scheduled_ids()
        for rec in self.pool.records():
            if (
                rec.entry.model_id in kept
                and rec.state in (State.COLD, State.FAILED)
                and not rec.busy
                and rec.retry_at <= now
            ):
                self._load_in_background(rec.entry.model_id, manual=False)

    def supervisor_reachable(self) -> bool:
        try:
            self.supervisor.state()
        except SupervisorUnavailable:
            return False
        return True

    # --- persisted mutations ------------------------------------------------------------------

    def register(self, raw: Any) -> ModelEntry:
        """Add a registry entry (validated against the whole registry, then saved)."""
        try:
            entry = parse_entry(raw, "model")
            with self._mutate:
                entries = (*self.pool.entries(), entry)
                if any(e.model_id == entry.model_id for e in self.pool.entries()):
                    raise Conflict(f"model {entry.model_id!r} is already registered")
                check_registry(entries, self.pool.settings)
                self.store.save_registry(entries)
                self.pool.add_entry(entry)
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from None
        if entry.warmup:
            self._load_in_background(entry.model_id)
        return entry

    def update(self, model_id: str, raw: Any) -> ModelEntry:
        """Replace a registry entry (validated against the whole registry, then saved).

        A loaded model whose worker no longer serves what the entry says is drained and loaded
        again by the reaper's next pass (``ModelPool.reload_changed``).
        """
        if not isinstance(raw, Mapping):
            raise InvalidInput("body: expected a registry entry (a JSON object)")
        data = {"model_id": model_id, **raw}
        if data["model_id"] != model_id:
            raise InvalidInput(
                f"model.model_id: {data['model_id']!r} differs from the path's {model_id!r} "
                "(an id cannot be changed: delete the model and register the new id)"
            )
        try:
            entry = parse_entry(data, "model")
            with self._mutate:
                self.pool.record(model_id)  # UnknownModel (404) before anything is written
                entries = tuple(entry if e.model_id == model_id else e for e in self.pool.entries())
                check_registry(entries, self.pool.settings)
                self.store.save_registry(entries)
                self.pool.replace_entry(entry)
        except ConfigError as exc:
            raise InvalidInput(str(exc)) from None
        self.reaper.wake()
        return entry

    def delete(self, model_id: str) -> None:
        """Unload (draining) and remove a model; the registry file is saved without it."""
        with self._mutate:
            self.pool.mark_deleting(model_id)
            remaining = tuple(e for e in self.pool.entries() if e.model_id != model_id)
            settings = self.pool.settings
            if model_id in settings.warmup_models:
                settings = parse_settings(
                    {"warmup_models": [w for w in settings.warmup_models if w != model_id]},
                    settings,
                )
                self.store.save_settings(settings)
                self.pool.set_settings(settings)
            self.store.save_registry(remaining)
        self.pool.wait_dropped(model_id, self.pool.settings.graceful_shutdown_seconds + 40)

    def patch_config(self, raw: Any) -> tuple[Settings, list[str]]:
        """Validate a partial config on top of the current one, save it and apply it live.

        Returns the new settings and the keys that take effect only after a restart.
        """
        if not isinstance(raw, Mapping) or not raw:
            raise InvalidInput("body: expected a JSON object of settings to change")
        with self._mutate:
            old = self.pool.settings
            try:
                new = parse_settings(raw, old)
                check_registry(self.pool.entries(), new)
            except ConfigError as exc:
                raise InvalidInput(str(exc)) from None
            self.store.save_settings(new)
            if new.api_key != old.api_key:
                self._write_key(new.api_key)  # running workers take it at their next request
            self.pool.set_settings(new)
        restart = [
            k for k in raw if SETTINGS_BY_NAME[k].restart and getattr(old, k) != getattr(new, k)
        ]
        # New warmup models load on the reaper's next pass (_keep_warm): that respects the
        # failure backoff, unlike a load call.
        self.reaper.wake()
        return new, restart
