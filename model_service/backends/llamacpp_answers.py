"""llama.cpp's answers made OpenAI's: an exact ``max_tokens`` and the usage it implies, tool-call
deltas as OpenAI streams them, pooled embeddings, and numpy numbers as plain ones."""

from __future__ import annotations

import math
from typing import Any


class TokenCap:
    """A logits processor that counts sampled tokens and holds ``max_tokens`` exactly.

    llama-cpp-python keeps generating past ``max_tokens`` while the text ends inside a
    multi-byte UTF-8 character (frequent with a byte-level vocabulary); past the limit this
    forces the end-of-sequence token instead. Its count also gives a stream's usage.
    """

    def __init__(self, max_tokens: int | None, eos: int) -> None:
        self.max_tokens = max_tokens
        self.eos = eos
        self.sampled = 0
        self.forced = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.sampled += 1
        if self.max_tokens is not None and self.sampled > self.max_tokens:
            self.forced = True
            scores[:] = -float("inf")
            scores[self.eos] = 0.0
        return scores

    def usage(self, finish_reason: str | None, n_tokens: int) -> dict[str, int]:
        """Token counts of a finished generation, from the samples and the context size.

        The last sampled token is fed back only if generation went on, so a generation that
        ended on its length leaves one token outside the context; one that ended on the
        end-of-sequence token sampled one token that is not part of the answer.
        """
        by_length = finish_reason == "length" and not self.forced
        completion = self.sampled if by_length else max(0, self.sampled - 1)
        prompt = n_tokens - completion + (1 if by_length else 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def openai_tool_deltas(delta: Any, named: set[int]) -> None:
    """Make llama-cpp-python's tool-call deltas OpenAI's: id, type and name in a call's first
    delta only (it repeats them in every one, and clients concatenate what they get), and no
    legacy ``function_call`` beside ``tool_calls``."""
    if not isinstance(delta, dict) or not delta.get("tool_calls"):
        return
    delta.pop("function_call", None)
    for call in delta["tool_calls"]:
        index = call.get("index", 0)
        if index in named:
            call.pop("id", None)
            call.pop("type", None)
            if isinstance(call.get("function"), dict):
                call["function"].pop("name", None)
        else:
            named.add(index)


def pooled(vector: list[Any]) -> list[float]:
    """One vector per input: a model without a pooling type gives one per token, which are
    averaged (and the mean scaled to unit length, as pooled embeddings are)."""
    if not vector or not isinstance(vector[0], list):
        return vector
    n = len(vector)
    mean = [sum(col) / n for col in zip(*vector, strict=True)]
    norm = math.sqrt(sum(x * x for x in mean)) or 1.0
    return [x / norm for x in mean]


def plain(value: Any) -> Any:
    """The same data with numpy scalars (llama.cpp's logprobs) as plain numbers, for JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    return value
