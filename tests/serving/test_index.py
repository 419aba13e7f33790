import json

import faiss
import numpy as np
import pytest
from kgrec.serving.index import (
    IndexConfig,
    ann_recall,
    build_and_measure,
    build_index,
    index_kind,
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
    assert resolve_kind(1001, cfg) == "hnsw"
    assert resolve_kind(1001, IndexConfig(exact_threshold=1000, auto_ann="ivf")) == "ivf"
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
    index = build_index(x, IndexConfig(kind=kind))
    assert index_kind(index) == kind
    r = ann_recall(index, x, q, 100)
    assert r >= 0.9, (kind, r)
    _, info = build_and_measure(x, IndexConfig(kind=kind, target_recall=None), queries=q, k=100)
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


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
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
