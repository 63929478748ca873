"""One thread per remote node: is the node there, and how are its workers.

Every pass asks the node's supervisord for its processes (one authenticated XML-RPC call,
bounded by a timeout). An answer tells the pool the node is UP (a node coming back gets its
surviving workers adopted) and lets the node's ``WorkerWatch`` check its workers; no answer for
``node_timeout_seconds`` makes the node DOWN and its models FAILED with reason ``node_lost``.
Each node has its own thread: a slow or dead node never delays another.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

from controlplane.adapters.supervisord import SupervisorUnavailable
from controlplane.adapters.worker import WorkerProbe
from controlplane.nodes import RemoteNode
from controlplane.pool import ModelPool
from controlplane.watch import WorkerWatch

log = logging.getLogger("modelpool.monitor")

#: Seconds between two passes over one node.
INTERVAL: Final = 1.0


def call_timeout(node_timeout: float) -> float:
    """How long one call to a node may take: a few calls fit in ``node_timeout_seconds``."""
    return max(0.5, min(5.0, node_timeout / 3))


class NodeMonitor:
    """Watches one remote node in a thread of its own."""

    def __init__(self, pool: ModelPool, node: RemoteNode, probe: WorkerProbe) -> None:
        self.pool = pool
        self.node = node
        self.watch = WorkerWatch(
            pool,
            node.name,
            node.client,
            lambda: node.config.address,
            probe,
            local=False,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"modelpool-node-{self.node.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.check()
            except Exception:
                log.exception("monitor pass of node %s failed", self.node.name)
            self._stop.wait(max(0.05, INTERVAL - (time.monotonic() - began)))

    def check(self) -> None:
        """One pass (also run once, synchronously, when the control plane starts)."""
        serving = self.pool.serving_ids()
        loaded = self.pool.loaded()
        if self.node.error:
            self._unreachable(self.node.error)
            return
        try:
            procs = {p.name: p for p in self.node.client.all_processes()}
        except SupervisorUnavailable as exc:
            self._unreachable(str(exc))
            return
        if self.pool.node_reachable(
            self.node.name, {n: (p.state, p.pid) for n, p in procs.items()}
        ):
            log.info("node %s is UP (%d processes)", self.node.name, len(procs))
            # Adoptions changed what is loaded: look again next pass, not with this snapshot.
            return
        self.watch.check(procs, serving, loaded)

    def _unreachable(self, error: str) -> None:
        if self.pool.node_unreachable(self.node.name, error):
            log.error("node %s is DOWN: %s", self.node.name, error)
