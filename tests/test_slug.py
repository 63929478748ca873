from __future__ import annotations

import re

import pytest

from controlplane.core.slug import program_name, slug

SAFE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

HOSTILE = [
    "x]\ncommand=/bin/sh -c 'touch /tmp/pwned'",
    "%(here)s",
    "model]",
    "../../etc/passwd",
    "a" * 5000,
    "",
    ":::",
    "UPPER:Case/Path.v1",
    "qwen2.5-coder:7b",
    "library/llama3.1:8b",
    "emoji-😀",
]


@pytest.mark.parametrize("model_id", HOSTILE)
def test_slug_is_always_safe(model_id: str) -> None:
    name = program_name(model_id)
    assert SAFE.match(name), name
    assert len(name) < 64
    assert "\n" not in name and "%" not in name and "/" not in name and ":" not in name


def test_slug_is_readable_and_unique() -> None:
    assert slug("qwen2.5-coder:7b").startswith("qwen2.5-coder-7b-")
    # Same readable part, different ids: the hash keeps them apart.
    assert slug("qwen2.5-coder:7b") != slug("qwen2.5-coder/7b")
    assert slug("a") == slug("a")
