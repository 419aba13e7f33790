"""POST /v1/items: a new item's vector from its KG facts (a KGAT bundle's inductive payload), served
at once, durable in the overlay beside the bundle, shared by workers; every 4xx."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient
from kgrec.features.cold_start import item_triples, without_items
from kgrec.features.dataset import InteractionData
from kgrec.features.split import random_split
from kgrec.features.synthetic import SparseConfig, sparse_snapshot
from kgrec.models.cold_start import InductiveKGAT
from kgrec.models.config import TrainConfig
from kgrec.models.spec import build_model, get_spec
from kgrec.models.tracking.experiment import Trained
from kgrec.models.training.pairwise import fit
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.candidates import CandidateService
from kgrec.serving.export import export_bundle, item_embedder
from kgrec.serving.integrity import verify_manifest
from kgrec.serving.overlay import ItemOverlay, read_overlay_items
from kgrec.serving.service import bundle_loader, create_app

TOKEN = "items-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "kgrec-test"
HELD = np.arange(0, 90, 15)  # items that do not exist when the model trains: they get posted


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A genre-structured catalogue (sparse_snapshot), six items removed before training (the
    items posted later), a small KGAT trained on the rest and exported through the real path."""
    full = sparse_snapshot(SparseConfig(num_users=240, num_items=90, num_genres=4, items_per_creator=3,
                                        degree_exponent=0.5, max_degree=20, exploration=0.1,
                                        second_genre_share=0.0, seed=0))
    snapshot = without_items(full, HELD)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))
    config = TrainConfig.for_model(
        "kgat", embedding_dim=16, learning_rate=0.02, batch_size=512, epochs=8, patience=50, device="cpu",
        eval_every=4, params={"layer_sizes": (16, 8), "kg_batch_size": 256, "kg_learning_rate": 0.02,
                              "mess_dropout": 0.0, "relation_dim": 8},
    )
    torch.manual_seed(0)
    model = build_model(config, data)
    result = fit(model, data, config)
    trained = Trained(run_id="run1", spec=get_spec("kgat"), config=config, model=model, fit=result, inputs=data)
    bundle_dir = export_bundle(trained, tmp_path_factory.mktemp("bundles"))
    return {"full": full, "snapshot": snapshot, "data": data, "model": model, "bundle_dir": bundle_dir}


def facts_of(full, item: int) -> list[dict[str, str]]:
    """The KG facts of one of the full catalogue's items, by raw name (its triples, item as head)."""
    names = full.relation_names()
    entity = dict(zip(full.entities["entity_idx"].to_list(), full.entities["entity_id"].to_list()))
    rows = item_triples(full, [item]).to_numpy().tolist()
    assert all(h == item and t >= full.n_items for h, _, t in rows)  # item -> entity triples only
    return [{"relation": names[r], "entity": entity[t - full.n_items]} for _, r, t in rows]


def item_id_of(full, item: int) -> str:
    return full.items.sort("item_idx")["item_id"][int(item)]


def app_for(world, root, *, version: str = "1", **options):
    options.setdefault("token", TOKEN)
    options.setdefault("overlay_poll_interval_s", 0)
    loader = bundle_loader(world["bundle_dir"], {"name": MODEL, "version": version})
    return create_app(loader, overlay_root=root, **options)


def post(client, item_id, facts, name=None, headers=AUTH):
    body = {"item_id": item_id, "facts": facts, **({"name": name} if name is not None else {})}
    return client.post("/v1/items", json=body, headers=headers)


def candidate_ids(client, user_id: str, k: int) -> list[str]:
    r = client.get(f"/v1/users/{user_id}/candidates", params={"k": k})
    assert r.status_code == 200, r.text
    return [c["item_id"] for c in r.json()["candidates"]]


def offline_vector(world, facts) -> np.ndarray:
    """The posted item's vector computed from the trained model itself (not through the bundle)."""
    snapshot, model = world["snapshot"], world["model"]
    rel = {name: r for r, name in enumerate(snapshot.relation_names())}
    ent = dict(zip(snapshot.entities["entity_id"].to_list(), snapshot.entities["entity_idx"].to_list()))
    ckg = [(2 + 2 * rel[f["relation"]], model.num_users + snapshot.n_items + ent[f["entity"]]) for f in facts]
    meta = json.loads((world["bundle_dir"] / "meta.json").read_text())
    return InductiveKGAT(model).embed([ckg], meta["item_embedding"]["ego"])[0].numpy()


def best_user(world, vector) -> tuple[str, int]:
    """The user for whom the vector ranks highest among their unseen catalogue items, and its rank."""
    bundle = RetrievalBundle.load(world["bundle_dir"])
    scores = bundle.user_embeddings @ bundle.item_embeddings.T
    mine = bundle.user_embeddings @ vector
    seen = bundle.seen.toarray() > 0
    ranks = ((scores > mine[:, None]) & ~seen).sum(1)
    u = int(np.argmin(ranks))
    user_id = dict(zip(bundle.users["user_idx"].to_list(), bundle.users["user_id"].to_list()))[u]
    return user_id, int(ranks[u])


# ---------------------------------------------------------------------------- export
def test_kgat_bundle_carries_the_inductive_payload(world):
    bundle_dir = world["bundle_dir"]
    files = json.loads((bundle_dir / "MANIFEST.json").read_text())["files"]
    assert {"inductive/kgat.pt", "inductive/kgat.json", "inductive/nodes.parquet"} <= set(files)
    verify_manifest(bundle_dir, "bundle")
    meta = json.loads((bundle_dir / "meta.json").read_text())
    embedding = meta["item_embedding"]
    assert embedding["method"] == "inductive_kgat" and embedding["ego_selection"] == "validation"
    config = json.loads((bundle_dir / "inductive" / "kgat.json").read_text())
    assert embedding["ego"] == config["ego"] == max(config["ego_valid_recall@20"], key=config["ego_valid_recall@20"].get)
    assert config["relations"] == world["snapshot"].relation_names()
    nodes = pl.read_parquet(bundle_dir / "inductive" / "nodes.parquet")
    snapshot = world["snapshot"]
    assert nodes.height == snapshot.n_items + snapshot.n_entities  # linked items + entities
    # the stored embedder computes, without the model, what the model computes
    bundle = RetrievalBundle.load(bundle_dir)
    facts = facts_of(world["full"], int(HELD[1]))
    resolved = bundle.inductive.resolve([(f["relation"], f["entity"]) for f in facts])
    np.testing.assert_allclose(bundle.inductive.embed([resolved])[0], offline_vector(world, facts), rtol=1e-5, atol=1e-6)


def test_only_kgat_gets_an_embedder(world):
    from kgrec.models.retrievers.bprmf import BPRMF

    data = world["data"]
    assert item_embedder(BPRMF(data.num_users, data.num_items, 8), data) is None
    assert item_embedder(world["model"], data) is not None


# ---------------------------------------------------------------------------- served at once
def test_posted_item_is_served_at_once(world, tmp_path):
    full = world["full"]
    item = int(HELD[2])
    facts, item_id = facts_of(full, item), item_id_of(full, item)
    vector = offline_vector(world, facts)
    user_id, rank = best_user(world, vector)
    assert rank < 5  # the planted genre structure puts it near the top for someone
    with TestClient(app_for(world, tmp_path)) as client:
        n_before = client.get("/v1/model").json()["n_items"]
        assert item_id not in candidate_ids(client, user_id, 10)
        r = post(client, item_id, facts, name="a posted item")
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["item_id"] == item_id and body["position"] == n_before and body["n_items"] == n_before + 1
        assert body["facts"] == len(facts) and body["embedding"]["method"] == "inductive_kgat"
        assert body["model"] == {"name": MODEL, "version": "1"}
        answer = client.get(f"/v1/users/{user_id}/candidates", params={"k": 10}).json()["candidates"]
        mine = [c for c in answer if c["item_id"] == item_id]
        assert mine, answer
        assert mine[0]["name"] == "a posted item"
        assert [c["item_id"] for c in answer].index(item_id) == rank  # unseen, ranked as its score says
        bundle = RetrievalBundle.load(world["bundle_dir"])
        u = dict(zip(bundle.users["user_id"].to_list(), bundle.users["user_idx"].to_list()))[user_id]
        assert mine[0]["score"] == pytest.approx(float(bundle.user_embeddings[u] @ vector), rel=1e-5)
        info = client.get("/v1/model").json()
        assert info["n_items"] == n_before + 1
        assert info["posted_items"]["count"] == 1 and info["posted_items"]["accepts"] is True
        # a history holding the posted item: known, excluded from the answer
        r = client.post("/v1/candidates", json={"item_ids": [item_id], "k": 5})
        assert r.status_code == 200 and r.json()["unknown_item_ids"] == []
        assert item_id not in [c["item_id"] for c in r.json()["candidates"]]
        # a user who has seen everything else still gets it (posted items are never seen)
        assert item_id in candidate_ids(client, user_id, n_before + 1)
        r = client.get(f"/v1/users/{user_id}/candidates/{item_id}/explain")
        assert r.status_code == 404 and "posted after training" in r.json()["detail"]
    record = json.loads((tmp_path / MODEL / "overlays" / "v1.jsonl").read_text().splitlines()[0])
    assert record["item_id"] == item_id and record["facts"] == facts and record["name"] == "a posted item"
    assert record["version"] == "1" and record["time"].endswith("Z")


def test_fresh_slots_bring_a_posted_item_into_the_answer(world, tmp_path):
    """A posted item ranked below the top k is served anyway in a reserved slot: per request
    (``?fresh=``, both lanes; ``"fresh"`` in a history body) or by the service's setting."""
    full = world["full"]
    item = int(HELD[3])
    facts, item_id = facts_of(full, item), item_id_of(full, item)
    bundle = RetrievalBundle.load(world["bundle_dir"])
    scores = bundle.user_embeddings @ offline_vector(world, facts)
    user_id = dict(zip(bundle.users["user_idx"].to_list(), bundle.users["user_id"].to_list()))[int(np.argmin(scores))]
    for fast_lane in (True, False):
        with TestClient(app_for(world, tmp_path / str(fast_lane), fast_lane=fast_lane)) as client:
            assert post(client, item_id, facts).status_code == 201
            plain = candidate_ids(client, user_id, 5)
            assert item_id not in plain  # the user who likes it least: not on merit
            r = client.get(f"/v1/users/{user_id}/candidates", params={"k": 5, "fresh": 1})
            assert r.status_code == 200, r.text
            assert [c["item_id"] for c in r.json()["candidates"]] == plain[:4] + [item_id]
            for bad in ("-1", "x", "1001", "1.5"):
                r = client.get(f"/v1/users/{user_id}/candidates", params={"k": 5, "fresh": bad})
                assert r.status_code == 422 and "fresh" in r.json()["message"], (bad, r.text)
            r = client.post("/v1/candidates", json={"item_ids": [plain[0]], "k": 3, "fresh": 1})
            assert r.status_code == 200 and r.json()["candidates"][-1]["item_id"] == item_id
    with TestClient(app_for(world, tmp_path / "True", fresh_slots=1)) as client:  # the setting; 0 overrides it
        assert candidate_ids(client, user_id, 5)[-1] == item_id
        r = client.get(f"/v1/users/{user_id}/candidates", params={"k": 5, "fresh": 0})
        assert item_id not in [c["item_id"] for c in r.json()["candidates"]]


# ---------------------------------------------------------------------------- 4xx
@pytest.fixture
def client(world, tmp_path):
    with TestClient(app_for(world, tmp_path, max_item_facts=20)) as c:
        yield c


def test_unknown_relation_and_entity_are_422(client, world):
    facts = facts_of(world["full"], int(HELD[0]))
    r = post(client, "new-1", facts[:1] + [{"relation": "directed_by", "entity": facts[0]["entity"]}])
    assert r.status_code == 422
    body = r.json()
    assert body["detail"][0]["loc"] == ["body", "facts", 1, "relation"]
    assert "unknown relation 'directed_by'" in body["message"] and "genre, creator" in body["message"]
    assert "rev_<name>" in body["message"]
    r = post(client, "new-1", [{"relation": "genre", "entity": "m.nothing"}])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "facts", 0, "entity"]
    assert "unknown entity 'm.nothing'" in r.json()["message"]
    # interact is not a KG relation; an item id is not an entity id
    assert post(client, "new-1", [{"relation": "interact", "entity": facts[0]["entity"]}]).status_code == 422
    # the inverse of a KG relation is accepted: the item is the triple's tail
    r = post(client, "new-rev", [{"relation": "rev_creator_genre", "entity": facts[0]["entity"]}])
    assert r.status_code == 201, r.text
    assert client.get("/v1/model").json()["posted_items"]["count"] == 1  # the 422s added nothing


@pytest.mark.parametrize(("facts", "message"), [
    ([], "at least one"),
    ([{"relation": "genre", "entity": f"e{k}"} for k in range(21)], "at most 20 facts per item, got 21"),
])
def test_fact_counts_are_422(client, facts, message):
    r = post(client, "new-2", facts)
    assert r.status_code == 422 and message in r.json()["message"]
    assert r.json()["detail"][0]["loc"] == ["body", "facts"]


@pytest.mark.parametrize("body", [
    {"item_id": "x", "facts": [{"relation": "genre"}]},
    {"item_id": "x", "facts": [{"relation": "genre", "entity": "e1", "weight": 1}]},
    {"item_id": "", "facts": [{"relation": "genre", "entity": "e1"}]},
    {"item_id": "x" * 257, "facts": [{"relation": "genre", "entity": "e1"}]},
    {"facts": [{"relation": "genre", "entity": "e1"}]},
    {"item_id": "x", "facts": [{"relation": "genre", "entity": "e1"}], "extra": 1},
])
def test_malformed_bodies_are_422(client, body):
    r = client.post("/v1/items", json=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["message"]


def test_duplicates_are_409(client, world):
    facts = facts_of(world["full"], int(HELD[0]))
    catalogue_item = world["snapshot"].items["item_id"][0]
    r = post(client, catalogue_item, facts)
    assert r.status_code == 409 and r.json() == {"detail": f"item '{catalogue_item}' is in the catalogue"}
    assert post(client, "new-3", facts).status_code == 201
    r = post(client, "new-3", facts)
    assert r.status_code == 409 and r.json() == {"detail": "item 'new-3' is posted already"}


def test_posting_needs_the_token(world, tmp_path):
    facts = facts_of(world["full"], int(HELD[0]))
    with TestClient(app_for(world, tmp_path)) as c:
        assert post(c, "new-4", facts, headers={}).status_code == 401
        assert post(c, "new-4", facts, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/users/u1/candidates?k=5").status_code == 200  # reads stay open on loopback
    with TestClient(app_for(world, tmp_path / "other", token=None)) as c:  # like /admin: disabled
        r = post(c, "new-4", facts)
        assert r.status_code == 403 and "posting items is disabled" in r.json()["detail"]


def test_a_model_that_cannot_embed_answers_409(service, world, tmp_path):
    app = create_app(lambda: (CandidateService(service.bundle), {"name": "m", "version": "3"}), token=TOKEN,
                     overlay_root=tmp_path)
    with TestClient(app) as c:
        r = post(c, "new-5", [{"relation": "genre", "entity": "e1"}])
        assert r.status_code == 409
        assert r.json()["detail"].startswith("bprmf (m v3) cannot embed new items: only KGAT bundles")
        assert c.get("/v1/model").json()["posted_items"] == {"count": 0, "accepts": False}
    # a KGAT bundle served without an overlay store cannot keep a posted item: refused too
    with TestClient(app_for(world, None)) as c:
        r = post(c, "new-5", facts_of(world["full"], int(HELD[0])))
        assert r.status_code == 409 and "no overlay store" in r.json()["detail"]


# ---------------------------------------------------------------------------- durability, workers
def test_a_restart_serves_the_posted_items(world, tmp_path):
    full = world["full"]
    posted = {item_id_of(full, int(i)): facts_of(full, int(i)) for i in HELD[:3]}
    with TestClient(app_for(world, tmp_path)) as c:
        for item_id, facts in posted.items():
            assert post(c, item_id, facts).status_code == 201
    with TestClient(app_for(world, tmp_path)) as c:  # a new process on the same serve cache
        info = c.get("/v1/model").json()
        assert info["posted_items"]["count"] == 3
        item_id, facts = next(iter(posted.items()))
        user_id, _ = best_user(world, offline_vector(world, facts))
        assert item_id in candidate_ids(c, user_id, 10)
        assert post(c, item_id, facts).status_code == 409  # still a duplicate after the restart
    assert [i.item_id for i in read_overlay_items(tmp_path, MODEL)] == list(posted)


def test_two_workers_share_posted_items(world, tmp_path):
    full = world["full"]
    item_a, item_b = item_id_of(full, int(HELD[3])), item_id_of(full, int(HELD[4]))
    facts_a, facts_b = facts_of(full, int(HELD[3])), facts_of(full, int(HELD[4]))
    user_a, _ = best_user(world, offline_vector(world, facts_a))
    with (TestClient(app_for(world, tmp_path, overlay_poll_interval_s=0.05)) as one,
          TestClient(app_for(world, tmp_path, overlay_poll_interval_s=0.05)) as two):
        assert post(one, item_a, facts_a).status_code == 201
        deadline = time.monotonic() + 10
        while item_a not in candidate_ids(two, user_a, 10):  # worker two's poll picks it up
            assert time.monotonic() < deadline, "the other worker never served the posted item"
            time.sleep(0.05)
        assert two.get("/v1/model").json()["posted_items"]["count"] == 1
        # the same new item posted to both at once: one 201, one 409
        for attempt in range(3):
            item_id = f"{item_b}-{attempt}"
            start = threading.Barrier(2)
            codes = {}

            def send(name, c, start=start, codes=codes, item_id=item_id):
                start.wait()
                codes[name] = post(c, item_id, facts_b).status_code

            threads = [threading.Thread(target=send, args=(n, c)) for n, c in (("one", one), ("two", two))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(codes.values()) == [201, 409], codes
    lines = (tmp_path / MODEL / "overlays" / "v1.jsonl").read_text().splitlines()
    ids = [json.loads(line)["item_id"] for line in lines]
    assert ids == [item_a] + [f"{item_b}-{a}" for a in range(3)]


def test_a_torn_last_line_is_cut_and_skipped(world, tmp_path):
    full = world["full"]
    overlay = ItemOverlay(tmp_path, MODEL, "1")
    overlay.path.parent.mkdir(parents=True)
    good = {"item_id": "kept", "facts": facts_of(full, int(HELD[0])), "name": None}
    overlay.path.write_text(json.dumps(good) + "\n" + '{"item_id": "torn", "fac')  # a writer died mid-line
    with TestClient(app_for(world, tmp_path)) as c:
        assert c.get("/v1/model").json()["posted_items"]["count"] == 1
        assert post(c, "after", facts_of(full, int(HELD[1]))).status_code == 201
    assert [json.loads(x)["item_id"] for x in overlay.path.read_text().splitlines()] == ["kept", "after"]


def test_a_new_version_carries_the_posted_items_over(world, tmp_path):
    """Items posted while v1 served, on a v2 that does not have them: embedded by v2, served."""
    full = world["full"]
    item_id, facts = item_id_of(full, int(HELD[5])), facts_of(full, int(HELD[5]))
    with TestClient(app_for(world, tmp_path, version="1")) as c:
        assert post(c, item_id, facts).status_code == 201
    with TestClient(app_for(world, tmp_path, version="2")) as c:
        assert c.get("/v1/model").json()["posted_items"]["count"] == 1
        user_id, _ = best_user(world, offline_vector(world, facts))
        assert item_id in candidate_ids(c, user_id, 10)
        assert post(c, item_id, facts).status_code == 409
        assert post(c, "v2-item", facts).status_code == 201
    assert (tmp_path / MODEL / "overlays" / "v2.jsonl").read_text().count("\n") == 1
    assert [i.item_id for i in read_overlay_items(tmp_path, MODEL)] == [item_id, "v2-item"]


@pytest.mark.parametrize("new_version", ["1", "2"])
def test_an_item_posted_during_a_reload_is_in_the_new_snapshot(world, tmp_path, monkeypatch, new_version):
    """The post lands after the reload read the overlays and before it swapped (to the same version,
    or to a new one while the post goes to the old one's file): the swap's catch-up, under the lock
    posts take, adds it to the new snapshot."""
    import kgrec.serving.state as state_module

    full = world["full"]
    item_id, facts = item_id_of(full, int(HELD[1])), facts_of(full, int(HELD[1]))
    verifying, release = threading.Event(), threading.Event()
    real_verify = state_module.verify_served

    def slow_verify(served):
        real_verify(served)
        if reloading.is_set():
            verifying.set()
            assert release.wait(10)

    reloading = threading.Event()
    monkeypatch.setattr(state_module, "verify_served", slow_verify)
    version = {"now": "1"}
    load = bundle_loader(world["bundle_dir"])

    def loader():
        service, info = load()
        return service, {**info, "name": MODEL, "version": version["now"]}

    app = create_app(loader, token=TOKEN, overlay_root=tmp_path, overlay_poll_interval_s=0)
    with TestClient(app) as c:
        state = app.state.kgrec
        old = state.current
        version["now"] = new_version
        reloading.set()
        result = {}
        reloader = threading.Thread(target=lambda: result.update(state.reload(True, "test")))
        reloader.start()
        assert verifying.wait(10)  # the new snapshot is built (overlay read), not swapped yet
        assert post(c, item_id, facts).status_code == 201  # goes to the old snapshot and the file
        release.set()
        reloader.join(10)
        assert result["status"] == "reloaded" and state.current is not old
        assert state.current.summary["version"] == new_version
        assert state.current.retriever.has_item(item_id)
        user_id, _ = best_user(world, offline_vector(world, facts))
        assert item_id in candidate_ids(c, user_id, 10)


def test_versions_that_cannot_embed_load_and_report_the_posted_items(world, service, tmp_path):
    """A bprmf (or multi-interest) version after a KGAT one: it serves, says how many posted items
    it cannot serve, and refuses new posts with 409."""
    full = world["full"]
    with TestClient(app_for(world, tmp_path, version="1")) as c:
        assert post(c, "posted-to-kgat", facts_of(full, int(HELD[0]))).status_code == 201
    app = create_app(lambda: (CandidateService(service.bundle), {"name": MODEL, "version": "2"}), token=TOKEN,
                     overlay_root=tmp_path)
    with TestClient(app) as c:
        assert c.get("/v1/model").json()["posted_items"] == {"count": 0, "accepts": False, "not_applied": 1}
        assert c.get("/v1/users/u1/candidates?k=3").status_code == 200
        assert post(c, "x", facts_of(full, int(HELD[0]))).status_code == 409
