"""The per-request shortcuts of the candidates service (issue 16, serving at scale) answer exactly
what the long way did: the seen-item filter against ``np.isin``, the orjson body against the declared
response type's pydantic validation + dump, the fast lane against FastAPI's own handling (every
answer: status, headers that matter, body), its metrics and its auth; and the ``--workers``
listeners: one SO_REUSEPORT socket per worker, Nagle's algorithm off."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from kgrec.serving import service as svc
from kgrec.serving.candidates import CandidateService, InvalidRequestError
from kgrec.serving.multi_interest import MultiInterestResult
from kgrec.serving.service import create_app
from pydantic import TypeAdapter

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------------- the seen-item filter
def _isin_filter(I, D, exclude, k):
    """The filter as it was: ``np.isin``."""
    valid = I >= 0
    if exclude.shape[0]:
        valid &= ~np.isin(I, exclude)
    return I[valid][:k].astype(np.int64), D[valid][:k]


@pytest.mark.parametrize("seed", range(40))
def test_filter_equals_np_isin(seed):
    rng = np.random.default_rng(seed)
    n_items = int(rng.choice([5, 50, 1000, 1_000_000]))
    n_hits = int(rng.integers(1, min(n_items, 400) + 1))
    I = rng.choice(n_items, n_hits, replace=False).astype(np.int64)
    if rng.random() < 0.3:  # faiss pads a short answer with -1
        I[rng.integers(0, n_hits, int(rng.integers(1, n_hits + 1)))] = -1
    D = np.sort(rng.standard_normal(n_hits).astype(np.float32))[::-1]
    n_seen = int(rng.integers(0, min(n_items, 300) + 1))
    exclude = np.unique(rng.choice(n_items, n_seen, replace=False)).astype(np.int64)  # sorted, as served
    if n_seen and rng.random() < 0.5:  # many of the hits seen, as for a heavy user
        exclude = np.unique(np.concatenate([exclude, I[I >= 0][: n_hits // 2]]))
    for k in (1, 7, n_hits, n_hits + 10):
        got_i, got_d = CandidateService._filter(I, D, exclude, k)
        want_i, want_d = _isin_filter(I, D, exclude, k)
        assert got_i.dtype == np.int64 and got_i.tolist() == want_i.tolist()
        assert got_d.tolist() == want_d.tolist()


def test_filter_edges():
    I = np.array([3, -1, 9, 0, 12], np.int64)
    D = np.arange(5, dtype=np.float32)[::-1].copy()
    for exclude in ([], [0], [12], [13, 14], [-5], [0, 3, 9, 12]):
        exclude = np.asarray(exclude, np.int64)
        assert CandidateService._filter(I, D, exclude, 10)[0].tolist() == _isin_filter(I, D, exclude, 10)[0].tolist()


def test_answers_exclude_the_seen_items(service, bundle):
    seen = bundle.seen.tocsr()
    for u in range(0, bundle.n_users, 17):
        user_id = service._user_ids[u]
        got = service.for_user(user_id, 50)
        assert not set(got.item_idx.tolist()) & set(seen.indices[seen.indptr[u]:seen.indptr[u + 1]].tolist())
        assert len(got) == 50 and np.all(np.diff(got.scores) <= 1e-6)


# ---------------------------------------------------------------------------- the orjson body
def _pairs(raw: bytes):
    """The JSON document with every object as its (key, value) list: equal order and values."""
    return json.loads(raw, object_pairs_hook=list)


def _declared(kind, body) -> bytes:
    adapter = TypeAdapter(kind)
    return adapter.dump_json(adapter.validate_python(body))


def _multi_interest_result(result, rng, diversity=None) -> MultiInterestResult:
    n = len(result)
    return MultiInterestResult(
        result.item_idx, result.scores, result.item_ids, result.names, user_id=result.user_id,
        interest=rng.integers(0, 4, n), interest_weights=[0.5, 0.25, 0.25, 0.0],
        merge="controllable" if diversity is not None else "weighted", diversity=diversity,
    )


def test_orjson_body_equals_the_declared_types_dump(service):
    rng = np.random.default_rng(0)
    summaries = [{"name": "kgrec-retrieval", "version": "3"}, {"name": None, "version": 7},
                 {"name": "m", "version": None}]
    for i, user_id in enumerate(service._user_ids[:60]):
        result = service.for_user(user_id, int(rng.integers(1, 120)))
        if i % 3 == 1:
            result = _multi_interest_result(result, rng)
        elif i % 3 == 2:
            result = _multi_interest_result(result, rng, diversity=float(rng.choice([0.0, 0.5, 100.0])))
        summary = summaries[i % len(summaries)]
        body = {"user_id": user_id, "k": len(result), "model": summary, **result.response_fields(),
                "candidates": result.records(), "took_ms": round(float(rng.random()) * 3, 3)}
        assert _pairs(svc.candidates_json(body)) == _pairs(_declared(svc.UserCandidates, body))
        history = {"k": len(result), "model": summary, **result.response_fields(),
                   "candidates": result.records(), "unknown_item_ids": ["nope", "x" * 3][: i % 3],
                   "took_ms": 0.25}
        assert _pairs(svc.candidates_json(history)) == _pairs(_declared(svc.HistoryCandidates, history))


def test_orjson_body_writes_numbers_as_pydantic_does():
    odd = [0.0, -0.0, 1.0, 1e-7, 123456789.123, 3.4028234663852886e38, float("nan"), float("inf"),
           np.float32(0.1).item(), 5e-324]
    body = {"user_id": "u", "k": len(odd), "model": {"name": None, "version": None},
            "candidates": [{"item_id": f"i{j}", "score": s, "name": None if j % 2 else "é ☃ \"q\""}
                           for j, s in enumerate(odd)], "took_ms": 0.0}
    got, want = _pairs(svc.candidates_json(body)), _pairs(_declared(svc.UserCandidates, body))
    assert got == want  # NaN and infinities: null in both
    # numpy scalars (a retriever that forgets .tolist()) serialise as their values
    body["candidates"][0]["score"] = np.float32(0.5)
    assert json.loads(svc.candidates_json(body))["candidates"][0]["score"] == 0.5


# ---------------------------------------------------------------------------- the fast lane
class MergingService(CandidateService):
    """An embedding service that takes ``merge`` / ``diversity`` like a multi-interest one (its
    answers carry the multi-interest fields), to compare the lane's parameter handling."""

    supports_merge = True

    def _merged(self, result, merge, diversity):
        if diversity is not None and merge != "controllable":
            raise InvalidRequestError("diversity applies to merge='controllable' only")
        rng = np.random.default_rng(len(result))
        return MultiInterestResult(
            result.item_idx, result.scores, result.item_ids, result.names, user_id=result.user_id,
            unknown_item_ids=result.unknown_item_ids, interest=rng.integers(0, 3, len(result)),
            interest_weights=[0.5, 0.3, 0.2], merge=merge or "max", diversity=diversity)

    def for_user(self, user_id, k=100, merge=None, diversity=None):
        return self._merged(super().for_user(user_id, k), merge, diversity)

    def for_history(self, item_ids, k=100, merge=None, diversity=None):
        return self._merged(super().for_history(item_ids, k), merge, diversity)


@pytest.fixture(scope="module")
def merging(bundle):
    return MergingService(bundle)


def _clients(retriever, model_info, **options):
    fast = TestClient(create_app(lambda: (retriever, model_info), **options))
    slow = TestClient(create_app(lambda: (retriever, model_info), fast_lane=False, **options))
    return fast, slow


GETS = [
    "/v1/users/u5/candidates", "/v1/users/u5/candidates?k=25", "/v1/users/u7/candidates?k=1000",
    "/v1/users/u7/candidates?k=1", "/v1/users/u5/candidates?k=0", "/v1/users/u5/candidates?k=1001",
    "/v1/users/u5/candidates?k=-3", "/v1/users/u5/candidates?k=abc", "/v1/users/u5/candidates?k=",
    "/v1/users/u5/candidates?k=007", "/v1/users/u5/candidates?k=5&k=6", "/v1/users/u5/candidates?k=%35",
    "/v1/users/u5/candidates?k=5&foo=bar", "/v1/users/u5/candidates?k=5&", "/v1/users/u5/candidates?k=5.0",
    "/v1/users/u5/candidates?merge=max", "/v1/users/u5/candidates?merge=weighted&k=3",
    "/v1/users/u5/candidates?merge=bogus", "/v1/users/u5/candidates?merge=controllable&diversity=0.5",
    "/v1/users/u5/candidates?merge=controllable&diversity=100", "/v1/users/u5/candidates?diversity=0.5",
    "/v1/users/u5/candidates?merge=controllable&diversity=100.5",
    "/v1/users/u5/candidates?merge=controllable&diversity=1e1", "/v1/users/u5/candidates?merge=controllable&diversity=.5",
    "/v1/users/u5/candidates?merge=controllable&diversity=00.5", "/v1/users/u5/candidates?merge=controllable&diversity=0.",
    "/v1/users/nobody/candidates", "/v1/users/" + "x" * 257 + "/candidates", "/v1/users/" + "u" * 256 + "/candidates",
    "/v1/users/u%35/candidates?k=4", "/v1/users/u5/candidates/", "/v1/users//candidates",
]
POSTS = [
    ({"item_ids": ["i1", "i2"], "k": 5}, None),
    ({"item_ids": ["i1", "nope"], "k": 5}, None),
    ({"item_ids": [1, 2, 3]}, None),
    ({"item_ids": ["i1"], "k": 5, "merge": "controllable", "diversity": 0.25}, None),
    ({"item_ids": ["i1"], "k": 5, "diversity": 0.25}, None),
    ({"item_ids": ["nope"]}, None),
    ({"item_ids": []}, None),
    ({"item_ids": ["i1"], "k": 0}, None),
    ({"item_ids": ["i1"], "extra": 1}, None),
    ({"item_ids": ["x" * 300]}, None),
    ({"k": 5}, None),
    (None, b'{"item_ids": ["i1"'),
    (None, b""),
    (None, b"[1, 2]"),
    (None, b'{"item_ids": ["i1"], "k": NaN}'),
    (None, b'{"item_ids": ["i1"], "k": 5, "k": 7}'),
]


def _comparable(response):
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body.pop("took_ms", None)
    return response.status_code, response.headers.get("content-type"), response.headers.get("www-authenticate"), body


def _fallbacks(monkeypatch) -> list[str]:
    """Paths that took FastAPI's handling (APIRoute.handle) instead of the lane."""
    taken: list[str] = []
    original = APIRoute.handle

    async def spy(self, scope, receive, send):
        taken.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", spy)
    return taken


@pytest.mark.parametrize("kind", ["embedding", "merging"])
def test_the_fast_lane_answers_what_fastapi_answers(kind, service, merging, model_info, monkeypatch):
    retriever = service if kind == "embedding" else merging
    fast, slow = _clients(retriever, model_info)
    fallbacks = _fallbacks(monkeypatch)
    with fast, slow:
        for path in GETS:
            assert _comparable(fast.get(path)) == _comparable(slow.get(path)), path
        for payload, raw in POSTS:
            kwargs = {"json": payload} if raw is None else {
                "content": raw, "headers": {"content-type": "application/json"}}
            assert _comparable(fast.post("/v1/candidates", **kwargs)) == _comparable(
                slow.post("/v1/candidates", **kwargs)), (payload, raw)
        other_type = {"content": b'{"item_ids": ["i1"]}', "headers": {"content-type": "text/plain"}}
        assert _comparable(fast.post("/v1/candidates", **other_type)) == _comparable(
            slow.post("/v1/candidates", **other_type))
        fallbacks.clear()
        plain = ["/v1/users/u5/candidates", "/v1/users/u5/candidates?k=25",
                 "/v1/users/u5/candidates?merge=controllable&diversity=0.5", "/v1/users/nobody/candidates"]
        for path in plain:
            fast.get(path)
        fast.post("/v1/candidates", json={"item_ids": ["i1", "i2"], "k": 5})
        assert fallbacks == []  # all answered by the lane (the unknown user: its 404 raised there)
        fast.get("/v1/users/u5/candidates?k=0")
        fast.post("/v1/candidates", json={"item_ids": []})
        assert fallbacks == ["/v1/users/u5/candidates", "/v1/candidates"]  # the 422s: FastAPI's


def test_the_fast_lane_answers_503_while_no_model_is_loaded():
    def loader():
        raise RuntimeError("registry unreachable")

    fast, slow = (TestClient(create_app(loader, fast_lane=lane), raise_server_exceptions=False)
                  for lane in (True, False))
    with fast, slow:
        for path in ("/v1/users/u5/candidates?k=3", "/v1/users/u5/candidates"):
            got = _comparable(fast.get(path))
            assert got == _comparable(slow.get(path)) and got[0] == 503
        got = _comparable(fast.post("/v1/candidates", json={"item_ids": ["i1"]}))
        assert got == _comparable(slow.post("/v1/candidates", json={"item_ids": ["i1"]})) and got[0] == 503


def test_the_fast_lane_is_counted_and_logged_under_the_route(service, model_info):
    with TestClient(create_app(lambda: (service, model_info))) as c:
        for _ in range(3):
            assert c.get("/v1/users/u5/candidates?k=5").status_code == 200
        assert c.post("/v1/candidates", json={"item_ids": ["i1"]}).status_code == 200
        assert c.get("/v1/users/nobody/candidates").status_code == 404
        text = c.get("/metrics").text
    assert 'kgrec_http_requests_total{endpoint="/v1/users/{user_id}/candidates",method="GET",status="200"} 3.0' in text
    assert 'kgrec_http_requests_total{endpoint="/v1/users/{user_id}/candidates",method="GET",status="404"} 1.0' in text
    assert 'kgrec_http_requests_total{endpoint="/v1/candidates",method="POST",status="200"} 1.0' in text
    assert 'kgrec_stage_duration_seconds_count{stage="retrieve"} 4.0' in text  # the 404 raised before it


@pytest.mark.parametrize("require_token", [True, False])
def test_the_fast_lane_checks_the_token_as_fastapi_does(require_token, service, model_info, monkeypatch):
    fast, slow = _clients(service, model_info, token=TOKEN, require_token=require_token)
    headers = [{}, AUTH, {"Authorization": f"bearer {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
               {"Authorization": "Bearer"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}]
    fallbacks = _fallbacks(monkeypatch)
    with fast, slow:
        for h in headers:
            for path in ("/v1/users/u5/candidates?k=3", "/v1/users/nobody/candidates"):
                assert _comparable(fast.get(path, headers=h)) == _comparable(slow.get(path, headers=h)), (h, path)
            post = {"json": {"item_ids": ["i1"], "k": 3}, "headers": h}
            assert _comparable(fast.post("/v1/candidates", **post)) == _comparable(slow.post("/v1/candidates", **post))
        fallbacks.clear()
        assert fast.get("/v1/users/u5/candidates?k=3", headers=AUTH).status_code == 200
        assert fallbacks == []
        if require_token:
            assert fast.get("/v1/users/u5/candidates?k=3").status_code == 401
            assert fallbacks == ["/v1/users/u5/candidates"]  # FastAPI's HTTPBearer answers it


def test_the_openapi_document_keeps_both_bodies(service, model_info):
    with TestClient(create_app(lambda: (service, model_info))) as c:
        spec = c.get("/openapi.json").json()
    for path, method, name in (("/v1/users/{user_id}/candidates", "get", "UserCandidates"),
                               ("/v1/candidates", "post", "HistoryCandidates")):
        content = spec["paths"][path][method]["responses"]["200"]["content"]
        assert content == {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


# ---------------------------------------------------------------------------- the workers' listeners
def _run_workers_with(monkeypatch, check):
    """``_run_workers`` with uvicorn's supervisor replaced by ``check(sockets)``."""
    import uvicorn
    import uvicorn.supervisors

    seen = {}

    class FakeSupervisor:
        def __init__(self, config, sockets, **kwargs):
            seen["sockets"] = sockets

        def run(self):
            seen["result"] = check(seen["sockets"])

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", FakeSupervisor)
    config = uvicorn.Config("kgrec.serving.service:app_from_env", factory=True, host="127.0.0.1", port=0,
                            workers=2, log_config=None)
    svc._run_workers(config)
    return seen["result"]


def _accept_all(listeners) -> list[int]:
    import socket

    counts = []
    for listener in listeners:
        listener.setblocking(False)
        n = 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            conn.close()
            n += 1
        counts.append(n)
    return counts


@pytest.mark.skipif(not svc._REUSE_PORT, reason="SO_REUSEPORT spreads connections on Linux only")
def test_each_worker_listens_on_its_own_reuseport_socket(monkeypatch):
    """``--workers``: every worker unpickles its own listener (SO_REUSEPORT, TCP_NODELAY, same port)
    and the kernel spreads new connections over them."""
    import pickle
    import socket
    import time

    def check(sockets):
        (stand_in,) = sockets
        assert isinstance(stand_in, svc._ReusePortListener)
        workers = [pickle.loads(pickle.dumps(stand_in)) for _ in range(2)]  # what each spawned worker gets
        try:
            for w in workers:
                assert w.proto == socket.IPPROTO_TCP and w.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
                w.listen()  # each worker's server does, once its model is loaded
            port = workers[0].getsockname()[1]
            assert port and workers[1].getsockname()[1] == port
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
            time.sleep(0.2)
            counts = _accept_all(workers)
            for c in clients:
                c.close()
            return counts
        finally:
            for w in workers:
                w.close()

    counts = _run_workers_with(monkeypatch, check)
    assert sum(counts) == 40 and min(counts) >= 5, counts  # all on one: p = 2^-39


def test_without_reuseport_the_shared_listener_turns_nagle_off(monkeypatch):
    """No SO_REUSEPORT: uvicorn's one shared listener, which says IPPROTO_TCP and has TCP_NODELAY, so
    connections accepted by asyncio's loop (no uvloop) do not wait ~40 ms for delayed ACKs between the
    headers and the body of an answer."""
    import socket

    def check(sockets):
        (listener,) = sockets
        assert listener.proto == socket.IPPROTO_TCP and listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        return listener

    monkeypatch.setattr(svc, "_REUSE_PORT", False)
    listener = _run_workers_with(monkeypatch, check)
    assert listener.fileno() == -1  # closed when the supervisor returns


def test_a_port_in_use_fails_at_once(monkeypatch):
    import socket

    import uvicorn

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = uvicorn.Config("kgrec.serving.service:app_from_env", factory=True, host="127.0.0.1",
                                port=taken.getsockname()[1], workers=2, log_config=None)
        with pytest.raises(SystemExit):
            svc._run_workers(config)
