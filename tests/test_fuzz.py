"""Property-based fuzzing of every operation against our own OpenAPI document (schemathesis).

Each operation gets up to MAX_EXAMPLES generated requests, valid and invalid; every answer must
not be a server error, must use a status code the document declares, and must match the
declared schema and content type.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.main import create_app
from service.settings import Settings

MAX_EXAMPLES = 260  # x 4 POST operations (the GETs take no input): over 1000 a run

# Schemathesis drives ASGI apps through Starlette's TestClient, which warns about httpx here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings()))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_every_operation_survives_generated_requests(case):
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
    )
