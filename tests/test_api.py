"""The service's surface as the contract (docs/api.md) describes it: the variant listing,
liveness, the offline docs, the OpenAPI document, and the form of a 200 answer."""

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.contract import DEFAULTS, IMPLEMENTATIONS, SECTIONS, VARIANTS

# Fields the service may add beyond API.md, accepted by every variant.
OPTIONAL_COMMON = {"decimals", "include", "parameters", "attention_mask"}
INPUTS = {"embeddings", "text"}

E4 = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]]  # T 3, d_in 4


@pytest.fixture(scope="module")
async def listing(client) -> dict[str, dict[str, Any]]:
    response = await client.get("/attention")
    assert response.status_code == 200, response.text
    return {variant["name"]: variant for variant in response.json()}


@pytest.fixture(scope="module")
async def openapi(client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


# ---------------------------------------------------------------------------------------------
# GET /attention


async def test_the_listing_has_the_variants_in_book_order(client):
    response = await client.get("/attention")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert [variant["name"] for variant in response.json()] == list(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
async def test_each_listed_variant_says_what_it_is_and_where(listing, name):
    variant = listing[name]

    assert variant["book_section"] == SECTIONS[name]
    assert variant["path"] == f"/attention/{name}"
    assert isinstance(variant["description"], str) and len(variant["description"]) > 10
    assert "\n" not in variant["description"].strip(), "a one-line description"


@pytest.mark.parametrize("name", VARIANTS)
async def test_each_listed_variant_has_its_parameters_with_their_defaults(listing, name):
    parameters = listing[name]["parameters"]

    defaults = {
        parameter: info["default"] if isinstance(info, dict) else info
        for parameter, info in parameters.items()
    }
    expected = DEFAULTS[name]
    assert set(defaults) - OPTIONAL_COMMON == set(expected)
    for parameter, default in expected.items():
        assert defaults[parameter] == default, parameter
        assert type(defaults[parameter]) is type(default), parameter  # 0.0 not 0, 123 not "123"


@pytest.mark.parametrize("name", VARIANTS)
async def test_each_listed_variant_has_its_implementations_default_first(listing, name):
    implementations = listing[name]["implementations"]

    names = [item["name"] if isinstance(item, dict) else item for item in implementations]
    assert names == IMPLEMENTATIONS[name]
    if names:
        assert [item.get("default") for item in implementations] == [True] + [False] * (
            len(names) - 1
        )


async def test_the_listed_book_classes(listing):
    classes = {
        name: {item["name"]: item["book_class"] for item in variant["implementations"]}
        for name, variant in listing.items()
    }

    assert classes["self-attention"] == {"v2": "SelfAttention_v2", "v1": "SelfAttention_v1"}
    assert classes["multi-head"] == {
        "fused": "MultiHeadAttention",
        "wrapper": "MultiHeadAttentionWrapper",
    }


# ---------------------------------------------------------------------------------------------
# GET /healthz


async def test_healthz(client):
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------
# GET /docs, offline


def referenced_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


async def test_docs_is_html_referencing_only_local_assets(client):
    response = await client.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "SwaggerUIBundle" in html
    urls = referenced_urls(html)
    assert any(url.endswith(".js") for url in urls) and any(url.endswith(".css") for url in urls)
    for url in urls:
        assert urlsplit(url).netloc in ("", "testserver"), f"/docs loads {url} from another host"
    for match in re.findall(r"https?://[^\s\"'<>)]+", html):
        assert urlsplit(match).netloc == "testserver", f"/docs mentions {match}"
    for cdn in ("cdn.jsdelivr", "unpkg.com", "cdnjs", "fonts.googleapis"):
        assert cdn not in html


async def test_docs_assets_are_served(client):
    html = (await client.get("/docs")).text

    for url in referenced_urls(html):
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], url
        if url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css"), url
            # a stylesheet that imports fonts from the network would break offline too
            assert not re.search(r"url\(\s*['\"]?https?:", asset.text), url
            assert "@import" not in asset.text, url


async def test_docs_bundle_is_swagger_ui_5(client):
    html = (await client.get("/docs")).text
    [bundle] = [url for url in referenced_urls(html) if url.endswith("swagger-ui-bundle.js")]

    source = (await client.get(bundle)).text

    match = re.search(r'PACKAGE_VERSION\s*:\s*"(\d+)\.(\d+)\.(\d+)"', source)
    assert match, "no Swagger UI version string in the bundle"
    assert int(match.group(1)) == 5, match.group(0)


async def test_docs_points_at_the_served_openapi_document(client):
    html = (await client.get("/docs")).text

    match = re.search(r"""url\s*:\s*['"]([^'"]+)['"]""", html)
    assert match, html
    assert (await client.get(match.group(1))).status_code == 200


# ---------------------------------------------------------------------------------------------
# /openapi.json


async def test_openapi_is_3_1(openapi):
    assert openapi["openapi"].startswith("3.1.")
    assert openapi["info"]["title"]


def operation(openapi: dict[str, Any], name: str) -> dict[str, Any]:
    return openapi["paths"][f"/attention/{name}"]["post"]


def request_schema(openapi: dict[str, Any], name: str) -> dict[str, Any]:
    return operation(openapi, name)["requestBody"]["content"]["application/json"]["schema"]


def properties(openapi: dict[str, Any], name: str) -> dict[str, Any]:
    """Every field the body's branches list, with its schema in the first branch listing it."""
    fields: dict[str, Any] = {}
    for branch in request_schema(openapi, name)["oneOf"]:
        for field, schema in branch["properties"].items():
            fields.setdefault(field, schema)
    return fields


def non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a nullable field has beside null."""
    (value,) = [option for option in schema.get("anyOf", [schema]) if option != {"type": "null"}]
    return value


async def test_openapi_has_one_post_per_variant(openapi):
    attention_paths = {path for path in openapi["paths"] if path.startswith("/attention/")}

    assert attention_paths - {"/attention/compare"} == {f"/attention/{name}" for name in VARIANTS}
    for name in VARIANTS:
        assert list(openapi["paths"][f"/attention/{name}"]) == ["post"]
    assert "get" in openapi["paths"]["/attention"]
    assert "get" in openapi["paths"]["/healthz"]


@pytest.mark.parametrize("name", VARIANTS)
async def test_openapi_request_schema_lists_only_the_variants_fields(openapi, name):
    schema = request_schema(openapi, name)

    fields = set(properties(openapi, name))
    assert fields - OPTIONAL_COMMON == INPUTS | set(DEFAULTS[name])
    for branch in schema["oneOf"]:
        assert branch.get("additionalProperties") is False, "unknown fields are a 422"
    assert operation(openapi, name)["requestBody"].get("required") is True


async def test_openapi_request_schemas_differ_where_the_variants_do(openapi):
    assert "seed" not in properties(openapi, "simplified")
    assert "d_out" not in properties(openapi, "simplified")
    assert "num_heads" in properties(openapi, "multi-head")
    assert "num_heads" not in properties(openapi, "causal")
    assert "dropout" not in properties(openapi, "self-attention")
    assert "implementation" not in properties(openapi, "causal")
    implementation = properties(openapi, "multi-head")["implementation"]
    assert set(non_null(implementation)["enum"]) == {"fused", "wrapper"}
    assert implementation["default"] == "fused"


@pytest.mark.parametrize("name", VARIANTS)
async def test_openapi_has_examples_for_every_variant(openapi, name):
    content = operation(openapi, name)["requestBody"]["content"]["application/json"]

    examples = content.get("examples") or {}
    assert examples, f"no examples for {name}"
    for example in examples.values():
        assert example.get("summary")
        assert "embeddings" in example["value"] or "text" in example["value"]


@pytest.mark.parametrize("name", VARIANTS)
async def test_openapi_examples_work(client, openapi, name):
    """ "Try it out" with each example answers 200."""
    content = operation(openapi, name)["requestBody"]["content"]["application/json"]

    for key, example in content["examples"].items():
        response = await client.post(f"/attention/{name}", json=example["value"])
        assert response.status_code == 200, (key, response.text)


@pytest.mark.parametrize("name", VARIANTS)
async def test_openapi_documents_200_413_and_422(openapi, name):
    responses = operation(openapi, name)["responses"]

    assert {"200", "413", "422"} <= set(responses), sorted(responses)
    assert "application/json" in responses["200"]["content"]


@pytest.mark.parametrize("name", VARIANTS)
async def test_openapi_names_the_book_section(openapi, name):
    op = operation(openapi, name)

    assert SECTIONS[name] in op.get("summary", "") + op.get("description", "")


# ---------------------------------------------------------------------------------------------
# A 200 answer


@pytest.mark.parametrize("name", VARIANTS)
async def test_a_valid_request_answers_json(client, name):
    response = await client.post(f"/attention/{name}", json={"embeddings": E4})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0].strip() == "application/json"
    body = response.json()
    assert body["variant"] == name
    assert {"attention_weights", "context_vectors", "config"} <= set(body)
    assert "tokens" not in body or body["tokens"] is None


@pytest.mark.parametrize(
    ("name", "request_fields", "expected"),
    [
        ("simplified", {}, {"d_in": 4, "d_out": 4}),
        (
            "self-attention",
            {},
            {"d_in": 4, "d_out": 4, "seed": 123, "qkv_bias": False, "implementation": "v2"},
        ),
        (
            "self-attention",
            {"d_out": 2, "seed": 789, "implementation": "v1"},
            {"d_in": 4, "d_out": 2, "seed": 789, "qkv_bias": False, "implementation": "v1"},
        ),
        (
            "causal",
            {},
            {"d_in": 4, "d_out": 4, "seed": 123, "dropout": 0.0, "qkv_bias": False},
        ),
        (
            "causal",
            {"d_out": 3, "dropout": 0.25, "qkv_bias": True},
            {"d_in": 4, "d_out": 3, "seed": 123, "dropout": 0.25, "qkv_bias": True},
        ),
        (
            "multi-head",
            {},
            {
                "d_in": 4,
                "d_out": 4,
                "num_heads": 2,
                "head_dim": 2,
                "seed": 123,
                "dropout": 0.0,
                "qkv_bias": False,
                "implementation": "fused",
            },
        ),
        (
            "multi-head",
            {"d_out": 3, "num_heads": 3, "implementation": "wrapper"},
            {"d_in": 4, "d_out": 3, "num_heads": 3, "head_dim": 3, "implementation": "wrapper"},
        ),
    ],
    ids=["simplified", "sa-defaults", "sa-v1", "causal-defaults", "causal-set", "mh", "wrapper"],
)
async def test_config_reports_the_resolved_values(client, name, request_fields, expected):
    response = await client.post(f"/attention/{name}", json={"embeddings": E4, **request_fields})

    assert response.status_code == 200, response.text
    config = response.json()["config"]
    for key, value in expected.items():
        assert config[key] == value, (key, config)
        assert type(config[key]) is type(value), (key, config)


async def test_config_of_text_input_reports_the_embedding_parameters(client):
    response = await client.post(
        "/attention/causal",
        json={"text": "Your journey starts with one step", "embedding_dim": 8, "d_out": 2},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert [token["text"] for token in body["tokens"]] == [
        "Your",
        " journey",
        " starts",
        " with",
        " one",
        " step",
    ]
    config = body["config"]
    assert config["d_in"] == 8 and config["d_out"] == 2
    assert config["embedding_dim"] == 8
    assert config["context_length"] == 1024
    assert config["embedding_seed"] == 123
