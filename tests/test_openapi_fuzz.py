"""schemathesis against the running API's OpenAPI document: no generated request gets a 500.

Each operation gets Hypothesis-generated requests (schemathesis strategies; driven here rather than
through its pytest plugin, which does not support pytest 9 yet). Requests carry an admin token, so
they reach the handlers rather than stopping at the 401 check; a second pass goes without one.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.stack


def _fuzz(api_url: str, headers: dict[str, str], examples: int, check) -> list[str]:  # noqa: ANN001
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        if operation.path == "/api/v1/live/sse":
            continue  # an endless stream by design; tests/test_ops_api.py covers it and its 401/404

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case) -> None:  # noqa: ANN001
            response = case.call(headers=headers, timeout=30)
            check(case, response)

        try:
            run()
        except AssertionError as exc:
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 15, "the OpenAPI document lost operations"
    return failures


def test_no_server_error_on_any_generated_request(pipeline, admin_token):
    def check(case, response) -> None:  # noqa: ANN001
        assert response.status_code < 500, (case.method, case.formatted_path, case.query, case.body, response.text)

    assert _fuzz(pipeline.api_url, {"Authorization": f"Bearer {admin_token}"}, 20, check) == []


def test_without_a_token_no_operation_answers_with_data(pipeline):
    def check(case, response) -> None:  # noqa: ANN001
        assert response.status_code < 500, (case.method, case.formatted_path, response.text)
        if case.path.startswith("/api/v1"):
            assert response.status_code in (401, 422), (case.method, case.formatted_path, response.status_code)

    assert _fuzz(pipeline.api_url, {}, 5, check) == []
