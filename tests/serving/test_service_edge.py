"""The service's edge (issue "every edge hardened"): limits, OpenAPI-conformant errors, health HEAD,
request ids and JSON logs, Prometheus metrics, bearer token, CORS, and model reloads without a
restart (poll and POST /admin/reload, a failed reload keeps the old version)."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient
from kgrec.serving.candidates import CandidateService
from kgrec.serving.service import create_app
from kgrec.serving.settings import ServeSettings
from kgrec.serving.state import public_message

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Switchable:
    """A watchable loader: ``probe()`` names ``self.version``; loading a version in ``broken`` fails."""

    def __init__(self, services: dict[str, CandidateService], version: str = "1"):
        self.services, self.version, self.broken = services, version, set()
        self.loads: list[str] = []
        self.kept: list[set[str]] = []

    def probe(self) -> str:
        return self.version

    def __call__(self):
        version = self.version
        self.loads.append(version)
        if version in self.broken:
            raise FileNotFoundError(f"/var/lib/kgrec/serve-cache/m/v{version}/index/items.faiss fails its checksum")
        return self.services[version], {"name": "m", "version": version}

    def retain(self, versions: set[str]) -> None:
        self.kept.append(set(versions))


@pytest.fixture(scope="module")
def services(make_bundle) -> dict[str, CandidateService]:
    # two versions with different embeddings: their top-k differ
    return {"1": CandidateService(make_bundle(seed=1)), "2": CandidateService(make_bundle(seed=2)),
            "3": CandidateService(make_bundle(seed=3))}


@pytest.fixture
def client(service, model_info):
    with TestClient(create_app(lambda: (service, model_info), token=TOKEN, max_body_bytes=4096)) as c:
        yield c


def top_ids(client: TestClient, user: str = "u5") -> tuple[str, list[str]]:
    body = client.get(f"/v1/users/{user}/candidates", params={"k": 5}).json()
    return body["model"]["version"], [c["item_id"] for c in body["candidates"]]


# ---------------------------------------------------------------------------- limits and errors
def test_body_over_the_limit_is_413_before_parsing(client):
    big = json.dumps({"item_ids": ["i1"] * 2000}).encode()  # > 4096 bytes
    r = client.post("/v1/candidates", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["detail"]
    # a chunked body (no Content-Length) is counted while it is read
    r = client.post("/v1/candidates", content=iter([big[:3000], big[3000:]]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/v1/candidates", json={"item_ids": ["i1"], "k": 3}).status_code == 200


def test_long_ids_are_422_and_never_echoed(client):
    long_id = "x" * 60_000  # httpx refuses URLs beyond 64 KiB
    for r in (client.get(f"/v1/users/{long_id}/candidates"),
              client.post("/v1/candidates", json={"item_ids": ["y" * 300]}),
              client.get(f"/v1/users/u5/candidates/{'z' * 257}/explain")):
        assert r.status_code in (413, 422), r.status_code
        assert len(r.content) < 2000, len(r.content)
    r = client.get(f"/v1/users/{'u' * 300}/candidates")
    assert r.status_code == 422 and "at most 256 characters" in r.json()["message"]
    # an unknown id within the limit is quoted, cut to 200 characters
    r = client.get(f"/v1/users/{'w' * 250}/candidates")
    assert r.status_code == 404 and "w" * 200 in r.json()["detail"] and "w" * 201 not in r.json()["detail"]


def test_error_bodies_match_the_openapi_schema(client):
    import jsonschema

    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/users/{user_id}/candidates"]["get"]["responses"]
    assert {"200", "400", "401", "404", "413", "422", "503"} <= set(responses)
    post = spec["paths"]["/v1/candidates"]["post"]["responses"]

    def check(response, declared):
        schema = declared[str(response.status_code)]["content"]["application/json"]["schema"]
        jsonschema.validate(response.json(), {**schema, "components": spec["components"]})

    check(client.get("/v1/users/u5/candidates", params={"k": 0}), responses)
    check(client.get("/v1/users/nobody/candidates"), responses)
    check(client.post("/v1/candidates", json={"item_ids": ["zz"]}), post)  # the service's own 422
    check(client.post("/v1/candidates", json={"item_ids": "zz"}), post)
    bad_json = client.post("/v1/candidates", content=b'{"item_ids": [', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    check(bad_json, post)


def test_head_on_health_endpoints(client):
    for path in ("/healthz", "/readyz"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b""


def test_messages_hold_no_absolute_paths():
    assert public_message("bundle /tmp/kgrec-x/m/v3/model fails: /a/b/items.faiss") == (
        "bundle .../model fails: .../items.faiss")
    assert public_message("see http://mlflow:5000/api/2.0/x") == "see http://mlflow:5000/api/2.0/x"

    def broken():
        raise FileNotFoundError("/home/ops/secret/kgrec/serve-cache/m/v1/items.faiss is missing")

    with TestClient(create_app(broken)) as c:
        detail = c.get("/readyz").json()["detail"]
        assert "items.faiss is missing" in detail and "/home" not in detail and "secret" not in detail
        assert "/home" not in c.get("/v1/users/u1/candidates").text


# ---------------------------------------------------------------------------- request ids, logs, metrics
def test_request_id_is_echoed_and_logged_as_json(client, caplog):
    caplog.set_level(logging.INFO, logger="kgrec.access")
    r = client.get("/v1/users/u5/candidates", params={"k": 3}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32
    records = [rec for rec in caplog.records if rec.name == "kgrec.access"]
    first = next(rec for rec in records if rec.request_id == "abc-123")
    assert (first.route, first.status, first.method) == ("/v1/users/{user_id}/candidates", 200, "GET")
    assert first.duration_ms > 0
    # the JSON formatter writes one object per line with the request id
    from pythonjsonlogger.json import JsonFormatter

    line = json.loads(JsonFormatter("%(levelname)s %(name)s %(message)s %(request_id)s").format(first))
    assert line["request_id"] == "abc-123" and line["status"] == 200 and line["message"] == "request"


def test_metrics_in_prometheus_format(client):
    client.get("/v1/users/u5/candidates", params={"k": 3})
    client.get("/v1/users/nobody/candidates")
    client.get("/no/such/path")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'kgrec_http_requests_total{endpoint="/v1/users/{user_id}/candidates",method="GET",status="200"} 1.0' in text
    assert 'kgrec_http_requests_total{endpoint="/v1/users/{user_id}/candidates",method="GET",status="404"} 1.0' in text
    assert 'endpoint="unmatched"' in text  # unknown paths share one label value
    assert 'kgrec_stage_duration_seconds_count{stage="retrieve"} 1.0' in text
    assert 'kgrec_model_info{index_type="flat",kind="embedding",name="kgrec-retrieval",role="retriever",version="3"} 1.0' in text
    assert 'kgrec_index_size{role="retriever"} 800.0' in text
    assert "kgrec_http_requests_in_flight 1.0" in text  # this request
    assert "kgrec_model_ready 1.0" in text


# ---------------------------------------------------------------------------- security
def test_admin_needs_the_token(client):
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.post("/admin/reload", headers=AUTH).status_code == 200


def test_admin_is_off_without_a_token(service, model_info):
    with TestClient(create_app(lambda: (service, model_info))) as c:
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 403 and "KGREC_SERVE_TOKEN" in r.json()["detail"]


def test_beyond_loopback_everything_but_health_needs_the_token(service, model_info, monkeypatch):
    with TestClient(create_app(lambda: (service, model_info), token=TOKEN, require_token=True)) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for path in ("/v1/users/u5/candidates", "/v1/model", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=AUTH).status_code == 200, path
    monkeypatch.delenv("KGREC_SERVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="beyond loopback"):
        ServeSettings(model_name="m", host="0.0.0.0")
    assert ServeSettings(model_name="m").loopback
    monkeypatch.setenv("KGREC_SERVE_TOKEN", TOKEN)
    assert ServeSettings(model_name="m", host="0.0.0.0").token() == TOKEN


def test_cors_is_off_unless_configured(service, model_info):
    origin = {"Origin": "https://app.example"}
    with TestClient(create_app(lambda: (service, model_info))) as c:
        assert "access-control-allow-origin" not in c.get("/v1/model", headers=origin).headers
    with TestClient(create_app(lambda: (service, model_info), cors_origins=("https://app.example",))) as c:
        assert c.get("/v1/model", headers=origin).headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/v1/model", headers={"Origin": "https://evil.example"}).headers
        assert "access-control-allow-origin" not in other


def test_fail_fast_refuses_to_start():
    def broken():
        raise LookupError("no champion registered for kgrec-music")

    with pytest.raises(RuntimeError, match="--fail-fast.*no champion"):
        with TestClient(create_app(broken, fail_fast=True)):
            pass
    with TestClient(create_app(broken)) as c:  # without it: up, unready
        assert c.get("/readyz").status_code == 503


# ---------------------------------------------------------------------------- reloads
def test_admin_reload_swaps_the_version(services):
    loader = Switchable(services)
    with TestClient(create_app(loader, token=TOKEN)) as c:
        version, before = top_ids(c)
        assert version == "1"
        assert c.post("/admin/reload", headers=AUTH).json()["status"] == "unchanged"
        assert loader.loads == ["1"]  # an unchanged version is not loaded again
        loader.version = "2"
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["status"] == "reloaded" and report["model"]["version"] == "2"
        assert report["previous"]["version"] == "1"
        version, after = top_ids(c)
        assert version == "2" and after == services["2"].for_user("u5", 5).item_ids and after != before
        assert c.get("/v1/model").json()["reload"]["successes"] == 1
        assert loader.kept[-1] == {"1", "2"}  # the cache keeps the served and the previous version
        assert 'kgrec_model_info{index_type="flat",kind="embedding",name="m",role="retriever",version="1"} 0.0' in (
            c.get("/metrics").text)
        forced = c.post("/admin/reload", params={"force": "true"}, headers=AUTH).json()
        assert forced["status"] == "reloaded" and loader.loads == ["1", "2", "2"]


def test_a_failed_reload_keeps_the_old_version_and_reports_it(services):
    loader = Switchable(services)
    loader.broken.add("2")
    with TestClient(create_app(loader, token=TOKEN)) as c:
        loader.version = "2"
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["status"] == "failed" and "fails its checksum" in report["detail"]
        assert "/var/lib" not in report["detail"]
        assert report["model"]["version"] == "1"
        assert top_ids(c)[0] == "1" and c.get("/readyz").status_code == 200
        info = c.get("/v1/model").json()["reload"]
        assert info["failures"] == 1 and "fails its checksum" in info["last_error"]
        assert info["failed_versions"] == ["2", None]
        text = c.get("/metrics").text
        assert 'kgrec_model_reloads_total{result="failure"} 1.0' in text
        assert "kgrec_model_reload_last_failure_timestamp_seconds 0.0" not in text
        # polling does not retry the version that failed; the next version loads
        assert c.app.state.kgrec.reload()["status"] == "unchanged" and loader.loads == ["1", "2"]
        loader.version = "3"
        assert c.app.state.kgrec.reload()["status"] == "reloaded" and top_ids(c)[0] == "3"


def test_polling_retries_a_failed_version_after_a_back_off(services):
    """A transient failure (a registry or store error while loading) must not block a version for
    good: polling retries it once the back-off has passed, and the back-off doubles per repeat."""
    loader = Switchable(services)
    loader.broken.add("2")
    with TestClient(create_app(loader)) as c:
        state = c.app.state.kgrec
        state.retry_delay_s = 0.05
        loader.version = "2"
        assert state.reload()["status"] == "failed"
        assert state.reload()["status"] == "unchanged"  # within the back-off
        time.sleep(0.06)
        assert state.reload()["status"] == "failed" and loader.loads == ["1", "2", "2"]
        assert c.get("/v1/model").json()["reload"]["retry_in_s"] == 0.1  # doubled
        loader.broken.clear()  # the cause went away
        time.sleep(0.11)
        assert state.reload()["status"] == "reloaded" and top_ids(c)[0] == "2"


def test_a_version_that_fails_its_smoke_query_is_not_swapped_in(services, make_bundle):
    import numpy as np

    nan_bundle = make_bundle(seed=4)
    nan_bundle.item_embeddings[:] = np.nan  # loads, but answers NaN scores
    loader = Switchable({**services, "4": CandidateService(nan_bundle)})
    with TestClient(create_app(loader, token=TOKEN)) as c:
        loader.version = "4"
        report = c.post("/admin/reload", headers=AUTH).json()
        assert report["status"] == "failed" and "smoke query" in report["detail"]
        assert top_ids(c)[0] == "1"


def test_polling_picks_up_a_new_version_while_requests_keep_answering(services):
    loader = Switchable(services)
    failures, versions, stop = [], set(), threading.Event()
    with TestClient(create_app(loader, poll_interval_s=0.05)) as c:

        def hammer():
            while not stop.is_set():
                r = c.get("/v1/users/u5/candidates", params={"k": 5})
                if r.status_code != 200:
                    failures.append(r.status_code)
                else:
                    versions.add(r.json()["model"]["version"])

        worker = threading.Thread(target=hammer)
        worker.start()
        time.sleep(0.2)
        loader.version = "2"
        deadline = time.monotonic() + 10
        while top_ids(c)[0] != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        stop.set()
        worker.join()
    assert failures == [] and versions == {"1", "2"}


def test_a_service_started_before_any_model_becomes_ready_when_one_is_registered(services):
    loader = Switchable(services)
    loader.broken.add("1")  # nothing servable yet
    with TestClient(create_app(loader, poll_interval_s=0.05)) as c:
        assert c.get("/readyz").status_code == 503
        loader.version = "2"
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert top_ids(c)[0] == "2"
