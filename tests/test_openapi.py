"""The OpenAPI document of the API (formats-and-api.md §3.1: JATOS serves its own at
/openapi.yaml, without sign-in): served as YAML and JSON, structurally valid OpenAPI 3.0, and
unable to drift from the routes the app registers."""

from __future__ import annotations

import json
import re

import pytest
import webtest

import jatos_lite

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def document(client: webtest.TestApp) -> dict:
    return json.loads(client.get("/openapi.json").body)


def resolve(document: dict, node: dict) -> dict:
    """A node, or what its local $ref points to."""
    if "$ref" not in node:
        return node
    target: object = document
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]  # type: ignore[index]
    return target  # type: ignore[return-value]


def operations(document: dict) -> dict[tuple[str, str], dict]:
    return {(path, method): operation for path, item in document["paths"].items()
            for method, operation in item.items() if method in METHODS}


def test_it_is_served_as_yaml_and_as_json_without_signing_in(client: webtest.TestApp) -> None:
    yaml_answer = client.get("/openapi.yaml")
    json_answer = client.get("/openapi.json")
    assert yaml_answer.content_type == "text/yaml"
    assert json_answer.content_type == "application/json"
    assert json.loads(yaml_answer.body) == json.loads(json_answer.body) == json.loads(
        json.dumps(jatos_lite.openapi_document()))


def test_the_json_text_is_yaml_too(client: webtest.TestApp) -> None:
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(client.get("/openapi.yaml").text) == jatos_lite.openapi_document()


def test_it_is_an_openapi_3_document(document: dict) -> None:
    """Version, info, paths; every operation answers; every {name} in a path template is a
    declared, required path parameter, and no other path parameter is declared."""
    assert re.fullmatch(r"3\.0\.\d+", document["openapi"])
    assert document["info"]["title"] and document["info"]["version"] == jatos_lite.API_VERSION
    assert document["paths"]
    assert set(document["components"]["securitySchemes"]) == {"bearerAuth", "adminSession"}
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An API token (jap_...)"}
    for (path, method), operation in operations(document).items():
        assert operation["summary"] and operation["responses"], (path, method)
        assert resolve(document, operation["responses"]["default"])["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorEnvelope"}
        declared = [resolve(document, p) for p in document["paths"][path].get("parameters", [])
                    + operation.get("parameters", [])]
        in_path = [p for p in declared if p["in"] == "path"]
        assert sorted(p["name"] for p in in_path) == sorted(re.findall(r"{(\w+)}", path)), (path, method)
        assert all(p["required"] is True for p in in_path)


def test_the_envelopes_are_shared_components(document: dict) -> None:
    schemas = document["components"]["schemas"]
    assert set(schemas["Envelope"]["properties"]) == {"apiVersion", "message", "data"}
    assert schemas["ErrorEnvelope"]["properties"]["error"]["required"] == ["code", "message"]
    answer = document["paths"]["/jatos/api/v1/admin/token"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Envelope"}


def test_openapi_spec_validator_accepts_it(document: dict) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document)


def test_every_api_route_is_documented_and_every_documented_operation_is_routed(app, document: dict) -> None:
    routed = {(re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.rule), route.method.lower())
              for route in app.routes if route.rule.startswith(jatos_lite.API_PREFIX)}
    documented = set(operations(document))
    assert not routed - documented, "routes missing from the OpenAPI document"
    assert not documented - routed, "documented operations that no route serves"


def test_the_study_log_is_documented_as_served(document: dict) -> None:
    """One example of the detail: the log's parameters with JATOS's defaults and both answers."""
    log = document["paths"]["/jatos/api/v1/studies/{study_id}/log"]["get"]
    parameters = {p["name"]: p for p in (resolve(document, p) for p in log["parameters"])}
    assert parameters["download"]["schema"]["default"] is True
    assert parameters["entryLimit"]["schema"]["default"] == -1
    assert set(log["responses"]["200"]["content"]) == {"application/octet-stream", "application/x-ndjson"}
