"""docs/api.md and the OpenAPI document describe the same native API: every path, its status
codes, every request field and its default appear in both; and the page points at nothing
outside the repository."""

import re
from pathlib import Path
from typing import Any

import pytest

from attention import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
NATIVE = re.compile(r"^/(?!v2\b)")  # the Open Inference Protocol's /v2 is docs/protocol.md's


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of every table row under `heading` (up to the next heading), header and
    separator rows left out."""
    section = markdown.split(f"\n{heading}\n", 1)[1]
    section = re.split(r"\n#+ ", section, maxsplit=1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return [row for row in rows if row[0] not in ("method and path", "field", "form", "status")]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.fixture(scope="module")
def markdown() -> str:
    return API_MD.read_text()


@pytest.fixture(scope="module")
def document(app) -> dict[str, Any]:
    return app.openapi()


def documented_paths(markdown: str) -> dict[tuple[str, str], set[int]]:
    """(method, path) -> status codes, from the Paths table."""
    paths = {}
    for row in table_rows(markdown, "## Paths"):
        statuses = {int(code) for code in re.findall(r"\d{3}", row[2])}
        for span in code_spans(row[0]):
            method, path = span.split(" ", 1)
            if NATIVE.match(path):
                paths[(method, path)] = statuses
    return paths


def operations(document: dict[str, Any]) -> dict[tuple[str, str], set[int]]:
    return {
        (method.upper(), path): {int(status) for status in operation["responses"]}
        for path, methods in document["paths"].items()
        if NATIVE.match(path)
        for method, operation in methods.items()
    }


def test_every_path_of_the_document_is_in_the_page_with_its_status_codes(markdown, document):
    documented = documented_paths(markdown)

    for operation, statuses in operations(document).items():
        assert operation in documented, f"{operation} is not in docs/api.md"
        assert documented[operation] == statuses, operation


async def test_every_path_of_the_page_is_served(markdown, client, document):
    """Those the OpenAPI document leaves out (the playground, the docs) are routes all the
    same: none answers 404 or 405."""
    for method, path in documented_paths(markdown):
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code not in (404, 405), (method, path, response.status_code)
        if path not in ("/", "/docs", "/openapi.json"):
            assert (method, path) in operations(document), f"{path} is not in the document"


def request_fields(document: dict[str, Any]) -> dict[str, Any]:
    """Every request field of the native operations, with its schema where it takes values."""
    fields: dict[str, Any] = {}
    for path, methods in document["paths"].items():
        body = methods.get("post", {}).get("requestBody")
        if body is None or not NATIVE.match(path):
            continue
        for branch in body["content"]["application/json"]["schema"]["oneOf"]:
            for name, schema in branch["properties"].items():
                if schema.get("type") != "null":  # a field that does not apply to the branch
                    fields.setdefault(name, schema)
    return fields


def documented_fields(markdown: str) -> dict[str, str]:
    """field -> its default column ("" for the inputs), from the Request body's tables and
    compare's own field."""
    fields = {}
    for row in table_rows(markdown, "## Request body"):
        names = code_spans(row[0])
        if len(row) == 4 and names:  # the parameters table: field, default, applies, meaning
            fields[names[0]] = row[1]
        elif len(row) == 3 and names and row[0].startswith("`") and " " not in names[0]:
            fields[names[0]] = ""
    compare = API_MD.read_text().split("\n## Compare\n", 1)[1].split("\n## ", 1)[0]
    fields.update({name: "" for name in re.findall(r"plus\s+`(\w+)`", compare)})
    return fields


def test_every_request_field_is_in_both(markdown, document):
    in_document = set(request_fields(document))
    in_page = set(documented_fields(markdown))

    assert in_document - in_page == set(), "fields missing from docs/api.md"
    assert in_page - in_document == set(), "fields docs/api.md has that the document lacks"


def test_the_defaults_agree(markdown, document):
    """Where the page writes a default as a value (not a rule such as `d_in`)."""
    schemas = request_fields(document)
    literals = {"true": True, "false": False, "none": None}
    checked = 0
    for name, default in documented_fields(markdown).items():
        value: Any = literals.get(default)
        if value is None and re.fullmatch(r"-?\d+(\.\d+)?", default):
            value = float(default) if "." in default else int(default)
        if value is None and default != "none":
            continue
        assert schemas[name].get("default") == value, (name, default, schemas[name])
        checked += 1
    assert checked >= 10, checked


def markdown_links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_pages_link_only_inside_the_repository_and_what_is_there(page):
    for link in markdown_links(page.read_text()):
        assert not re.match(r"[a-z]+:", link), f"{page.name} links outside: {link}"
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.is_relative_to(ROOT), f"{page.name}: {link}"
        assert target.exists(), f"{page.name} links {link}, which is not there"


def test_the_readme_links_the_contract():
    assert "](docs/api.md)" in README.read_text()


def test_the_contract_names_no_address_but_loopback(markdown):
    urls = re.findall(r"[a-z]+://[^\s)`'\"]+", markdown)

    assert [url for url in urls if not re.match(r"http://127\.0\.0\.1[:/]", url)] == []


def test_the_openapi_document_points_nowhere_else(document):
    text = str(document)

    assert re.findall(r"https?://", text) == []


PROTOCOL_MD = ROOT / "docs" / "protocol.md"


def protocol_path(path: str) -> str:
    """A /v2 path of the document as docs/protocol.md writes it: any model `{model}`, the one
    version optional (`[/versions/1]`)."""
    path = re.sub(r"^/v2/models/[^/]+", "/v2/models/{model}", path)
    return re.sub(r"/versions/(\{model_version\}|1)", "[/versions/1]", path)


def test_every_protocol_path_and_parameter_of_the_document_is_in_its_page(document):
    page = PROTOCOL_MD.read_text()
    documented = {span for row in table_rows(page, "## Endpoints") for span in code_spans(row[0])}
    for path, methods in document["paths"].items():
        if not path.startswith("/v2"):
            continue
        for method in methods:
            expected = f"{method.upper()} {protocol_path(path)}"
            # A path shown with its optional version covers the path without it.
            assert expected in documented or expected.replace("[/versions/1]", "") in {
                span.replace("[/versions/1]", "") for span in documented
            }, expected
    for name in VARIANTS:
        schema = document["paths"][f"/v2/models/{name}/infer"]["post"]["requestBody"]
        parameters = schema["content"]["application/json"]["schema"]["properties"]["parameters"]
        for parameter in parameters["properties"]:
            assert f"`{parameter}`" in page, (name, parameter)
