"""The OpenAPI document of the control API (controlplane/openapi.yaml).

It must be valid OpenAPI 3.0, list exactly the routes the Flask app serves, name every field the
API answers with, and describe what a live stack really answers: schemathesis generates requests
from it (examples, boundary values and random data, valid and invalid, single calls and linked
sequences) and runs every check it has on each answer, as ``schemathesis run --checks all``
does, with a bounded number of examples and a fixed seed. Where the server validates a value,
the server and the document are also compared directly on values at the edges of each rule.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jsonschema_rs
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky
from schemathesis.checks import CHECKS, is_check_class, load_all_checks, max_response_time
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.meta import CoverageScenario
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
    use_after_free,
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
#: Generated requests per operation (and per phase), with a fixed seed: bounded and repeatable.
EXAMPLES = 30
#: The slowest answer expected: a load with ``wait`` ends within load_timeout_seconds.
MAX_RESPONSE_SECONDS = SETTINGS["load_timeout_seconds"] + 20
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


def documented_schema(path: str) -> dict[str, Any]:
    """A schema of the document by its path under components/schemas (``Settings/bind_host``)."""
    node: Any = load_document()["components"]["schemas"]
    for part in path.split("/"):
        node = node["properties"][part] if "properties" in node else node[part]
    return dict(node)


def documented(schema: dict[str, Any], value: Any) -> bool:
    """Whether the document accepts ``value`` (OpenAPI 3.0 is draft 4 plus ``nullable``)."""
    if value is None and schema.get("nullable"):
        return True
    plain = {k: v for k, v in schema.items() if k not in ("nullable", "example", "description")}
    return bool(jsonschema_rs.Draft4Validator(plain).is_valid(value))


def server_accepts(check: Callable[[Any], Any], value: Any, key: str) -> bool:
    """Whether a validator of the server accepts ``value`` (a ConfigError naming ``key`` if not)."""
    from controlplane.settings import ConfigError

    try:
        check(value)
    except ConfigError as exc:
        assert str(exc).startswith(key), str(exc)
        return False
    return True


#: Strings at the edges of the patterns: spaces the regex dialects disagree on (U+001C is a
#: space to Python, not to ECMA-262; U+FEFF the other way round), a final newline (Python's `$`
#: lets it through), the empty string.
EDGE_TEXTS = ["", "a", "0.0.0.0", "::1", "my-host.lan", "localhost\n", "host name", "h\x1cst",
              "h\ufeffst", "h\x85st", "h\u3000st", "/", "/x", "/x y", "/x\x1c", "/x\ufeff",
              "/x\n", "/x\u2028", "http://h", "https://h:1/p", "http://", "http:// h",
              "http://\x1ch", "http://\ufeffh", "ftp://h", "h/x", "h:1"]  # fmt: skip


def test_bind_host_empty_is_a_400_as_the_document_says() -> None:
    """bind_host "" (and a final newline) is refused by both sides; pure parsing, no stack."""
    from controlplane.settings import parse_settings

    schema = documented_schema("SettingsPatch/bind_host")
    for text in EDGE_TEXTS:
        ok = server_accepts(lambda v: parse_settings({"bind_host": v}), text, "bind_host")
        assert ok == documented(schema, text), f"bind_host {text!r}: server says {ok}"
    with pytest.raises(ValueError, match=r"bind_host: '' is not an IP address or host name"):
        parse_settings({"bind_host": ""})


def test_paths_and_urls_are_read_as_the_document_reads_them() -> None:
    """Each path and URL setting accepts exactly what its pattern does; pure parsing."""
    from controlplane.settings import parse_entry, parse_settings

    port_free = {"control_port": 1}  # outside any port range a URL could imply
    cases: list[tuple[str, Callable[[Any], Any]]] = [
        ("public_paths", lambda v: parse_settings({"public_paths": [v]})),
        ("service_registry_paths",
         lambda v: parse_settings({"service_registry_paths": {"register": v}})),
        ("ollama_base_url", lambda v: parse_settings({"ollama_base_url": v, **port_free})),
        ("service_registry_url", lambda v: parse_settings({"service_registry_url": v})),
    ]  # fmt: skip
    schemas = {
        "public_paths": documented_schema("SettingsPatch/public_paths/items"),
        "service_registry_paths": documented_schema("RegistryPaths/register"),
        "ollama_base_url": documented_schema("SettingsPatch/ollama_base_url"),
        "service_registry_url": documented_schema("SettingsPatch/service_registry_url"),
    }
    for key, check in cases:
        for text in EDGE_TEXTS:
            ok = server_accepts(check, text, key)
            assert ok == documented(schemas[key], text), f"{key} {text!r}: server says {ok}"
    upstream = documented_schema("ModelEntryFields/upstream_url")
    for text in EDGE_TEXTS:
        entry = {"model_id": "m", "backend": "openai", "upstream_url": text}
        ok = server_accepts(parse_entry, entry, "model.upstream_url")
        # Empty: allowed by the pattern, refused by the rule that backend openai needs one.
        assert ok == (documented(upstream, text) and text != ""), f"upstream_url {text!r}"


def test_settings_bounds_are_the_documents() -> None:
    """Every documented maximum and minimum of a setting is where the server's bound is."""
    from controlplane.settings import parse_settings

    patch = load_document()["components"]["schemas"]["SettingsPatch"]["properties"]
    # Keys sent along, so that a bound is not hidden by a rule between keys.
    companions: dict[str, dict[str, Any]] = {
        "min_ttl_minutes": {"max_ttl_minutes": 525600},
        "max_ttl_minutes": {"min_ttl_minutes": 0},
        "control_port": {"port_range": {"start": 20000, "end": 20010}},
    }

    def setting(key: str) -> Callable[[Any], Any]:
        return lambda v: parse_settings({key: v, **companions.get(key, {})})

    for key, schema in patch.items():
        for bound, step in (("maximum", 1), ("minimum", -1)):
            if bound not in schema:
                continue
            limit = schema[bound]
            beyond = limit + step * max(1, abs(limit) * 0.01)
            if schema.get("type") == "integer":
                beyond = int(limit + step)
            assert server_accepts(setting(key), limit, key), f"{key}: {limit} refused"
            refused = not server_accepts(setting(key), beyond, key)
            assert refused, f"{key}: {beyond} is past the documented {bound} {limit}"
        # And the other way round: a bound of the server is a bound of the document.
        if schema.get("type") in ("number", "integer") and "maximum" not in schema:
            huge = 10**12
            assert server_accepts(setting(key), huge, key), f"{key}: undocumented maximum"


def test_model_ids_are_read_as_the_document_reads_them() -> None:
    """A model id is valid for the server exactly when the document's pattern says so."""
    from controlplane.validate import validate_model_id

    schema = documented_schema("ModelEntryFields/model_id")
    samples = ["load", "m/load", "m/loads", "a/health", "health/x", "a/extend-ttl", "a/unload",
               "qwen2.5-coder:7b", "library/llama3.1:8b", "a//b", "a/../b", "..", "a/..", "-a",
               "a b", "a" * 200, "a" * 201, ""]  # fmt: skip
    for text in samples:
        ok = server_accepts(validate_model_id, text, "model_id")
        assert ok == documented(schema, text), f"model_id {text!r}: server says {ok}"


def test_front_door_documents_only_parameters_the_worker_knows() -> None:
    """Each /v1 request field of the document is an OpenAI parameter the worker knows."""
    from model_service import params

    schemas = load_document()["components"]["schemas"]
    for name, kind in (
        ("ChatCompletionRequest", "chat"),
        ("CompletionRequest", "completions"),
        ("EmbeddingRequest", "embeddings"),
    ):
        fields = set(schemas[name]["properties"]) - {"model", params.INPUTS[kind]}
        assert fields <= params.KNOWN[kind], f"{name}: {fields - params.KNOWN[kind]}"
        assert schemas[name]["additionalProperties"] is True  # OpenAI's other parameters


# --- the app on its own: methods --------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A test client of the control plane's app, built without starting the pool."""
    from controlplane.app import create_app
    from controlplane.configstore import ConfigStore
    from controlplane.service import PoolService

    root = Path(tempfile.mkdtemp(prefix="mp-oa-", dir="/tmp"))
    try:
        (root / "config").mkdir()
        yield create_app(PoolService(ConfigStore(root / "config"), root / "run")).test_client()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_405_answers_carry_allow(client: Any) -> None:
    """TRACE /health is a 405 with the methods /health takes (RFC 9110); routing only."""
    resp = client.open("/health", method="TRACE")
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert resp.json["error"]["code"] == "method_not_allowed"
    assert "TRACE is not allowed on /health" in resp.json["error"]["message"]


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/models/m/load", "OPTIONS, POST"),
        ("/models/library/llama3.1:8b/load", "OPTIONS, POST"),
        ("/models/m/health", "GET, HEAD, OPTIONS"),
        ("/models/register", "OPTIONS, POST"),
        ("/models/library/llama3.1:8b", "DELETE, GET, HEAD, OPTIONS, PUT"),
        ("/config", "GET, HEAD, OPTIONS, PATCH"),
    ],
)
def test_options_on_a_model_action_lists_only_its_methods(
    client: Any, path: str, allow: str
) -> None:
    """/models/<path:model_id> also matches m/load: OPTIONS and 405 list the path's own route.

    Routing only (no pool, no stack), so the answer is the same every time.
    """
    assert client.open(path, method="OPTIONS").headers["Allow"] == allow
    resp = client.open(path, method="TRACE")
    assert (resp.status_code, resp.headers["Allow"]) == (405, allow)


def test_get_on_a_model_action_is_a_405_not_an_unknown_model(client: Any) -> None:
    """GET /models/m/load was routed to GET /models/<id> (404 "model 'm/load'"); routing only."""
    resp = client.get("/models/m/load")
    assert (resp.status_code, resp.headers["Allow"]) == (405, "OPTIONS, POST")


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
    from controlplane.configstore import ConfigStore
    from controlplane.service import PoolService

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


def test_load_timeout_null_means_the_default(stack: Stack) -> None:
    """{"timeout": null} is documented and answered as no timeout given (load_timeout_seconds).

    Deterministic: the stand-in loads in 0.2 s, far inside the 10 s default.
    """
    assert documented(documented_schema("LoadRequest/timeout"), None)
    assert documented(documented_schema("DrainRequest/timeout"), None)
    resp = stack.post("/models/tiny:1b/load", {"wait": True, "timeout": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] in ("HOT", "COOLING")


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
                "max_response_time": MAX_RESPONSE_SECONDS,
            },
        }
    ),
    # POST /drain unloads every model and refuses loads until the control plane restarts:
    # every later request would only see the stack shutting down.
).exclude(method="POST", path="/drain")

load_all_checks()
#: Every check schemathesis has (``--checks all``), and the response time limit above. The
#: stateful ones (use_after_free, ensure_resource_availability) act in test_live_stack_workflows.
ALL_CHECKS = [c for c in CHECKS.get_all() if not is_check_class(c)] + [max_response_time]

#: Rules between fields (or between a field and the stack's state) that JSON Schema cannot
#: state: the document says them in prose, and a request that breaks one is a 400 naming it.
#: A schema-valid request answered 400 is a failure unless its message names one of these.
CROSS_FIELD_RULES: dict[tuple[str, str], tuple[str, ...]] = {
    ("PATCH", "/config"): (
        r"^max_ttl_minutes: \S+ is below min_ttl_minutes ",
        r"^control_port: \d+ is inside port_range ",
        r"^port_range\.end: \d+ is below port_range\.start ",
        r"^warmup_models\[\d+\]: .* is not in the registry$",
        r"^models\[\d+\]\.port: \d+ is outside port_range ",
        r"^local_node: false needs at least one entry in nodes$",
        r"^nodes\[\d+\]\.(name|url): .* is already node \d+$",
        r"^nodes\[\d+\]\.port_range\.end: \d+ is below nodes\[\d+\]\.port_range\.start ",
        r"^models\[\d+\]\.nodes\[\d+\]: .* is not a node ",
    ),
    ("POST", "/models/register"): (
        r"^models\[\d+\]\.port: \d+ is (outside port_range|already pinned by) ",
        r"^model\.schedule\[\d+\]\.end: .* equals start: the window is empty$",
        r"^model\.replicas\.min: \d+ is above max \d+$",
        r"^models\[\d+\]\.nodes\[\d+\]: .* is not a node ",
    ),
    ("PUT", "/models/{model_id}"): (
        r"^model\.model_id: .* differs from the path's ",
        r"^models\[\d+\]\.port: \d+ is (outside port_range|already pinned by) ",
        r"^model\.schedule\[\d+\]\.end: .* equals start: the window is empty$",
        r"^model\.replicas\.min: \d+ is above max \d+$",
        r"^models\[\d+\]\.nodes\[\d+\]: .* is not a node ",
    ),
    # What a model honours depends on its backend (the front door's descriptions say so).
    **{
        ("POST", path): (
            r"^\S+: unknown parameter for /v1/",
            r"^\S+: .* is not supported by (this model's|the \w+) backend",
            r": Ollama takes images as data: URLs only$",
            r"^prompt: .*one prompt per request",
            r"does not embed: register it with model_type: embedding",
        )
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
    },
}

#: What the control plane and the worker check of a front door request before the model's
#: backend sees it (the rest of each value is the backend's to check, as the document says):
#: a request outside these is rejected by modelpool itself, whatever the backend.
_MODEL = {"type": "string", "minLength": 1}
_COMMON = {"stream": {"type": "boolean"}, "max_tokens": {"type": ["integer", "null"], "minimum": 1}}
WORKER_CHECKS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": _MODEL,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"type": "string"}},
                },
            },
            **_COMMON,
        },
    },
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": _MODEL,
            "prompt": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
            },
            **_COMMON,
        },
    },
    "/v1/embeddings": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": _MODEL,
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string"}},
                ]
            },
        },
    },
}


#: Requests whose only fault is their Content-Type: the API reads a body as JSON whatever the
#: header says (the document says so: `curl -d` sends application/x-www-form-urlencoded).
CONTENT_TYPE_SCENARIOS = (
    CoverageScenario.MALFORMED_CONTENT_TYPE,
    CoverageScenario.UNSUPPORTED_CONTENT_TYPE,
)


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def excused_checks(case: Any, response: requests.Response) -> list[Any]:
    """The checks a documented rule JSON Schema cannot state excuses for this answer.

    positive_data_acceptance, when a schema-valid request broke a rule the document states in
    prose (CROSS_FIELD_RULES); negative_data_rejection, when a request was invalid only in its
    Content-Type, or a front door request the model's backend accepted was invalid only in
    values the document leaves to the backend (WORKER_CHECKS).
    """
    meta = case.meta
    if meta is None:
        return []
    op = (case.method.upper(), case.path)
    if meta.generation.mode.is_positive:
        rules = CROSS_FIELD_RULES.get(op, ())
        message = _error_message(response) if response.status_code == 400 else ""
        if message and any(re.search(r, message) for r in rules):
            return [positive_data_acceptance]
        return []
    scenario = getattr(meta.phase.data, "scenario", None)
    if scenario in CONTENT_TYPE_SCENARIOS and response.status_code < 300:
        return [negative_data_rejection]  # a body is read as JSON whatever its Content-Type
    contract = WORKER_CHECKS.get(case.path)
    accepted = response.status_code < 300
    if (
        contract is not None
        and accepted
        and isinstance(case.body, dict)
        and jsonschema_rs.Draft4Validator(contract).is_valid(case.body)
    ):
        return [negative_data_rejection]
    return []


def restore_config(stack: Stack, original: dict[str, Any], patch: dict[str, Any]) -> None:
    """Put the settings back after a PATCH /config that ``patch`` made (and that succeeded)."""
    key = patch.get("api_key")
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


def delete_model(stack: Stack, model_id: str) -> None:
    """Delete a registration, waiting out a load in progress (a 409 while WARMING)."""
    url = f"{stack.url}/models/{quote(model_id, safe='')}"

    def deleted() -> bool:
        code = requests.delete(url, timeout=REQUEST_TIMEOUT).status_code
        assert code in (200, 404, 409), f"could not delete {model_id!r}: HTTP {code}"
        return code != 409

    wait_until(deleted, timeout=SETTINGS["load_timeout_seconds"] + 20, interval=0.2)


def reset_entry(stack: Stack, entry: dict[str, Any]) -> None:
    """Put one of MODELS back as it was: replaced if present, registered again if deleted."""
    resp = stack.request("PUT", f"/models/{quote(entry['model_id'], safe='')}", entry)
    if resp.status_code == 404:
        resp = stack.post("/models/register", entry)
    assert resp.status_code in (200, 201), f"could not restore {entry['model_id']!r}: {resp.text}"


def restore(stack: Stack, original: dict[str, Any], case: Any, status: int) -> None:
    """Undo what a generated request changed for good, so that each request meets the same stack.

    Settings, registrations and deletions are persisted: left in place, a random patch (a port
    range without free ports, a far-away Ollama URL) or a random warmup entry would make every
    later request slow or fail for reasons of its own.
    """
    op = (case.method.upper(), case.path)
    body = case.body if isinstance(case.body, dict) else {}
    if op == ("PATCH", "/config") and status == 200:
        restore_config(stack, original, body)
    elif op == ("POST", "/models/register") and status == 201:
        delete_model(stack, body["model_id"])
    elif op in (("DELETE", "/models/{model_id}"), ("PUT", "/models/{model_id}")) and status == 200:
        for entry in MODELS:
            if entry["model_id"] == unquote(case.path_parameters["model_id"]):
                reset_entry(stack, entry)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
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
    """Examples, coverage and fuzzing (valid and invalid requests) of each operation."""
    if case.path == "/openapi.json" and served_document is None:
        pytest.skip("the app does not serve /openapi.json yet")
    response = case.call(base_url=stack.url, timeout=REQUEST_TIMEOUT)
    try:
        case.validate_response(
            response, checks=ALL_CHECKS, excluded_checks=excused_checks(case, response)
        )
    finally:
        restore(stack, original_config, case, response.status_code)


class Workflow(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences of calls along the links schemathesis infers (register -> get -> delete, ...).

    This is where the stateful checks act: a deleted model must be gone (use_after_free), a
    registered one must be there (ensure_resource_availability). Settings are put back after
    each call; the registry is put back after each sequence, so that a deletion stays visible
    to the calls after it.
    """

    stack: Stack
    original: dict[str, Any]
    #: What the checks found, kept apart from what Hypothesis reports (see the test below).
    failures: list[FailureGroup] = []

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"base_url": self.stack.url, "timeout": REQUEST_TIMEOUT}

    def validate_response(
        self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
    ) -> None:
        excused = excused_checks(case, response)
        if self.registered_again(case):
            excused.append(use_after_free)
        try:
            case.validate_response(
                response,
                checks=ALL_CHECKS,
                excluded_checks=excused,
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )
        except FailureGroup as exc:
            Workflow.failures.append(exc)
            raise
        finally:
            body = case.body if isinstance(case.body, dict) else {}
            if (case.method.upper(), case.path) == ("PATCH", "/config") and response.ok:
                restore_config(self.stack, self.original, body)

    def registered_again(self, case: Any) -> bool:
        """Whether this sequence registered the case's model again after deleting it.

        use_after_free counts a resource as created again only by a call on its own path (or a
        prefix of it); a model is created by POST /models/register, which is neither.
        """
        model_id = unquote(str((case.path_parameters or {}).get("model_id", "")))
        deleted = False
        for step in self.recorder.find_all_cases():
            if step.id == case.id:
                break
            resp = self.recorder.find_response(case_id=step.id)
            if resp is None or not 200 <= resp.status_code < 300:
                continue
            op = (step.method.upper(), step.path)
            params = step.path_parameters or {}
            if op == ("DELETE", "/models/{model_id}") and unquote(params["model_id"]) == model_id:
                deleted = True
            body = step.body if isinstance(step.body, dict) else {}
            if deleted and op == ("POST", "/models/register") and body.get("model_id") == model_id:
                return True
        return False

    def teardown(self) -> None:
        known = {m["model_id"] for m in MODELS}
        for model in self.stack.get("/models").json()["models"]:
            if model["model_id"] not in known:
                delete_model(self.stack, model["model_id"])
        for entry in MODELS:
            reset_entry(self.stack, entry)


def test_live_stack_workflows(stack: Stack, original_config: dict[str, Any]) -> None:
    """The stateful phase of ``schemathesis run --checks all``, bounded and with a fixed seed."""
    Workflow.stack = stack
    Workflow.original = original_config
    Workflow.failures = []
    try:
        Workflow.run(
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=6,
                derandomize=True,
                deadline=None,
                database=None,
                phases=[Phase.generate],  # no replay: a live stack does not answer twice alike
                suppress_health_check=list(HealthCheck),
            )
        )
    except Flaky:
        # The rules a sequence can take depend on the stack's answers (a model loading or not
        # yet), which Hypothesis calls flaky generation; as schemathesis's own runner does,
        # that fails the test only where a check failed.
        if Workflow.failures:
            raise Workflow.failures[0] from None


def test_every_schemathesis_check_runs() -> None:
    """The live tests run every check schemathesis registers (its `--checks all`), not a subset."""
    names = {c.__name__ for c in ALL_CHECKS}
    assert names == set(CHECKS.get_all_names()) | {"max_response_time"}
    assert {"unsupported_method", "allow_header_conformance", "negative_data_rejection"} <= names
