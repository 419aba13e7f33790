"""GET /v1/users/{user}/candidates/{item}/explain over a bundle that carries an attention graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kgrec.models.explain import AttentionGraph
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.candidates import CandidateService
from kgrec.serving.service import create_app

RELATIONS = ["interact", "rev_interact", "genre", "rev_genre"]


def _with_graph(bundle: RetrievalBundle, n_entities: int = 10, seed: int = 0) -> RetrievalBundle:
    """Attach a CKG built from the bundle's own seen matrix plus random item-entity links."""
    rng = np.random.default_rng(seed)
    U, I = bundle.n_users, bundle.n_items
    coo = bundle.seen.tocoo()
    items = np.arange(I)
    ents = rng.integers(0, n_entities, I)
    heads = np.concatenate([coo.row, U + coo.col, U + items, U + I + ents])
    tails = np.concatenate([U + coo.col, coo.row, U + I + ents, U + items])
    types = np.repeat([0, 1, 2, 3], [coo.nnz, coo.nnz, I, I])
    att = rng.random(len(heads)) + 0.1
    att /= np.bincount(heads, weights=att, minlength=U + I + n_entities)[heads]
    graph = AttentionGraph(heads, tails, types, att.astype(np.float32), U, I, n_entities,
                           RELATIONS, [f"m.{k:03d}" for k in range(n_entities)])
    return dataclasses.replace(bundle, meta={**bundle.meta, "model": "kgat"}, attention_graph=graph)


@pytest.fixture(scope="module")
def kg_bundle(bundle):
    return _with_graph(bundle)


@pytest.fixture(scope="module")
def kg_client(kg_bundle):
    app = create_app(lambda: (CandidateService(kg_bundle), {"name": "kgrec-test", "version": "1"}))
    with TestClient(app) as client:
        yield client


def test_explain_returns_paths_that_exist_in_the_graph(kg_client, kg_bundle, tmp_path):
    graph = kg_bundle.attention_graph
    user_id = kg_bundle.users["user_id"][0]
    user = int(kg_bundle.users["user_idx"][0])
    item_id = kg_client.get(f"/v1/users/{user_id}/candidates", params={"k": 1}).json()[
        "candidates"][0]["item_id"]
    body = kg_client.get(f"/v1/users/{user_id}/candidates/{item_id}/explain",
                         params={"max_paths": 5})
    assert body.status_code == 200, body.text
    payload = body.json()
    assert payload["item"]["id"] == item_id and payload["paths"]
    edges = {(int(h), RELATIONS[int(r)], int(t))
             for h, t, r in zip(graph.heads, graph.tails, graph.edge_type)}
    user_of = dict(zip(kg_bundle.users["user_id"].to_list(), kg_bundle.users["user_idx"].to_list()))
    item_of = dict(zip(kg_bundle.items["item_id"].to_list(), kg_bundle.items["item_idx"].to_list()))
    U, I = kg_bundle.n_users, kg_bundle.n_items
    scores = []
    for path in payload["paths"]:
        node = user
        for step in path["steps"]:
            nxt = {"user": lambda s: user_of[s["id"]],
                   "item": lambda s: U + item_of[s["id"]],
                   "entity": lambda s: U + I + int(s["id"][2:])}[step["type"]](step)
            assert (node, step["relation"], nxt) in edges
            node = nxt
        assert node == U + item_of[item_id]
        scores.append(path["score"])
    assert scores == sorted(scores, reverse=True)

    # the bundle round-trips its graph through disk
    reloaded = RetrievalBundle.load(kg_bundle.write(tmp_path / "b"))
    assert reloaded.attention_graph.explain(user, item_of[item_id]) == graph.explain(
        user, item_of[item_id])


@pytest.fixture(scope="module")
def plain_client(service):
    """A model without an attention graph (BPR-MF)."""
    with TestClient(create_app(lambda: (service, {"name": "kgrec-test", "version": "2"}))) as client:
        yield client


def test_explain_bad_requests_are_4xx_with_a_message(kg_client, kg_bundle, plain_client):
    user_id, item_id = kg_bundle.users["user_id"][0], kg_bundle.items["item_id"][0]
    cases = [
        (kg_client, f"/v1/users/nobody/candidates/{item_id}/explain", 404, "unknown user"),
        (kg_client, f"/v1/users/{user_id}/candidates/no-item/explain", 404, "unknown item"),
        (kg_client, f"/v1/users/{user_id}/candidates/{item_id}/explain?max_paths=0", 422, "max_paths"),
        (plain_client, f"/v1/users/{user_id}/candidates/{item_id}/explain", 404, "no attention graph"),
    ]
    for http, url, status, message in cases:
        response = http.get(url)
        assert response.status_code == status, (url, response.text)
        assert message in response.text
