"""The OpenAPI document of the control API (controlplane/openapi.yaml).

It must be valid OpenAPI 3.0, list exactly the routes the Flask app serves, name every field the
API answers with, and describe what a live stack really answers: schemathesis generates requests
from it (examples, boundary values and random data, valid and invalid) and checks each answer.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

from tests.stack import Stack, wait_until

DOCUMENT = Path(__file__).resolve().parent.parent / "controlplane" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

#: Names the Ollama stand-in knows; the third id has a namespace, as Ollama's library ids do.
MODELS: list[dict[str, Any]] = [
    {"model_id": "tiny:1b", "backend": "ollama"},
    {"model_id": "qwen2.5-coder:7b", "backend": "ollama"},
    {"model_id": "library/llama3.1:8b", "backend": "ollama", "upstream_model": "llama3.1:8b"},
]
SETTINGS = {"load_timeout_seconds": 10, "graceful_shutdown_seconds": 1}
#: Documented in the document, served by a route that is being added to the app.
PENDING_ROUTES = {("GET", "/openapi.json")}
REQUEST_TIMEOUT = 60.0


def load_document() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return doc


def documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def schema_properties(doc: dict[str, Any], name: str) -> set[str]:
    schema = doc["components"]["schemas"][name]
    props = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        sub = resolve(doc, part["$ref"]) if "$ref" in part else part
        props |= set(sub.get("properties", {}))
    return props


# --- the document on its own ------------------------------------------------------------------


def test_document_is_valid_openapi_3() -> None:
    doc = load_document()
    assert doc["openapi"] == "3.0.3"
    errors = [f"{e.instance_path}: {e.message}" for e in OPENAPI_30_VALIDATOR.iter_errors(doc)]
    assert not errors, "\n".join(errors)
    # What the meta-schema does not check: references resolve, templated path parameters are
    # declared, operation ids are unique, security names a declared scheme.
    for node in walk(doc):
        ref = node.get("$ref")
        if isinstance(ref, str):
            resolve(doc, ref)
    op_ids: list[str] = []
    schemes = set(doc["components"]["securitySchemes"])
    for path, item in doc["paths"].items():
        shared = [resolve(doc, p["$ref"]) if "$ref" in p else p for p in item.get("parameters", [])]
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            op_ids.append(op["operationId"])
            params = shared + [
                resolve(doc, p["$ref"]) if "$ref" in p else p for p in op.get("parameters", [])
            ]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == set(re.findall(r"{([^}]+)}", path)), f"{method} {path}"
            for requirement in op.get("security", doc["security"]):
                assert set(requirement) <= schemes, f"{method} {path}: {requirement}"
    assert len(op_ids) == len(set(op_ids)), "operationId used twice"
    # schemathesis reads every operation of it.
    loaded = schemathesis.openapi.from_dict(doc)
    labels = []
    for result in loaded.get_all_operations():
        labels.append(result.ok().label)
    assert len(labels) == len(documented_operations(doc))


# --- a live stack -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack(MODELS, SETTINGS)


@pytest.fixture(scope="module")
def original_config(stack: Stack) -> dict[str, Any]:
    """The settings the stack started with (restored after each PATCH /config)."""
    resp = stack.get("/config")
    assert resp.status_code == 200, resp.text
    config: dict[str, Any] = resp.json()
    assert config["api_key"] == "", "the restore below needs a stack without an API key"
    return config


def test_routes_match_document(stack: Stack) -> None:
    """Every route of the app is documented, and every documented operation is a route."""
    from controlplane.app import create_app
    from controlplane.service import PoolService
    from controlplane.settings import ConfigStore

    # The app of the stack's own config, built without starting anything (a run dir of its
    # own: the live stack's files are left alone).
    run_dir = Path(tempfile.mkdtemp(prefix="mp-oa-", dir="/tmp"))
    try:
        app = create_app(PoolService(ConfigStore(stack.config_dir), run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    routes = set()
    for rule in app.url_map.iter_rules():
        # Static files, and the operator web page (blueprint "ui": HTML, not the API).
        if rule.endpoint.split(".")[-1] == "static" or rule.endpoint.startswith("ui."):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes |= {(m, path) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    documented = documented_operations(load_document())
    assert not routes - documented, f"routes missing from the document: {routes - documented}"
    missing = documented - routes - PENDING_ROUTES
    assert not missing, f"documented operations the app does not serve: {missing}"


def test_every_answered_field_is_documented(stack: Stack) -> None:
    """The document names exactly the fields the API answers with (schemas allow extra ones)."""
    doc = load_document()
    stack.load("tiny:1b")
    model = stack.model("tiny:1b")
    assert set(model) == schema_properties(doc, "Model")
    assert set(stack.get("/health").json()) == schema_properties(doc, "Health")
    assert set(stack.get("/config").json()) == schema_properties(doc, "Settings")
    health = stack.get("/models/tiny:1b/health").json()
    assert set(health) == schema_properties(doc, "ModelHealth")
    assert set(health["worker"]) <= schema_properties(doc, "WorkerHealth")
    listed = stack.get("/v1/models").json()["data"]
    assert set(listed[0]) == schema_properties(doc, "OpenAIModel")
    ttl = stack.post("/models/tiny:1b/extend-ttl", {"minutes": 1}).json()
    assert set(ttl) == schema_properties(doc, "ExtendTtlResult")


@pytest.fixture(scope="module")
def served_document(stack: Stack) -> dict[str, Any] | None:
    """The document the stack serves at /openapi.json (None while the app does not serve it)."""
    resp = requests.get(stack.url + "/openapi.json", timeout=10)
    if resp.status_code == 404:
        return None
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def test_served_document_is_this_file(served_document: dict[str, Any] | None) -> None:
    """GET /openapi.json serves this file, so the live test below checks what clients read."""
    if served_document is None:
        pytest.skip("the app does not serve /openapi.json yet")

    def unserved(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k != "servers"}  # may name the serving host

    assert unserved(served_document) == unserved(load_document())


# The cases are generated from the file at import time (a schema loaded from a fixture,
# schemathesis.pytest.from_fixture, fails on pytest 9.2: it sets Function._nodeid, which pytest
# no longer has); test_served_document_is_this_file shows the stack serves the same document.
schema = schemathesis.openapi.from_path(
    DOCUMENT,
    config=SchemathesisConfig.from_dict(
        {
            "request-timeout": REQUEST_TIMEOUT,
            "checks": {
                # 503 (no capacity, load failed, shutting down) and 504 (load timeout) are
                # answers this API documents for states of the pool; the other checks verify
                # their body and Retry-After. 500, 502 and any other 5xx remain failures.
                "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
            },
        }
    ),
    # POST /drain unloads every model and refuses loads until the control plane restarts:
    # every later request would only see the stack shutting down.
).exclude(method="POST", path="/drain")

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def restore(stack: Stack, original: dict[str, Any], case: Any, status: int) -> None:
    """Undo what a generated request changed for good, so that each request meets the same stack.

    Settings, registrations and deletions are persisted: left in place, a random patch (a port
    range without free ports, a far-away Ollama URL) or a random warmup entry would make every
    later request slow or fail for reasons of its own.
    """
    op = (case.method.upper(), case.path)
    body = case.body if isinstance(case.body, dict) else {}
    if op == ("PATCH", "/config") and status == 200:
        key = body.get("api_key")
        # As bytes: a key that is not ASCII is sent as its UTF-8 encoding.
        token = b"Bearer " + key.encode() if isinstance(key, str) and key else None
        headers = {"Authorization": token} if token else {}
        resp = requests.patch(stack.url + "/config", json=original, headers=headers, timeout=30)
        assert resp.status_code == 200, (
            f"could not restore the settings (HTTP {resp.status_code}): PATCH /config accepted "
            f"api_key {key!r}, which no client can send back as a bearer token"
            if resp.status_code in (400, 401)
            else f"could not restore the settings: {resp.text}"
        )
    elif op == ("POST", "/models/register") and status == 201:
        model_id = body["model_id"]
        url = f"{stack.url}/models/{quote(model_id, safe='')}"

        def deleted() -> bool:
            code = requests.delete(url, timeout=REQUEST_TIMEOUT).status_code
            assert code in (200, 409), f"could not delete {model_id!r}: HTTP {code}"
            return code == 200

        wait_until(deleted, timeout=SETTINGS["load_timeout_seconds"] + 20, interval=0.2)
    elif op == ("DELETE", "/models/{model_id}") and status == 200:
        for entry in MODELS:
            if entry["model_id"] == unquote(case.path_parameters["model_id"]):
                resp = stack.post("/models/register", entry)
                assert resp.status_code == 201, f"could not register again: {resp.text}"


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_live_stack_conforms(
    case: Any,
    stack: Stack,
    original_config: dict[str, Any],
    served_document: dict[str, Any] | None,
) -> None:
    if case.path == "/openapi.json" and served_document is None:
        pytest.skip("the app does not serve /openapi.json yet")
    response = case.call(base_url=stack.url, timeout=REQUEST_TIMEOUT)
    try:
        case.validate_response(response, checks=CHECKS)
    finally:
        restore(stack, original_config, case, response.status_code)
