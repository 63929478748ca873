"""Safe supervisord program names for arbitrary model ids."""

from __future__ import annotations

import hashlib
import re
from typing import Final

PROGRAM_PREFIX: Final = "model-"
_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_MAX_READABLE = 40


def slug(model_id: str) -> str:
    """A name matching ``[a-z0-9][a-z0-9._-]*`` that is unique per model id.

    The readable part is lossy (``qwen2.5-coder:7b`` and ``qwen2.5-coder/7b`` both read
    ``qwen2.5-coder-7b``), so a short hash of the exact id is appended.
    """
    readable = _UNSAFE.sub("-", model_id.lower()).strip("-._")[:_MAX_READABLE].strip("-._")
    digest = hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}" if readable else digest


def program_name(model_id: str) -> str:
    """The supervisord program name of a model's worker."""
    return PROGRAM_PREFIX + slug(model_id)
