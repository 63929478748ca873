"""Which request parameters a backend honours (model_service.params, pure)."""

from __future__ import annotations

import pytest

from model_service.params import unsupported

OLLAMA_LIKE = frozenset({"stream", "temperature", "tools", "tool_choice"})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"model": "m", "messages": [], "temperature": 0.1}, None),
        ({"messages": [], "n": 1, "logprobs": False, "parallel_tool_calls": True}, None),
        ({"messages": [], "user": "u", "metadata": {"a": "b"}, "store": False}, None),
        ({"messages": [], "top_p": None}, None),  # null asks for nothing
        ({"messages": [], "n": 2}, "n: 2 is not supported by this model's backend"),
        ({"messages": [], "n": True}, "n: True is not supported"),  # not the integer 1
        ({"messages": [], "logprobs": True}, "logprobs: True is not supported"),
        ({"messages": [], "top_p": 0.5}, "top_p: 0.5 is not supported"),
        ({"messages": [], "bogus": 1}, "bogus: unknown parameter for /v1/chat/completions"),
    ],
)
def test_chat(body: dict[str, object], error: str | None) -> None:
    got = unsupported("chat", body, OLLAMA_LIKE)
    assert (got is None) if error is None else (got is not None and got.startswith(error))


def test_completions_and_embeddings() -> None:
    assert (
        unsupported("completions", {"prompt": "x", "echo": False, "best_of": 1}, frozenset())
        is None
    )
    assert unsupported("completions", {"prompt": "x", "echo": True}, frozenset()) is not None
    assert unsupported("completions", {"prompt": "x", "tools": []}, frozenset()) is not None
    assert (
        unsupported("embeddings", {"input": "x", "encoding_format": "float"}, frozenset()) is None
    )
    assert "dimensions" in (
        unsupported("embeddings", {"input": "x", "dimensions": 3}, frozenset()) or ""
    )
