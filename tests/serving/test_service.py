import pytest
from fastapi.testclient import TestClient
from kgrec.serving.service import bundle_loader, create_app


@pytest.fixture(scope="module")
def client(service, model_info):
    with TestClient(create_app(lambda: (service, model_info))) as c:
        yield c


@pytest.fixture(scope="module")
def broken_client():
    def loader():
        raise RuntimeError("registry unreachable")

    with TestClient(create_app(loader), raise_server_exceptions=False) as c:
        yield c


def test_health_ready_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    model = r.json()["model"]
    assert model["name"] == "kgrec-retrieval" and model["alias"] == "champion" and model["run_id"] == "abc123"
    info = client.get("/v1/model").json()
    assert info["version"] == "3" and info["n_items"] == 800 and info["index_kind"] == "flat"


def test_json_responses_and_every_endpoint_is_routed(client, broken_client):
    for response in (
        client.get("/v1/users/u5/candidates", params={"k": 3}),
        client.get("/v1/users/nobody/candidates"),  # exception handler
        client.get("/v1/users/u5/candidates", params={"k": 0}),  # validation handler
        broken_client.get("/readyz"),
        broken_client.get("/v1/model"),  # 503 from the readiness dependency
    ):
        assert response.headers["content-type"] == "application/json", response.url
    paths = client.get("/openapi.json").json()["paths"]
    routed = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    assert routed == {
        ("GET", "/healthz"),
        ("HEAD", "/healthz"),
        ("GET", "/readyz"),
        ("HEAD", "/readyz"),
        ("GET", "/metrics"),
        ("POST", "/admin/reload"),
        ("GET", "/v1/model"),
        ("GET", "/v1/users/{user_id}/candidates"),
        ("GET", "/v1/users/{user_id}/candidates/{item_id}/explain"),
        ("POST", "/v1/candidates"),
        ("GET", "/v1/users/{user_id}/ranked"),
        ("GET", "/v1/latency"),
        ("POST", "/v1/items"),
    }
    # handler dependencies are not request parameters
    params = {p["name"] for p in paths["/v1/users/{user_id}/candidates"]["get"]["parameters"]}
    assert params == {"user_id", "k", "merge", "diversity", "fresh"}


def test_openapi_documents_the_candidates_body(client):
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/users/{user_id}/candidates"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    ref = schema["$ref"]
    assert ref.startswith("#/components/schemas/")
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["properties"]["candidates"]["type"] == "array"
    item = spec["components"]["schemas"][body["properties"]["candidates"]["items"]["$ref"].rsplit("/", 1)[1]]
    assert {"item_id", "score", "name", "interest"} <= set(item["properties"])
    assert set(item["required"]) == {"item_id", "score", "name"}  # `interest`: multi-interest retrievers only


def test_known_user(client, bundle, service):
    r = client.get("/v1/users/u5/candidates", params={"k": 25})
    assert r.status_code == 200
    body = r.json()
    assert body["user_id"] == "u5" and body["k"] == 25
    assert body["model"] == {"name": "kgrec-retrieval", "version": "3"}
    assert isinstance(body["took_ms"], float)
    cands = body["candidates"]
    assert len(cands) == 25 and set(cands[0]) == {"item_id", "score", "name"}
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)
    seen = {f"i{j}" for j in service.seen_items("u5").tolist()}
    assert not seen & {c["item_id"] for c in cands}
    assert [c["item_id"] for c in cands] == service.for_user("u5", 25).item_ids
    assert len(client.get("/v1/users/u5/candidates").json()["candidates"]) == 100  # default k


def test_unknown_user(client):
    r = client.get("/v1/users/nobody/candidates")
    assert r.status_code == 404
    assert r.json() == {"detail": "unknown user 'nobody'"}


@pytest.mark.parametrize("k", ["0", "-3", "100000", "abc", "1.5", "801"])
def test_bad_k(client, k):
    r = client.get("/v1/users/u5/candidates", params={"k": k})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_k_above_catalogue_but_within_limit(client):
    r = client.get("/v1/users/u5/candidates", params={"k": 900})  # <= 1000 but > 800 items
    assert r.status_code == 422
    assert "catalogue size 800" in r.json()["message"]
    assert r.json()["detail"][0]["msg"] == "k must be between 1 and the catalogue size 800, got 900"


def test_history(client):
    hist = ["i1", "i9", "i17", 25, "ghost"]
    r = client.post("/v1/candidates", json={"item_ids": hist, "k": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [c["item_id"] for c in body["candidates"]]
    assert len(ids) == 40 and not {"i1", "i9", "i17"} & set(ids)
    assert body["unknown_item_ids"] == ["25", "ghost"]
    assert body["model"]["version"] == "3"
    r = client.post("/v1/candidates", json={"item_ids": ["i1"]})
    assert r.status_code == 200 and len(r.json()["candidates"]) == 100


@pytest.mark.parametrize(
    "payload",
    [
        {"item_ids": []},
        {"item_ids": ["i1"], "k": 0},
        {"item_ids": ["i1"], "k": 100000},
        {"item_ids": ["i1"], "k": "abc"},
        {"item_ids": ["i1"], "user": "x"},  # extra field
        {"item_ids": "i1"},
        {"item_ids": [["i1"]]},
        {"item_ids": ["i1"] * 501},
        {"k": 10},
        ["i1"],
    ],
)
def test_bad_bodies(client, payload):
    r = client.post("/v1/candidates", json=payload)
    assert r.status_code == 422, r.text
    body = r.json()  # FastAPI's 422 shape (the OpenAPI schema's), plus a one-line message
    assert isinstance(body["detail"], list) and body["detail"] and isinstance(body["message"], str)
    assert all({"loc", "msg", "type"} <= set(e) and isinstance(e["loc"], list) for e in body["detail"])


def test_malformed_json(client):
    r = client.post("/v1/candidates", content=b'{"item_ids": ["i1",', headers={"content-type": "application/json"})
    assert r.status_code == 400  # not a JSON document at all
    assert "json" in r.json()["detail"].lower()
    r = client.post("/v1/candidates", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422  # no body: the required field is missing


def test_all_items_unknown(client):
    r = client.post("/v1/candidates", json={"item_ids": ["zz", "yy"]})
    assert r.status_code == 422
    assert "none of the item ids is known" in r.json()["message"]
    assert r.json()["detail"][0]["loc"] == ["body", "item_ids"]


def test_not_ready(broken_client):
    assert broken_client.get("/healthz").status_code == 200
    r = broken_client.get("/readyz")
    assert r.status_code == 503
    assert "registry unreachable" in r.json()["detail"]
    for resp in (
        broken_client.get("/v1/users/u1/candidates"),
        broken_client.post("/v1/candidates", json={"item_ids": ["i1"]}),
        broken_client.get("/v1/model"),
    ):
        assert resp.status_code == 503 and "registry unreachable" in resp.json()["detail"]


def test_bundle_loader(tmp_path, bundle):
    from kgrec.serving.index import IndexConfig, build_and_measure, save_index

    out = bundle.write(tmp_path / "bundle")
    index, info = build_and_measure(bundle.item_embeddings, IndexConfig(kind="hnsw"))
    save_index(index, out / "index", info)
    app = create_app(bundle_loader(out, {"name": "m", "version": "1"}))
    with TestClient(app) as c:
        info = c.get("/readyz").json()["model"]
        assert info["index_kind"] == "hnsw" and info["model"] == "bprmf" and info["dataset"] == "synthetic"
        assert len(c.get("/v1/users/u0/candidates?k=10").json()["candidates"]) == 10
