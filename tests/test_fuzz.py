"""Schema-driven fuzzing of the whole API: schemathesis reads the server's own OpenAPI document
and sends valid and invalid bodies, paths and query strings to every route of a real server on
loopback (two tenants, each with a deployed adapter). No answer may be a 5xx, none may take past
its deadline, and each must match what the document declares for it (status code, content type,
body schema); bodies the schema forbids must be refused with a 4xx."""

from __future__ import annotations

import collections

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.failures import FailureGroup

from tests.conftest import two_tenant_server

pytestmark = pytest.mark.slow
DEADLINE_S = 60.0  # a request to the tiny model that takes longer than this has hung
EXAMPLES = 20  # per route and mode
# An upload's rows must be training examples, which its schema (a file) cannot say: a
# schema-valid upload of random bytes is rightly refused.
EXCLUDED = {"POST /v1/files": [positive_data_acceptance]}
COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def fuzzed(tiny_model, tmp_path_factory):
    with two_tenant_server(tiny_model, tmp_path_factory.mktemp("fuzz"), max_body_bytes=64 * 1024,
                           max_tokens_limit=32, worker=False) as srv:
        yield srv
    print("\nschemathesis cases per route:")
    for route, n in sorted(COUNTS.items()):
        print(f"  {n:4d}  {route}")


def test_every_route_holds_to_its_document(fuzzed):
    """Each operation, valid bodies then invalid ones: a failure on one route is recorded and
    the others still run, so one run reports every route that breaks its document."""
    api = schemathesis.openapi.from_url(fuzzed["url"] + "/openapi.json")
    headers = {"Authorization": f"Bearer {fuzzed['keys']['acme']}"}
    session, failures, routes = requests.Session(), [], []
    for result in api.get_all_operations():
        operation = result.ok()
        route = f"{operation.method.upper()} {operation.path}"
        if operation.path == "/metrics":  # Prometheus text, not part of the API contract
            continue
        routes.append(route)
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            def fuzz(case):
                COUNTS[route] += 1
                case.call_and_validate(session=session, headers=headers, timeout=DEADLINE_S,
                                       excluded_checks=EXCLUDED.get(route, []))

            try:
                fuzz()
            except Unsatisfiable:  # no parameters or body to make invalid (GET /v1/models)
                assert mode is GenerationMode.NEGATIVE, route
            except (AssertionError, FailureGroup) as exc:  # reported together below
                failures.append(f"{route} ({mode.value}): {exc}")
    assert len(routes) >= 25  # the document lists the whole API
    assert all(COUNTS[r] > 0 for r in routes)
    assert not failures, "\n\n".join(failures)
