"""The OpenAI backend: a pass-through to any OpenAI-compatible server (vLLM, llama.cpp server,
LM Studio, another Ollama's ``/v1``).

The upstream owns the model's memory and lifetime; this backend only renames the model in each
request and relays the answer. Streams are relayed chunk by chunk as they arrive.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from model_service.backends import ClosingStream, sse_error
from model_service.backends.base import BackendError, BackendUnavailable, Result
from model_service.relay import Relay, WorkerProxy, WorkerUnreachable
from model_service.spec import WorkerSpec

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 5.0
#: A non-streamed answer arrives only once the whole generation is done, so reads may be slow.
READ_TIMEOUT: Final = 600.0
#: Each readiness probe during load.
PROBE_TIMEOUT: Final = (2.0, 10.0)


def upstream_root(url: str) -> str:
    """The upstream's base URL without a trailing ``/`` or ``/v1``."""
    return url.strip().rstrip("/").removesuffix("/v1").rstrip("/")


def _short_reason(exc: Exception) -> str:
    # requests wraps the socket error in several layers; the errno text is what a reader needs.
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text


class OpenAIBackend:
    """One model served by an OpenAI-compatible upstream at ``spec.upstream_url``.

    Requests go to ``{upstream}/v1/...`` with ``model`` set to ``spec.backend_model``; answers
    come back with ``model`` set to ``spec.model_id`` (streamed chunks are relayed untouched).
    ``spec.options["api_key"]``, if set, is sent as a bearer token. Memory is the registry's
    estimate (``spec.memory_mb``): the upstream does not report it.
    """

    name: str = "openai"

    def __init__(self, spec: WorkerSpec, session: requests.Session | None = None) -> None:
        self.spec = spec
        self.base_url = upstream_root(spec.upstream_url)
        if not self.base_url:
            raise BackendError(
                f"upstream_url: empty for model {spec.model_id!r}; the openai backend needs the "
                "upstream's base URL, e.g. http://127.0.0.1:8000",
                status=500,
                type="configuration_error",
                code="bad_spec",
            )
        self._session = session or requests.Session()
        if session is None:
            # Upstreams are local servers: a proxy from the environment must not sit in between.
            self._session.trust_env = False
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=64)
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)
        api_key = spec.options.get("api_key")
        self._headers = {"Content-Type": "application/json"}
        if isinstance(api_key, str) and api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Plain http upstreams (the usual local server) are served over a pool of kept-alive
        # http.client connections: about half a millisecond less per request than requests.
        url = urlsplit(self.base_url)
        self._fast: tuple[str, int, str] | None = None
        if url.scheme == "http" and url.hostname and session is None:
            self._fast = (url.hostname, url.port or 80, url.path.rstrip("/"))
        self._proxy = WorkerProxy(timeout=READ_TIMEOUT)

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Wait until the upstream lists its models (servers answer 503 while they load)."""
        url = self.base_url + "/v1/models"
        deadline = time.monotonic() + self.spec.load_timeout_seconds
        pause = 0.1
        while True:
            try:
                with self._session.get(url, timeout=PROBE_TIMEOUT) as response:
                    if response.ok:
                        return
                    last = f"HTTP {response.status_code}: {response.text.strip()[:200]}"
                    if 400 <= response.status_code < 500:
                        # A wrong URL or key does not fix itself by waiting.
                        raise BackendError(
                            f"OpenAI-compatible upstream at {self.base_url} refused "
                            f"GET /v1/models: {last}",
                            status=502,
                            code="upstream_refused",
                        )
            except requests.RequestException as exc:
                last = _short_reason(exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(
                    f"OpenAI-compatible upstream at {self.base_url} was not ready within "
                    f"{self.spec.load_timeout_seconds:g} s (GET /v1/models: {last})",
                    status=504,
                    type="timeout",
                    code="load_timeout",
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 1.0)

    def unload(self) -> None:
        """Nothing to release: the upstream keeps its model."""

    def load_progress(self) -> float | None:
        return None  # the backend does not say how far a load is

    def memory_mb(self) -> float | None:
        return self.spec.memory_mb

    # -- requests ----------------------------------------------------------------------------

    def chat_completions(self, body: dict[str, Any]) -> Result:
        return self._forward("/v1/chat/completions", body)

    def completions(self, body: dict[str, Any]) -> Result:
        return self._forward("/v1/completions", body)

    def embeddings(self, body: dict[str, Any]) -> Result:
        return self._forward("/v1/embeddings", body)

    def _forward(self, path: str, body: dict[str, Any]) -> Result:
        stream = bool(body.get("stream"))
        if self._fast is not None:
            return self._forward_fast(path, body, stream)
        payload = {**body, "model": self.spec.backend_model}
        try:
            response = self._session.post(
                self.base_url + path,
                json=payload,
                stream=stream,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            )
        except requests.ConnectionError as exc:
            raise BackendUnavailable(
                f"OpenAI-compatible upstream is not reachable at {self.base_url} "
                f"({_short_reason(exc)})"
            ) from exc
        except requests.Timeout as exc:
            raise BackendError(
                f"OpenAI-compatible upstream at {self.base_url} did not answer "
                f"within {READ_TIMEOUT:g} s",
                status=504,
                type="timeout",
                code="backend_timeout",
            ) from exc
        if not 200 <= response.status_code < 300:
            with response:
                return self._error_result(response)
        if stream:
            return Result(
                stream=ClosingStream(self._relay(response), response.close),
                status=response.status_code,
            )
        with response:
            try:
                data = response.json()
            except ValueError:
                data = None
        if not isinstance(data, dict):
            raise BackendError(
                f"OpenAI-compatible upstream at {self.base_url} answered {path} "
                "with something not a JSON object"
            )
        if "model" in data:
            data["model"] = self.spec.model_id
        return Result(json=data, status=response.status_code)

    def _forward_fast(self, path: str, body: dict[str, Any], stream: bool) -> Result:
        assert self._fast is not None
        host, port, prefix = self._fast
        data = self.payload(body)
        try:
            resp, done = self._proxy.send(host, port, "POST", prefix + path, data, self._headers)
        except WorkerUnreachable as exc:
            raise BackendUnavailable(
                f"OpenAI-compatible upstream is not reachable at {self.base_url} ({exc})"
            ) from None
        if stream and 200 <= resp.status < 300:
            return Result(stream=Relay(resp, done, on_error=self.broke), status=resp.status)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            resp.close()
            done(False)
            raise BackendError(
                f"the answer from the OpenAI-compatible upstream at {self.base_url} broke off: "
                f"{exc}"
            ) from None
        done(True)
        return self.answer_from(path, resp.status, raw, resp.reason, resp.getheader("Retry-After"))

    def fast_route(self) -> tuple[str, int, str, dict[str, str]] | None:
        """(host, port, path prefix, headers) of a plain http upstream, which the worker may
        relay to on its event loop (model_service/worker_asgi.py); None if it may not."""
        if self._fast is None:
            return None
        host, port, prefix = self._fast
        return host, port, prefix, self._headers

    def payload(self, body: dict[str, Any]) -> bytes:
        """The request as the upstream gets it: the same, for the upstream's model name."""
        return json.dumps(
            {**body, "model": self.spec.backend_model}, separators=(",", ":")
        ).encode()

    def answer_from(
        self, path: str, status: int, raw: bytes, reason: str, retry: str | None
    ) -> Result:
        """A whole (not streamed) answer of the upstream, as this worker gives it."""
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not 200 <= status < 300:
            text = raw.decode(errors="replace").strip()[:500] or reason or ""
            return self._upstream_error(answer, status, text, retry)
        if not isinstance(answer, dict):
            raise BackendError(
                f"OpenAI-compatible upstream at {self.base_url} answered {path} "
                "with something not a JSON object"
            )
        if "model" in answer:
            answer["model"] = self.spec.model_id
        return Result(json=answer, status=status)

    def _error_result(self, response: requests.Response) -> Result:
        """The upstream's error, passed through; wrapped in the OpenAI shape if not JSON."""
        try:
            data = response.json()
        except ValueError:
            data = None
        text = response.text.strip()[:500] or response.reason or ""
        retry = response.headers.get("Retry-After")
        return self._upstream_error(data, response.status_code, text, retry)

    def _upstream_error(self, data: Any, status: int, text: str, retry: str | None) -> Result:
        """An upstream's error answer passed through; wrapped in the OpenAI shape if it is not
        a JSON object."""
        if not isinstance(data, dict):
            data = {
                "error": {
                    "message": f"OpenAI-compatible upstream at {self.base_url} answered "
                    f"HTTP {status}: {text}",
                    "type": "upstream_error",
                    "code": "upstream_error",
                }
            }
        headers = {"Retry-After": retry} if retry else {}
        return Result(json=data, status=status, headers=headers)

    def broke(self, exc: Exception) -> bytes:
        """The last event of a stream the upstream broke off (blank lines end a half event)."""
        log.warning("stream from %s broke: %s", self.base_url, exc)
        return b"\n\n" + sse_error(
            f"the stream from the OpenAI-compatible upstream at {self.base_url} broke: "
            f"{_short_reason(exc)}",
            type="upstream_error",
            code="upstream_error",
        )

    def _relay(self, response: requests.Response) -> Iterator[bytes]:
        try:
            # chunk_size=None yields each chunk of a chunked body as soon as it arrives.
            for chunk in response.iter_content(chunk_size=None):
                if chunk:
                    yield chunk
        except requests.RequestException as exc:
            yield self.broke(exc)
        finally:
            response.close()
