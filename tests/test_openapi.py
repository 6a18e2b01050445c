"""deploy/openapi.yaml: a valid OpenAPI document, the JSON the ingress serves is the
same document, and it describes exactly the routes the ingress registers."""

import json
from pathlib import Path

import schemathesis
import yaml
from aiohttp.test_utils import make_mocked_request

from pipeline import config
from pipeline.ingress import app as ingress

from .conftest import EXAMPLE_CONFIG

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "deploy" / "openapi.yaml").read_text())


def operations(spec: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }


def registered() -> set[tuple[str, str]]:
    app = ingress.build_app(config.load(EXAMPLE_CONFIG))
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        # aiohttp adds HEAD to every GET; "*" is the JSON 404 of every other path
        if route.method not in ("HEAD", "*")
    }


def test_the_served_json_is_the_yaml_document():
    served = json.loads((ROOT / "pipeline" / "ingress" / "openapi.json").read_text())
    assert served == SPEC, "run `make openapi` after editing deploy/openapi.yaml"


def test_the_document_is_valid_openapi():
    schema = schemathesis.openapi.from_dict(SPEC)
    found = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert found == operations(SPEC)


def test_every_route_is_described_and_every_description_is_a_route():
    routes, described = registered(), operations(SPEC)
    assert routes - described == set(), "routes missing from deploy/openapi.yaml"
    assert described - routes == set(), "described but not served"
    for method, path in described:
        responses = SPEC["paths"][path][method.lower()]["responses"]
        errors = [code for code in responses if code >= "400"]
        for code in errors:  # every error body is JSON {error, detail}
            content = (
                responses[code].get("content")
                or SPEC["components"]["responses"]["Error"]["content"]
            )
            assert "application/json" in content, (method, path, code)


async def test_the_ingress_serves_it_as_json():
    app = ingress.build_app(config.load(EXAMPLE_CONFIG))
    response = await ingress.openapi(make_mocked_request("GET", "/openapi.json", app=app))
    assert response.content_type == "application/json"
    assert json.loads(response.body) == SPEC
