"""The bearer-token check shared by the control plane and the workers."""

from __future__ import annotations

import hmac


def bearer_ok(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries ``key`` as a bearer token (constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].encode(), key.encode())
