"""``modelpool chat MODEL [PROMPT]``: talk to a model through the front door, like ``ollama run``.

With a prompt: one answer, streamed to stdout. Without: an interactive chat with history,
answers streamed as their tokens arrive; ``/bye`` or Ctrl-D leaves, ``/clear`` forgets the
conversation, Ctrl-C stops an answer. A COLD model is loaded first, with its progress shown.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO
from urllib.parse import quote

import requests

SERVING = ("HOT", "COOLING")
HELP = "/bye or Ctrl-D leaves, /clear forgets the conversation, Ctrl-C stops an answer"


class ChatError(Exception):
    """Something the user has to hear about (the message says what)."""


class Chat:
    """A conversation with one model over the control plane's HTTP API."""

    def __init__(
        self,
        url: str,
        model: str,
        headers: dict[str, str] | None = None,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.headers = headers or {}
        self.out, self.err = out, err
        self.session = requests.Session()
        self.session.trust_env = False  # the control plane is local: no proxy in between
        self.history: list[dict[str, str]] = []

    def _get(self, path: str) -> requests.Response:
        try:
            return self.session.get(self.url + path, headers=self.headers, timeout=30)
        except requests.ConnectionError:
            raise ChatError(f"the control plane is not reachable at {self.url}") from None

    def ensure_loaded(self, timeout: float = 600) -> None:
        """Load the model if it is not serving, showing its state until it is."""
        path = f"/models/{quote(self.model, safe=':@+')}"
        resp = self._get(path)
        if resp.status_code == 404:
            raise ChatError(f"unknown model {self.model!r} (modelpool status lists the models)")
        state = resp.json().get("state")
        if state in SERVING:
            return
        self.session.post(
            self.url + path + "/load", json={"wait": False}, headers=self.headers, timeout=30
        )
        started = time.monotonic()
        tty = self.err.isatty()
        while True:
            model = self._get(path).json()
            elapsed = time.monotonic() - started
            line = f"loading {self.model}: {model['state']} {elapsed:.1f} s"
            self.err.write(("\r" + line) if tty else line + "\n")
            self.err.flush()
            if model["state"] in SERVING:
                self.err.write("\n" if tty else "")
                return
            if model["state"] == "FAILED":
                raise ChatError(f"{self.model} failed to load: {model.get('last_error')}")
            if elapsed > timeout:
                raise ChatError(f"{self.model} is still {model['state']} after {timeout:g} s")
            time.sleep(0.2 if tty else 0.5)

    def ask(self, prompt: str) -> str:
        """Send ``prompt`` after the history; print the answer as it streams; return it."""
        self.history.append({"role": "user", "content": prompt})
        pieces: list[str] = []
        try:
            for piece in self._stream(self.history):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        except ChatError:
            self.history.pop()  # not answered: not part of the conversation
            raise
        finally:
            self.out.write("\n")
            self.out.flush()
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def _stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True}
        try:
            resp = self.session.post(
                self.url + "/v1/chat/completions",
                json=body,
                headers=self.headers,
                stream=True,
                timeout=(10, 600),
            )
        except requests.ConnectionError:
            raise ChatError(f"the control plane is not reachable at {self.url}") from None
        with resp:
            if resp.status_code != 200:
                raise ChatError(f"HTTP {resp.status_code}: {_message(resp)}")
            for line in resp.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(str(event["error"].get("message", event["error"])))
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece


def _message(resp: requests.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text.strip()[:300]


def interactive(chat: Chat, read: Callable[[str], str] = input) -> int:
    """The read-answer loop; returns the exit code."""
    chat.err.write(f"chatting with {chat.model} ({HELP})\n")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            chat.out.write("\n")
            return 0
        except KeyboardInterrupt:
            chat.out.write("\nUse Ctrl-D or /bye to leave.\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/clear":
            chat.history.clear()
            chat.err.write("conversation cleared\n")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            chat.err.write(HELP + "\n")
            continue
        try:
            chat.ask(text)
        except ChatError as exc:
            chat.err.write(f"error: {exc}\n")


def run(url: str, model: str, prompt: str | None, headers: dict[str, str]) -> int:
    chat = Chat(url, model, headers)
    try:
        chat.ensure_loaded()
        if prompt is not None:
            chat.ask(prompt)
            return 0
    except ChatError as exc:
        print(f"modelpool chat: {exc}", file=sys.stderr)
        return 1
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    return interactive(chat)
