import json

import numpy as np
import pytest
import scipy.sparse as sp
from kgrec.serving.bundle import BUNDLE_FILES, BundleError, RetrievalBundle


def test_round_trip(tmp_path, bundle):
    out = bundle.write(tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES)
    loaded = RetrievalBundle.load(out)
    np.testing.assert_array_equal(loaded.user_embeddings, bundle.user_embeddings)
    np.testing.assert_array_equal(loaded.item_embeddings, bundle.item_embeddings)
    assert loaded.user_embeddings.dtype == np.float32
    assert (loaded.seen != bundle.seen).nnz == 0
    assert loaded.users.equals(bundle.users)
    assert loaded.items.equals(bundle.items)
    assert loaded.meta == bundle.meta
    assert loaded.meta["dim"] == 16 and loaded.meta["n_items"] == 800


def test_write_overwrites_atomically(tmp_path, bundle, make_bundle):
    target = tmp_path / "b"
    bundle.write(target)
    small = make_bundle(n_users=10, n_items=20, dim=4, seen_per_user=2)
    small.write(target)
    assert RetrievalBundle.load(target).n_items == 20
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp leftovers


def test_missing_file(tmp_path, bundle):
    out = bundle.write(tmp_path / "b")
    (out / "seen.npz").unlink()
    with pytest.raises(BundleError, match="missing seen.npz"):
        RetrievalBundle.load(out)
    with pytest.raises(BundleError, match="does not exist"):
        RetrievalBundle.load(tmp_path / "nope")


def test_shape_mismatch(tmp_path, bundle):
    out = bundle.write(tmp_path / "b")
    np.save(out / "item_embeddings.npy", np.zeros((5, 16), np.float32))
    with pytest.raises(BundleError, match="seen matrix shape"):
        RetrievalBundle.load(out)
    bundle.write(out)
    np.save(out / "user_embeddings.npy", np.zeros((300, 8), np.float32))
    with pytest.raises(BundleError, match="dims differ"):
        RetrievalBundle.load(out)
    bundle.write(out)
    meta = json.loads((out / "meta.json").read_text())
    meta["dim"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="meta dim"):
        RetrievalBundle.load(out)


def test_id_map_checks(bundle):
    with pytest.raises(BundleError, match="rows"):
        RetrievalBundle(bundle.user_embeddings, bundle.item_embeddings, bundle.seen,
                        bundle.users.head(10), bundle.items, {})
    dup = bundle.items.with_columns(item_idx=bundle.items["item_idx"] * 0)
    with pytest.raises(BundleError, match="permutation"):
        RetrievalBundle(bundle.user_embeddings, bundle.item_embeddings, bundle.seen,
                        bundle.users, dup, {})
    with pytest.raises(BundleError, match="seen"):
        RetrievalBundle(bundle.user_embeddings, bundle.item_embeddings, sp.csr_matrix((3, 3)),
                        bundle.users, bundle.items, {})


def test_a_failed_write_leaves_the_previous_artefact_and_no_leftovers(tmp_path, bundle):
    from kgrec.serving.files import atomic_directory

    target = bundle.write(tmp_path / "b")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(target) as tmp:
        (tmp / "meta.json").write_text("{}")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == before
    assert RetrievalBundle.load(target).n_items == bundle.n_items
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
