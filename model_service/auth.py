"""The bearer-token check shared by the control plane and the workers."""

from __future__ import annotations

import hmac
import logging
import os
import threading

log = logging.getLogger("modelpool.auth")


def bearer_ok(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries ``key`` as a bearer token (constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].encode(), key.encode())


class KeySource:
    """The API key a worker requires, re-read from its key file whenever the file changes.

    The control plane rewrites the file (atomically) when ``api_key`` changes, so a rotated key
    reaches running workers without a reload of their model, and the old key stops working at
    the next request. Without a file, the key given at start is used.
    """

    def __init__(self, path: str = "", fixed: str = "") -> None:
        self.path = path
        #: None until the key file was read once: a worker that cannot read it refuses
        #: requests rather than serve them without a key.
        self._key: str | None = None if path else fixed
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def get(self) -> str | None:
        """The key in force ("" = no auth), or None if the key file was never readable."""
        if not self.path:
            return self._key
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._seen is not None:
                log.warning("key file %s is unreadable (%s); keeping the last key", self.path, exc)
                self._seen = None
            return self._key
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._seen:
            with self._lock:
                try:
                    with open(self.path, encoding="utf-8") as fh:
                        self._key = fh.read().strip()
                    self._seen = stamp
                except OSError as exc:
                    log.warning("reading key file %s failed: %s", self.path, exc)
        return self._key
