"""The modelpool client: find, load and hold models of a modelpool from Python.

    from modelpool import ModelPoolClient

    client = ModelPoolClient("http://127.0.0.1:8050")
    with client.lease("qwen2.5-coder:7b", seconds=600, holder="architect-1") as endpoint:
        ...  # an OpenAI base URL, e.g. http://127.0.0.1:8053/v1, held for the task

Needs only ``requests``; ``openai()`` also needs the ``openai`` package.
"""

from modelpool.client import ModelPoolClient
from modelpool.errors import (
    LoadFailed,
    ModelNotFound,
    ModelPoolError,
    NoCapacity,
    PoolUnavailable,
)

__all__ = [
    "LoadFailed",
    "ModelNotFound",
    "ModelPoolClient",
    "ModelPoolError",
    "NoCapacity",
    "PoolUnavailable",
]
