"""Synthetic retrieval bundles with planted structure for the serving tests."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from kgrec.serving.bundle import RetrievalBundle
from kgrec.serving.candidates import CandidateService


def make_bundle(
    n_users: int = 300,
    n_items: int = 800,
    dim: int = 16,
    n_clusters: int = 8,
    seen_per_user: int = 30,
    seed: int = 0,
) -> RetrievalBundle:
    """Users and items drawn around shared cluster centres; each user has 'seen' the items of its
    own cluster that score highest for it, so the unfiltered top-k is dominated by seen items."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 2.0
    uc = rng.integers(0, n_clusters, n_users)
    ic = np.arange(n_items) % n_clusters
    ue = (centres[uc] + rng.standard_normal((n_users, dim))).astype(np.float32)
    ie = (centres[ic] + rng.standard_normal((n_items, dim))).astype(np.float32)
    scores = ue @ ie.T
    rows, cols = [], []
    for u in range(n_users):
        top = np.argsort(-scores[u])[: seen_per_user * 2]
        pick = rng.choice(top, seen_per_user, replace=False)
        rows.extend([u] * seen_per_user)
        cols.extend(pick.tolist())
    seen = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items)
    )
    # id maps in shuffled row order, to catch code that assumes row == idx
    uperm, iperm = rng.permutation(n_users), rng.permutation(n_items)
    users = pl.DataFrame({"user_id": [f"u{i}" for i in uperm], "user_idx": uperm.astype(np.int32)})
    items = pl.DataFrame(
        {
            "item_id": [f"i{i}" for i in iperm],
            "item_idx": iperm.astype(np.int32),
            "name": [None if i % 7 == 0 else f"item {i}" for i in iperm],
        }
    )
    meta = {"model": "bprmf", "dataset": "synthetic", "snapshot_hash": "deadbeef"}
    return RetrievalBundle(ue, ie, seen, users, items, meta)


@pytest.fixture(scope="session", name="make_bundle")
def make_bundle_fixture():
    """The bundle factory (test modules cannot import conftest: tests/ is not a package)."""
    return make_bundle


@pytest.fixture(scope="session")
def bundle() -> RetrievalBundle:
    return make_bundle()


@pytest.fixture(scope="session")
def service(bundle: RetrievalBundle) -> CandidateService:
    return CandidateService(bundle)


@pytest.fixture(scope="session")
def model_info() -> dict:
    return dict(MODEL_INFO)


MODEL_INFO = {
    "name": "kgrec-retrieval",
    "version": "3",
    "alias": "champion",
    "run_id": "abc123",
    "model": "bprmf",
    "dataset": "synthetic",
}


def _log_and_load_pyfunc(tmp_path, bundle_dir):
    """Log a bundle as registration does (models-from-code, staged kgrec code) to a throwaway
    sqlite MLflow store under ``tmp_path`` and load it back as the pyfunc a deployment would get;
    the global tracking URI is restored afterwards."""
    import mlflow
    from kgrec.serving.pyfunc import log_bundle_model

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        exp = mlflow.create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = log_bundle_model(bundle_dir, "model")
        return mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def log_and_load_pyfunc():
    """:func:`_log_and_load_pyfunc` (a fixture because test modules cannot import conftest)."""
    return _log_and_load_pyfunc
