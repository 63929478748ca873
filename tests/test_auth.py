"""The workers' API key: read from the pool's key file, re-read when it changes."""

from __future__ import annotations

import os
from pathlib import Path

from controlplane.configstore import atomic_write
from model_service.auth import KeySource, bearer_ok


def test_bearer() -> None:
    assert bearer_ok("Bearer k", "k")
    assert not bearer_ok("Bearer k2", "k") and not bearer_ok(None, "k") and not bearer_ok("k", "k")


def test_fixed_key_without_a_file() -> None:
    assert KeySource("", "k").get() == "k"
    assert KeySource().get() == ""


def test_a_rewritten_key_file_is_seen_at_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "api_key"
    atomic_write(path, "k1")
    keys = KeySource(str(path))
    assert keys.get() == "k1"
    atomic_write(path, "k2")  # a new inode: seen even within the same mtime tick
    assert keys.get() == "k2"
    atomic_write(path, "")
    assert keys.get() == ""


def test_a_key_file_never_read_fails_closed(tmp_path: Path) -> None:
    """A worker that cannot read its key file must not serve without a key."""
    keys = KeySource(str(tmp_path / "missing"))
    assert keys.get() is None
    atomic_write(tmp_path / "missing", "k")
    assert keys.get() == "k"
    os.unlink(tmp_path / "missing")
    assert keys.get() == "k"  # once known, a vanished file keeps the last key
