"""Which OpenAI request parameters a backend honours: a parameter it cannot honour is a 400
that names it, never silently dropped.

Pure: the worker checks a request against its backend's ``supports`` set before it calls the
backend. A parameter sent with its neutral value (``n: 1``, ``logprobs: false``, ...) asks for
nothing and passes everywhere; ``user``, ``metadata``, ``store`` and ``service_tier`` describe the
request rather than the generation and are accepted and not forwarded.
"""

from __future__ import annotations

from typing import Any, Final

#: The OpenAI parameters of each endpoint (besides model and the input itself).
CHAT: Final = frozenset(
    {
        "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
        "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias",
        "logprobs", "top_logprobs", "user", "seed", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "functions", "function_call", "metadata",
        "store", "service_tier", "modalities", "audio", "prediction", "reasoning_effort",
        "web_search_options",
    }
)  # fmt: skip
COMPLETIONS: Final = frozenset(
    {
        "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "seed",
        "suffix", "echo", "best_of",
    }
)  # fmt: skip
EMBEDDINGS: Final = frozenset({"encoding_format", "dimensions", "user"})
INPUTS: Final = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
KNOWN: Final = {"chat": CHAT, "completions": COMPLETIONS, "embeddings": EMBEDDINGS}
#: Accepted by every backend and not forwarded: they do not change the answer.
DESCRIPTIVE: Final = frozenset({"user", "metadata", "store", "service_tier"})
#: Values that ask for nothing (the API's defaults).
NEUTRAL: Final[dict[str, tuple[Any, ...]]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "parallel_tool_calls": (True,),
    "logit_bias": ({},),
    "tool_choice": ("auto",),
    "stream": (False, True),
    "encoding_format": ("float",),
}


def unsupported(kind: str, body: dict[str, Any], supports: frozenset[str]) -> str | None:
    """The error message for the first parameter of ``body`` the backend cannot honour."""
    known = KNOWN[kind]
    for key, value in body.items():
        if key in ("model", INPUTS[kind]) or value is None:
            continue
        if key not in known:
            return f"{key}: unknown parameter for /v1/{_path(kind)}"
        if key in supports or key in DESCRIPTIVE:
            continue
        if key in NEUTRAL and any(value == v and type(value) is type(v) for v in NEUTRAL[key]):
            continue
        return f"{key}: {value!r} is not supported by this model's backend"
    return None


def _path(kind: str) -> str:
    return {"chat": "chat/completions", "completions": "completions"}.get(kind, kind)
