"""The one small client for supervisord's XML-RPC interface: the stack's own over its unix
socket (``SupervisorClient``), a node's over authenticated HTTP with ``supervisor_twiddler``
(``TwiddlerClient``).

A new connection per call: ``xmlrpc.client.ServerProxy`` keeps one connection and is not thread
safe. Faults become domain errors here (ALREADY_STARTED / NOT_RUNNING are successes).
"""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import xmlrpc.client
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

# supervisor.xmlrpc.Faults, copied so that this module needs only the stdlib.
BAD_NAME: Final = 10
NO_FILE: Final = 20
NOT_EXECUTABLE: Final = 21
FAILED: Final = 30
ABNORMAL_TERMINATION: Final = 40
SPAWN_ERROR: Final = 50
ALREADY_STARTED: Final = 60
NOT_RUNNING: Final = 70
ALREADY_ADDED: Final = 90
STILL_RUNNING: Final = 91
CANT_REREAD: Final = 92

#: supervisord process states that mean "a process exists".
ALIVE_STATES: Final = frozenset({"STARTING", "RUNNING", "STOPPING", "BACKOFF"})


class SupervisorError(Exception):
    """A supervisord call failed."""


class SupervisorUnavailable(SupervisorError):
    """supervisord's socket cannot be reached."""


class SupervisorAuthError(SupervisorUnavailable):
    """supervisord refused the username or password (HTTP 401)."""


class UnknownProgram(SupervisorError):
    """supervisord has no such program (BAD_NAME)."""


class SpawnError(SupervisorError):
    """supervisord could not start the program."""


@dataclass(frozen=True)
class ProcessInfo:
    """One row of ``getAllProcessInfo``."""

    name: str
    group: str
    state: str
    pid: int
    exitstatus: int
    start: int
    description: str

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @classmethod
    def from_rpc(cls, row: dict[str, Any]) -> ProcessInfo:
        return cls(
            name=row["name"],
            group=row["group"],
            state=row["statename"],
            pid=int(row.get("pid") or 0),
            exitstatus=int(row.get("exitstatus") or 0),
            start=int(row.get("start") or 0),
            description=str(row.get("description") or ""),
        )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self._path, self._timeout)


class _HttpTransport(xmlrpc.client.Transport):
    """Plain HTTP with a timeout; the credentials travel in a header, never in the URL (which
    xmlrpc.client puts in its error messages)."""

    def __init__(self, timeout: float, authorization: str) -> None:
        super().__init__(headers=[("Authorization", authorization)])
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


class SupervisorClient:
    """supervisord's XML-RPC API, one connection per call, faults mapped to domain errors.

    Programs are groups of their own (``NAME:NAME``), made live from include files.
    """

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.where = socket_path
        self.timeout = timeout
        # reloadConfig + addProcessGroup must not interleave with another writer's.
        self._config_lock = threading.Lock()

    def _proxy(self, timeout: float) -> tuple[xmlrpc.client.ServerProxy, xmlrpc.client.Transport]:
        transport = _UnixTransport(self.socket_path, timeout)
        return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=transport), transport

    def qualified(self, name: str) -> str:
        """A program's process name as supervisord's API wants it."""
        return f"{name}:{name}"

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        proxy, transport = self._proxy(timeout or self.timeout)
        try:
            return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as fault:
            # A program's options carry its spec (the API key, for a node): never in a message.
            shown = tuple("{...}" if isinstance(a, dict) else a for a in args)
            raise _fault_error(method, shown, fault) from None
        except xmlrpc.client.ProtocolError as exc:
            if exc.errcode == 401:
                raise SupervisorAuthError(
                    f"supervisord at {self.where} refused the username or password "
                    "(HTTP 401 Unauthorized): check the node's password_file"
                ) from None
            raise SupervisorUnavailable(
                f"supervisord is not reachable at {self.where}: {exc}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise SupervisorUnavailable(
                f"supervisord is not reachable at {self.where}: {exc}"
            ) from None
        finally:
            transport.close()

    # --- queries ------------------------------------------------------------------------------

    def state(self) -> str:
        """supervisord's own state name (RUNNING, SHUTDOWN, ...)."""
        return str(self._call("supervisor.getState")["statename"])

    def pid(self) -> int:
        return int(self._call("supervisor.getPID"))

    def all_processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(r) for r in self._call("supervisor.getAllProcessInfo")]

    def process(self, name: str) -> ProcessInfo:
        return ProcessInfo.from_rpc(self._call("supervisor.getProcessInfo", self.qualified(name)))

    def log_tail(self, name: str, length: int = 2000) -> str:
        """The last ``length`` bytes of a program's stdout log ('' if none)."""
        try:
            text, _offset, _overflow = self._call(
                "supervisor.tailProcessStdoutLog", self.qualified(name), 0, length
            )
        except SupervisorError:
            return ""
        return str(text)

    # --- program lifecycle --------------------------------------------------------------------

    def add_program(self, name: str, options: dict[str, str] | None = None) -> None:
        """Make a program whose include file was just written live (reloadConfig + add);
        ``options`` are not used (they are in the file).

        If a stale group of the same name exists with a changed entry, it is replaced.
        """
        with self._config_lock:
            _added, changed, _removed = self._call("supervisor.reloadConfig")[0]
            if name in changed:
                self._remove_group(name)
            try:
                self._call("supervisor.addProcessGroup", name)
            except _AlreadyAdded:
                pass

    def start(self, name: str) -> None:
        """Start without waiting: RUNNING only means 'did not exit within startsecs'."""
        try:
            self._call("supervisor.startProcess", self.qualified(name), False)
        except _AlreadyStarted:
            pass

    def stop(self, name: str, timeout: float) -> None:
        """Stop and wait (supervisord sends stopsignal, then KILL after stopwaitsecs)."""
        try:
            self._call("supervisor.stopProcess", self.qualified(name), True, timeout=timeout)
        except (_NotRunning, UnknownProgram):
            pass

    def signal(self, name: str, signame: str) -> None:
        try:
            self._call("supervisor.signalProcess", self.qualified(name), signame)
        except (_NotRunning, UnknownProgram):
            pass

    def remove_program(self, name: str) -> None:
        """Forget a stopped program (its include file should be deleted before)."""
        with self._config_lock:
            self._remove_group(name)
            self._call("supervisor.reloadConfig")

    def _remove_group(self, name: str) -> None:
        try:
            self._call("supervisor.removeProcessGroup", name)
        except UnknownProgram:
            pass

    def shutdown(self) -> None:
        self._call("supervisor.shutdown")


#: The process group of every model worker on a node (``[group:models]`` in its config).
NODE_GROUP: Final = "models"


class TwiddlerClient(SupervisorClient):
    """A node's supervisord over HTTP with a username and password.

    Workers are programs of the group ``models``, added and removed at runtime with the
    ``supervisor_twiddler`` RPC interface: their whole entry travels in the call.
    """

    def __init__(self, url: str, username: str, password: str, timeout: float = 10.0) -> None:
        super().__init__("", timeout)
        parts = urlsplit(url)
        self.where = f"{parts.scheme}://{parts.netloc}"
        self._url = f"{self.where}/RPC2"
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._authorization = f"Basic {token}"

    def _proxy(self, timeout: float) -> tuple[xmlrpc.client.ServerProxy, xmlrpc.client.Transport]:
        transport = _HttpTransport(timeout, self._authorization)
        return xmlrpc.client.ServerProxy(self._url, transport=transport), transport

    def qualified(self, name: str) -> str:
        return f"{NODE_GROUP}:{name}"

    def add_program(self, name: str, options: dict[str, str] | None = None) -> None:
        """Add a program with the given entry options (a stale one of that name is replaced)."""
        with self._config_lock:
            try:
                self._call("twiddler.addProgramToGroup", NODE_GROUP, name, options or {})
            except UnknownProgram:  # BAD_NAME: a program of that name exists
                self._forget(name)
                self._call("twiddler.addProgramToGroup", NODE_GROUP, name, options or {})

    def remove_program(self, name: str) -> None:
        with self._config_lock:
            self._forget(name)

    def _forget(self, name: str) -> None:
        try:
            # Its automatic log files would stay behind, one pair per load: empty them first.
            self._call("supervisor.clearProcessLogs", self.qualified(name))
        except SupervisorError:
            pass
        try:
            self._call("twiddler.removeProcessFromGroup", NODE_GROUP, name)
        except UnknownProgram:
            pass


class _AlreadyStarted(SupervisorError):
    pass


class _NotRunning(SupervisorError):
    pass


class _AlreadyAdded(SupervisorError):
    pass


def _fault_error(method: str, args: tuple[Any, ...], fault: xmlrpc.client.Fault) -> SupervisorError:
    what = f"{method}{args!r}: {fault.faultString}"
    code = fault.faultCode
    if code == ALREADY_STARTED:
        return _AlreadyStarted(what)
    if code == NOT_RUNNING:
        return _NotRunning(what)
    if code == ALREADY_ADDED:
        return _AlreadyAdded(what)
    if code == BAD_NAME:
        return UnknownProgram(what)
    if code in (SPAWN_ERROR, NO_FILE, NOT_EXECUTABLE, ABNORMAL_TERMINATION):
        return SpawnError(what)
    return SupervisorError(what)
