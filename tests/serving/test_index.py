import json
import os

import faiss
import kgrec.serving.index as index_module
import numpy as np
import pytest
from kgrec.serving.index import (
    IndexConfig,
    ann_recall,
    build_and_measure,
    build_index,
    faiss_threads,
    index_kind,
    kmeans_sample,
    load_index,
    resolve_kind,
    save_index,
)
from kgrec.serving.integrity import IntegrityError, write_manifest


@pytest.fixture(scope="module")
def clustered():
    """~20k random vectors around 64 random centres (planted structure), plus queries."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((64, 32)).astype(np.float32) * 1.5
    x = centres[rng.integers(0, 64, 20_000)] + rng.standard_normal((20_000, 32)).astype(np.float32)
    q = centres[rng.integers(0, 64, 300)] + rng.standard_normal((300, 32)).astype(np.float32)
    return x.astype(np.float32), q.astype(np.float32)


def test_auto_kind():
    cfg = IndexConfig(exact_threshold=1000)
    assert resolve_kind(1000, cfg) == "flat"
    assert resolve_kind(1001, cfg) == "auto"  # chosen by measurement
    assert resolve_kind(1001, IndexConfig(exact_threshold=1000, auto_ann="ivf")) == "ivf"
    assert resolve_kind(10, IndexConfig(kind="ivf_hnsw")) == "ivf_hnsw"
    with pytest.raises(ValueError):
        IndexConfig(kind="lsh")


def test_flat_equals_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 24)).astype(np.float32)
    q = rng.standard_normal((50, 24)).astype(np.float32)
    index = build_index(x, IndexConfig())
    assert index_kind(index) == "flat"
    D, I = index.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    np.testing.assert_array_equal(I, exact)
    np.testing.assert_allclose(D, np.take_along_axis(q @ x.T, exact, 1), rtol=1e-5)
    assert ann_recall(index, x, q, 100) == 1.0


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_defaults(clustered, kind):
    x, q = clustered
    cfg = IndexConfig(kind=kind, target_recall=None, tune_queries=300)
    index, info = build_and_measure(x, cfg, queries=q, k=100)
    assert index_kind(index) == kind
    r = ann_recall(index, x, q, 100)
    assert r >= 0.9, (kind, r)
    assert info["ann_recall"] == pytest.approx(r, abs=1e-9)
    assert info["kind"] == kind and info["ntotal"] == 20_000 and info["dim"] == 32


def test_ivf_tuning_reaches_target_on_isotropic_data():
    # isotropic Gaussians are the worst case for IVF; the tuner raises nprobe until recall >= target
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8000, 32)).astype(np.float32)
    q = rng.standard_normal((100, 32)).astype(np.float32)
    index, info = build_and_measure(x, IndexConfig(kind="ivf", target_recall=0.9), queries=q, k=50)
    assert info["ann_recall"] >= 0.9
    assert ann_recall(index, x, q, 50) == pytest.approx(info["ann_recall"])
    assert info["nprobe"] <= info["nlist"]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf_hnsw", "hnsw"])
def test_save_load(tmp_path, clustered, kind):
    x, q = clustered
    x = x[:5000]
    index, info = build_and_measure(x, IndexConfig(kind=kind), queries=q, k=20)
    out = save_index(index, tmp_path / "index", info)
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "index.json", "items.faiss"]
    stored = json.loads((out / "index.json").read_text())
    for key in ("kind", "ntotal", "dim", "ann_recall", "build_seconds", "config"):
        assert key in stored
    loaded, linfo = load_index(out)
    assert linfo["kind"] == kind and loaded.ntotal == 5000
    np.testing.assert_array_equal(loaded.search(q, 20)[1], index.search(q, 20)[1])
    # overwrite in place leaves no temp directories around
    save_index(index, out, info)
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_load_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="items.faiss"):
        load_index(tmp_path)
    index = build_index(np.eye(4, dtype=np.float32))
    save_index(index, tmp_path / "i", {})
    info = json.loads((tmp_path / "i" / "index.json").read_text())
    info["ntotal"] = 5
    (tmp_path / "i" / "index.json").write_text(json.dumps(info))
    with pytest.raises(IntegrityError, match="index.json"):  # the manifest catches the edit first
        load_index(tmp_path / "i")
    write_manifest(tmp_path / "i")  # re-signed: index.json still has to agree with the stored index
    with pytest.raises(IntegrityError, match="ntotal 5 != stored 4"):
        load_index(tmp_path / "i")


def test_build_restores_threads():
    before = faiss.omp_get_max_threads()
    build_index(np.eye(8, dtype=np.float32), IndexConfig(build_threads=1))
    assert faiss.omp_get_max_threads() == before


# --- kind="auto": the measured choice -------------------------------------------------------------


def _mixture(n, d, clusters, seed, m=0):
    """Power-law cluster sizes, un-normalised (log-normal norms), like item embeddings; plus ``m``
    queries from the same mixture."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, clusters + 1)
    w /= w.sum()
    centres = rng.standard_normal((clusters, d)).astype(np.float32) / np.sqrt(d)

    def draw(k):
        noise = 0.6 / np.sqrt(d) * rng.standard_normal((k, d)).astype(np.float32)
        v = centres[rng.choice(clusters, k, p=w)] + noise
        return (v * rng.lognormal(0.0, 0.3, (k, 1))).astype(np.float32)

    return draw(n), draw(m)


class TrainSpy:
    """Records (training points, nlist, OpenMP threads) of every IVF k-means."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = faiss.IndexIVFFlat.train

        def train(index, x):
            self.calls.append((x.shape[0], index.nlist, faiss.omp_get_max_threads()))
            return original(index, x)

        monkeypatch.setattr(faiss.IndexIVFFlat, "train", train)


@pytest.fixture(scope="module")
def auto_built(tmp_path_factory):
    """One auto build over 60k x 32 (IVF family + exact search), saved; its queries and held-out queries."""
    x, q = _mixture(60_000, 32, 60, seed=11, m=600)
    cfg = IndexConfig(exact_threshold=10_000, auto_ann="ivf", build_threads=2)
    index, info = build_and_measure(x, cfg, queries=q[:300], k=100)
    out = save_index(index, tmp_path_factory.mktemp("auto") / "index", info)
    return x, q[300:], index, info, out


def test_auto_choice_meets_its_target_recall(auto_built):
    x, heldout, index, info, _ = auto_built
    auto = info["auto"]
    assert info["kind"] == "ivf"  # exact search is ~4x slower at 60k x 32: an IVF must win
    assert auto["choice"]["kind"] == "ivf" and auto["choice"]["params"]["nprobe"] == info["nprobe"]
    assert info["ann_recall"] - info["ann_recall_se"] >= 0.95  # on the tuning sample, with the margin
    assert ann_recall(index, x, heldout, 100) >= 0.93  # on queries the tuning never saw
    met = [c for c in auto["candidates"] if c["status"] in ("measured", "chosen")]
    chosen = next(c for c in auto["candidates"] if c["status"] == "chosen")
    assert min(met, key=lambda c: c["p50_ms"]) is chosen
    assert all(c["recall"] - c.get("recall_se", 0) >= 0.95 for c in met)
    # the sweep went upward and stopped at the first grid value that met the target
    probes = [p[0] for p in chosen["sweep"]]
    assert probes == sorted(probes) and probes[-1] == chosen["params"]["nprobe"]
    assert all(r - se < 0.95 for _, r, se, _ in chosen["sweep"][:-1])
    _, r, se, _ = chosen["sweep"][-1]
    assert r - se >= 0.95 and r == chosen["recall"]


def test_auto_choice_is_recorded_in_index_json(auto_built):
    x, heldout, index, info, out = auto_built
    stored = json.loads((out / "index.json").read_text())
    auto = stored["auto"]
    assert auto["target_recall"] == 0.95 and auto["tune_queries"] == 256 and auto["recall_k"] == 100
    kinds = [c["kind"] for c in auto["candidates"]]
    assert kinds[0] == "flat" and "ivf" in kinds
    for c in auto["candidates"]:
        assert c["status"] in ("chosen", "measured", "below target", "skipped"), c
        assert "estimated_build_s" in c and "params" in c
        if c["status"] in ("chosen", "measured"):
            assert c["p50_ms"] > 0 and c["p99_ms"] >= c["p50_ms"] and c["memory_bytes"] > 0
        if c["status"] in ("skipped", "below target"):
            assert c["reason"]
    choice = auto["choice"]
    assert set(choice) >= {"kind", "params", "recall", "p50_ms", "p99_ms", "build_s", "memory_bytes"}
    assert stored["nprobe"] == choice["params"]["nprobe"] and stored["nlist"] == choice["params"]["nlist"]
    assert stored["latency_p50_ms"] == choice["p50_ms"] and stored["ann_recall"] == choice["recall"]
    loaded, _ = load_index(out)
    assert faiss.downcast_index(loaded).nprobe == stored["nprobe"]
    np.testing.assert_array_equal(loaded.search(heldout[:20], 10)[1], index.search(heldout[:20], 10)[1])


def test_auto_budget_skips_a_candidate_whose_estimate_exceeds_it(monkeypatch):
    x, q = _mixture(12_000, 16, 40, seed=3, m=100)
    cfg = IndexConfig(exact_threshold=1000, auto_ann="ivf", build_budget_s=30)
    estimate = index_module.estimate_ivf_seconds
    monkeypatch.setattr(index_module, "estimate_ivf_seconds",
                        lambda n, d, nlist, c, r: 1e6 if nlist == 128 else estimate(n, d, nlist, c, r))
    spy = TrainSpy(monkeypatch)
    _, info = build_and_measure(x, cfg, queries=q, k=50)
    by_nlist = {c["params"]["nlist"]: c for c in info["auto"]["candidates"] if c["kind"] == "ivf"}
    assert index_module.auto_nlists(12_000) == [128, 256]
    assert index_module.auto_nlists(10**6) == [1024, 2048, 4096]
    assert sorted(by_nlist) == [128, 256]  # 4 sqrt(12k) ~ 512 is capped: 12k / 39 = 307 -> 256
    assert by_nlist[128]["status"] == "skipped" and by_nlist[128]["estimated_build_s"] >= 0.5e6
    assert by_nlist[128]["reason"].startswith("estimated build ") and "build_s" not in by_nlist[128]
    assert by_nlist[256]["status"] != "skipped" and by_nlist[256]["build_s"] > 0
    assert [nlist for _, nlist, _ in spy.calls] == [256]  # the skipped one never trained


def test_auto_with_no_budget_left_builds_nothing_but_exact_search(monkeypatch):
    x, q = _mixture(30_000, 16, 40, seed=4, m=50)
    spy = TrainSpy(monkeypatch)
    cfg = IndexConfig(exact_threshold=1000, build_budget_s=1e-3)
    index, info = build_and_measure(x, cfg, queries=q, k=20)
    assert info["kind"] == "flat" and info["ann_recall"] == 1.0 and index.ntotal == 30_000
    skipped = [c for c in info["auto"]["candidates"] if c["kind"] != "flat"]
    assert {c["kind"] for c in skipped} == {"ivf", "hnsw"}
    assert all(c["status"] == "skipped" for c in skipped) and spy.calls == []


def test_kmeans_trains_on_a_bounded_seeded_sample(monkeypatch):
    x, q = _mixture(10_000, 16, 40, seed=5, m=50)
    cfg = IndexConfig(kind="ivf", ivf_nlist=100, kmeans_max_points_per_centroid=30, target_recall=None)
    a, b = kmeans_sample(x, 100, cfg), kmeans_sample(x, 100, cfg)
    assert a.shape == (3000, 16)
    np.testing.assert_array_equal(a, b)  # fixed seed
    assert kmeans_sample(x, 1000, cfg) is x  # 30 x 1000 > 10k: all of them
    spy = TrainSpy(monkeypatch)
    build_index(x, cfg)
    assert [(n, nlist) for n, nlist, _ in spy.calls] == [(3000, 100)]
    spy.calls.clear()
    cfg = IndexConfig(exact_threshold=1000, auto_ann="ivf", kmeans_max_points_per_centroid=40)
    _, info = build_and_measure(x, cfg, queries=q, k=20)
    built = {c["params"]["nlist"]: c for c in info["auto"]["candidates"] if c.get("train_points")}
    assert spy.calls and all(n <= 40 * nlist for n, nlist, _ in spy.calls)
    recorded = sorted((c["train_points"], nlist) for nlist, c in built.items())
    assert sorted((n, nlist) for n, nlist, _ in spy.calls) == recorded


def test_build_threads_come_from_the_cpu_quota(monkeypatch):
    x, q = _mixture(8000, 16, 20, seed=6, m=50)
    monkeypatch.setattr(index_module, "cpu_quota", lambda: 3)
    spy = TrainSpy(monkeypatch)
    before = faiss.omp_get_max_threads()
    _, info = build_and_measure(x, IndexConfig(exact_threshold=1000, auto_ann="ivf"), queries=q, k=20)
    assert info["threads"] == 3 and info["auto"]["threads"] == 3
    assert spy.calls and {t for _, _, t in spy.calls} == {3}
    assert faiss.omp_get_max_threads() == before
    _, info = build_and_measure(x, IndexConfig(kind="ivf", build_threads=1), queries=q, k=20)
    assert info["threads"] == 1 and spy.calls[-1][2] == 1


def test_faiss_threads_default_is_the_affinity_mask_not_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    with faiss_threads(None):
        assert faiss.omp_get_max_threads() == 1
    with faiss_threads(2):
        assert faiss.omp_get_max_threads() == 2


def test_an_offline_pass_opens_the_bundle_on_an_exact_index(make_bundle, tmp_path, monkeypatch):
    """The popularity-bias pass at registration serves 500 users: it must not pay the measured ANN
    build (up to build_budget_s) that the published index pays once more right after."""
    from kgrec.serving import index as index_module
    from kgrec.serving.champion import open_service

    bundle_dir = make_bundle(n_items=800).write(tmp_path / "bundle")
    monkeypatch.setattr(index_module.IndexConfig.model_fields["exact_threshold"], "default", 10)
    index_module.IndexConfig.model_rebuild(force=True)
    try:
        assert index_module.IndexConfig().exact_threshold == 10
        exact = open_service(bundle_dir, exact=True)
        assert index_module.index_kind(exact.index) == "flat"
    finally:
        monkeypatch.undo()
        index_module.IndexConfig.model_rebuild(force=True)
    assert index_module.IndexConfig().exact_threshold == 50_000
