"""Tenants kept apart on every route, table-driven over the app's own route list: tenant acme
calls each route with tenant globex's file, job, model, run, dataset version, deployment and
completion ids and must be answered as if they did not exist (404), leaving globex's objects
as they were; routes that take no id must not show acme any of globex's. A route added later
is in the list by default: one whose parameters or body this table does not know fails here
until it is given a row, so no route escapes the check."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from tests.conftest import make_rows, two_tenant_server, write_jsonl

# parameter or body field -> which of the other tenant's objects it names
IDS = {"file_id": "file", "training_file": "file", "validation_file": "file", "job_id": "job",
       "model": "model", "run_id": "run", "a": "run", "b": "run", "version_id": "version",
       "name": "deployment", "completion_id": "completion", "preferred_over": "completion"}
# the body each route is called with ({kind} is replaced by the other tenant's id)
BODIES = {
    "POST /v1/chat/completions": {"model": "{model}", "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "hi"}]},
    "POST /v1/completions": {"model": "{model}", "prompt": "hi", "max_tokens": 2},
    "POST /v1/feedback": {"completion_id": "{completion}", "rating": 1},
    "POST /v1/fine_tuning/jobs": {"model": "{base}", "training_file": "{file}"},
    "POST /v1/tuneloop/deployments/{name}/promote": {"run_id": "{run}", "force": True},
    "POST /v1/tuneloop/files/{file_id}/prepare": {"task": "classify", "name": "stolen"},
}
# routes that name no object: what they answer acme must not mention globex's
UNSCOPED = {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/files", "POST /v1/files",
            "GET /v1/fine_tuning/jobs", "GET /v1/tuneloop/runs", "GET /v1/tuneloop/deployments",
            "GET /v1/tuneloop/datasets", "POST /v1/tuneloop/test_cases"}


@pytest.fixture(scope="module")
def tenants(tiny_model, tmp_path_factory):
    with two_tenant_server(tiny_model, tmp_path_factory.mktemp("tenancy"), worker=False) as srv:
        globex = httpx.Client(base_url=srv["url"], timeout=120,
                              headers={"Authorization": f"Bearer {srv['keys']['globex']}"})
        path = write_jsonl(srv["folder"] / "globex.jsonl", make_rows(24, seed=4))
        with path.open("rb") as f:
            file_id = globex.post("/v1/files", files={"file": f},
                                  data={"purpose": "fine-tune"}).raise_for_status().json()["id"]
        job = globex.post("/v1/fine_tuning/jobs", json={"model": srv["base"],
                                                         "training_file": file_id})
        version = globex.post(f"/v1/tuneloop/files/{file_id}/prepare",
                              json={"task": "classify", "name": "globex-data"})
        completion = globex.post("/v1/chat/completions", json={
            "model": "globex-intents", "max_tokens": 2,
            "messages": [{"role": "user", "content": "i lost my card"}]})
        deployment = globex.get("/v1/tuneloop/deployments").raise_for_status().json()["data"][0]
        ids = {"file": file_id, "job": job.raise_for_status().json()["id"],
               "version": version.raise_for_status().json()["id"],
               "completion": completion.raise_for_status().json()["id"],
               "model": deployment["name"], "deployment": deployment["name"],
               "run": deployment["run"]["id"], "base": srv["base"]}
        acme = httpx.Client(base_url=srv["url"], timeout=120,
                            headers={"Authorization": f"Bearer {srv['keys']['acme']}"})
        yield {"acme": acme, "globex": globex, "ids": ids, "url": srv["url"]}


def _filled(value, ids: dict):
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return ids[value[1:-1]]
    if isinstance(value, dict):
        return {k: _filled(v, ids) for k, v in value.items()}
    return value


def _routes(url: str) -> list[tuple[str, str, dict]]:
    document = httpx.get(url + "/openapi.json").raise_for_status().json()
    return [(method.upper(), path, operation) for path, operations in document["paths"].items()
            for method, operation in operations.items()]


def test_every_route_refuses_another_tenants_ids(tenants):
    ids, acme, checked = tenants["ids"], tenants["acme"], []
    for method, path, operation in _routes(tenants["url"]):
        route = f"{method} {path}"
        params = {p["name"]: p for p in operation.get("parameters", [])}
        named = [n for n in params if n in IDS]
        unknown = [n for n, p in params.items() if n not in IDS and p.get("required")]
        assert not unknown, f"{route}: add its parameters {unknown} to IDS"
        if route in UNSCOPED:
            assert not named, f"{route} names an object: it is not unscoped"
            continue
        has_body = "requestBody" in operation
        assert named or has_body, f"{route}: add it to UNSCOPED or to IDS"
        assert not has_body or route in BODIES, f"{route}: add the body it takes to BODIES"
        values = {n: ids[IDS[n]] for n in named}
        reply = acme.request(method, path.format(**values),
                             params={n: v for n, v in values.items()
                                     if params[n]["in"] == "query"},
                             json=_filled(BODIES[route], ids) if has_body else None)
        assert reply.status_code == 404, f"{route} with globex's ids: {reply.status_code} {reply.text}"
        checked.append(route)
    assert len(checked) >= 20


def test_routes_without_ids_show_nothing_of_another_tenant(tenants):
    acme = tenants["acme"]
    theirs = [v for k, v in tenants["ids"].items() if k != "base"]
    for method, path, _ in _routes(tenants["url"]):
        route = f"{method} {path}"
        if route not in UNSCOPED or method != "GET":
            continue
        text = acme.get(path).raise_for_status().text  # (/metrics: acme's own series)
        assert not [v for v in theirs if v in text], route


def test_the_other_tenants_objects_are_untouched(tenants):
    """Run after the cross-tenant calls above (pytest keeps file order): acme's deletes,
    cancels, promotions, rollbacks and feedback did nothing to globex."""
    globex, ids = tenants["globex"], tenants["ids"]
    assert globex.get(f"/v1/files/{ids['file']}").status_code == 200
    assert globex.get(f"/v1/fine_tuning/jobs/{ids['job']}").json()["status"] != "cancelled"
    deployment = globex.get("/v1/tuneloop/deployments").json()["data"][0]
    assert deployment["run"]["id"] == ids["run"] and len(deployment["history"]) == 1
    assert globex.get(f"/v1/tuneloop/datasets/{ids['version']}/report").status_code == 200
    listed = tenants["acme"].get("/v1/tuneloop/datasets").json()["data"]
    assert not [d for d in listed if d.get("name") == "stolen"]
