"""The bundle contract: every kind writes atomically with a checksum manifest and loads through
``load_bundle``; a tampered or incomplete bundle is refused naming the file; old bundles (no
manifest) still load. Plus the embedding bundle's own checks and the torch save/load helper."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
from kgrec.features.dataset import InteractionData
from kgrec.models.persistence import PersistenceError, load_state, save_module
from kgrec.models.rankers.kcan import KCAN
from kgrec.models.retrievers.kgat import interaction_ckg
from kgrec.models.sequential.comirec_sa import ComiRecSA
from kgrec.serving.bundle import (
    BUNDLE_FILES,
    MANIFEST_FILE,
    Bundle,
    BundleError,
    RetrievalBundle,
    bundle_kind,
    load_bundle,
    write_manifest,
)
from kgrec.serving.multi_interest import MultiInterestBundle
from kgrec.serving.ranking import RankerBundle

MI_ITEMS, MI_USERS = 30, 25
RK_USERS, RK_ITEMS = 20, 40


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mi_bundle() -> MultiInterestBundle:
    torch.manual_seed(0)
    model = ComiRecSA(MI_ITEMS, embedding_dim=8, num_interests=2, max_length=5)
    rng = np.random.default_rng(0)
    iperm = rng.permutation(MI_ITEMS)
    items = pl.DataFrame({
        "item_id": [f"m{i}" for i in iperm], "item_idx": iperm.astype(np.int32),
        "name": [f"movie {i}" for i in iperm], "categories": [[f"g{i % 3}"] for i in iperm],
    })
    users = pl.DataFrame({"user_id": [f"u{u}" for u in range(MI_USERS)], "user_idx": np.arange(MI_USERS)})
    histories = [rng.integers(0, MI_ITEMS, int(rng.integers(0, 9))) for _ in range(MI_USERS)]
    meta = {"model": "comirec_sa", "dataset": "synthetic", "snapshot_hash": "feed"}
    return MultiInterestBundle.from_model(model, items, users, histories, meta)


@pytest.fixture(scope="module")
def ranker_bundle() -> RankerBundle:
    rng = np.random.default_rng(1)
    rows = np.repeat(np.arange(RK_USERS), 5)
    cols = rng.integers(0, RK_ITEMS, rows.size)
    train = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(RK_USERS, RK_ITEMS))
    empty = sp.csr_matrix((RK_USERS, RK_ITEMS), dtype=np.float32)
    data = InteractionData(RK_USERS, RK_ITEMS, train, empty, empty, snapshot=None, split=None)
    torch.manual_seed(0)
    model = KCAN(RK_USERS, RK_ITEMS, interaction_ckg(data), embedding_dim=8, layer_sizes=(8,), relation_dim=8,
                 neighbours_per_node=2, local_dim=4, tower_dim=8).eval()
    users = pl.DataFrame({"user_id": [f"u{RK_USERS - 1 - i}" for i in range(RK_USERS)], "user_idx": np.arange(RK_USERS)})
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(RK_ITEMS)], "item_idx": np.arange(RK_ITEMS)})
    return RankerBundle(model, users, items, {"model": "kcan", "alpha": 0.25, "num_candidates": 30})


@pytest.fixture(params=["embedding", "multi_interest", "ranker"])
def any_bundle(request, bundle, mi_bundle, ranker_bundle) -> Bundle:
    return {"embedding": bundle, "multi_interest": mi_bundle, "ranker": ranker_bundle}[request.param]


def _manifest(directory) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text())["files"]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------- the contract
def test_every_kind_round_trips_through_load_bundle(tmp_path, any_bundle):
    out = any_bundle.write(tmp_path / "b")
    assert bundle_kind(out) == any_bundle.kind == any_bundle.meta["kind"]
    loaded = load_bundle(out)
    assert type(loaded) is type(any_bundle)
    assert type(any_bundle).load(out).meta == loaded.meta  # the subclass entry point too
    assert loaded.meta == any_bundle.meta
    assert loaded.users.equals(any_bundle.users) and loaded.items.equals(any_bundle.items)
    assert (loaded.n_users, loaded.n_items) == (any_bundle.n_users, any_bundle.n_items)
    if isinstance(any_bundle, RetrievalBundle):
        np.testing.assert_array_equal(loaded.user_embeddings, any_bundle.user_embeddings)
        np.testing.assert_array_equal(loaded.item_embeddings, any_bundle.item_embeddings)
        assert (loaded.seen != any_bundle.seen).nnz == 0
    elif isinstance(any_bundle, MultiInterestBundle):
        np.testing.assert_array_equal(loaded.item_embeddings, any_bundle.item_embeddings)
        assert len(loaded.histories) == len(any_bundle.histories)
        assert all(np.array_equal(a, b) for a, b in zip(loaded.histories, any_bundle.histories))
        assert type(loaded.model) is type(any_bundle.model)
        _same_state(loaded.model, any_bundle.model)
        assert loaded.items["categories"].to_list() == any_bundle.items["categories"].to_list()
    else:
        _same_state(loaded.model, any_bundle.model)
        assert loaded.alpha == 0.25 and loaded.num_candidates == 30
        users, items = torch.arange(10), torch.arange(10, 20)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model.score_pairs(users, items),
                                       any_bundle.model.score_pairs(users, items))
    # the manifest covers every file (recursively) but itself, with its size
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    manifest = _manifest(out)
    assert sorted(manifest) == [f for f in files if f != MANIFEST_FILE] and MANIFEST_FILE in files
    assert all(manifest[f]["size"] == (out / f).stat().st_size for f in manifest)
    assert set(any_bundle.required_files()) <= set(manifest)


def test_a_flipped_byte_in_any_file_is_refused_naming_it(tmp_path, any_bundle):
    clean = any_bundle.write(tmp_path / "clean")
    for name in _manifest(clean):
        target = tmp_path / "b"
        shutil.copytree(clean, target)
        path = target / name
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
        with pytest.raises(BundleError, match=rf"{name} fails its checksum"):
            load_bundle(target)
        shutil.rmtree(target)


def test_item_embeddings_overwritten_with_nans_at_the_same_size_are_refused(tmp_path, bundle, mi_bundle):
    for b in (bundle, mi_bundle):
        out = b.write(tmp_path / b.kind)
        size = (out / "item_embeddings.npy").stat().st_size
        np.save(out / "item_embeddings.npy", np.full_like(b.item_embeddings, np.nan))
        assert (out / "item_embeddings.npy").stat().st_size == size
        with pytest.raises(BundleError, match="item_embeddings.npy fails its checksum"):
            load_bundle(out)


def test_a_truncated_or_deleted_file_is_refused_naming_it(tmp_path, any_bundle):
    out = any_bundle.write(tmp_path / "b")
    for name in _manifest(out):
        copy = tmp_path / "c"
        shutil.copytree(out, copy)
        (copy / name).unlink()
        with pytest.raises(BundleError, match=rf"missing {name}"):
            load_bundle(copy)
        shutil.rmtree(copy)
    with (out / "users.parquet").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="users.parquet has"):
        load_bundle(out)


def test_files_added_after_writing_are_ignored(tmp_path, bundle, caplog):
    out = bundle.write(tmp_path / "b")
    (out / "index").mkdir()
    (out / "index" / "index.json").write_text("{}")
    (out / "notes.txt").write_text("hi")
    with caplog.at_level(logging.WARNING, logger="kgrec.serving"):
        assert load_bundle(out).n_items == bundle.n_items
    assert "notes.txt" in caplog.text and "index.json" not in caplog.text


def test_bundles_without_a_manifest_still_load_with_a_warning(tmp_path, any_bundle, caplog):
    out = any_bundle.write(tmp_path / "b")
    (out / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="kgrec.serving"):
        loaded = load_bundle(out)
    assert type(loaded) is type(any_bundle) and loaded.meta == any_bundle.meta
    assert "no MANIFEST.json" in caplog.text
    # without a manifest the kind's required files are still checked
    (out / "meta.json").rename(out / "meta.bak")
    with pytest.raises(BundleError, match="no meta.json"):
        load_bundle(out)


def test_old_layouts_load(tmp_path, bundle, mi_bundle, ranker_bundle):
    """What older versions wrote: no manifest, no ``kind`` in an embedding bundle's meta, a
    multi-interest model as ``model.json`` + a bare state dict in ``state.pt``, a ``kcan.json``
    without ``class``."""
    out = bundle.write(tmp_path / "e")
    (out / MANIFEST_FILE).unlink()
    meta = json.loads((out / "meta.json").read_text())
    del meta["kind"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert bundle_kind(out) == "embedding" and isinstance(load_bundle(out), RetrievalBundle)

    out = mi_bundle.write(tmp_path / "mi")
    (out / MANIFEST_FILE).unlink()
    (out / "model" / "model.pt").unlink()
    torch.save(mi_bundle.model.state_dict(), out / "model" / "state.pt")
    loaded = load_bundle(out)
    assert isinstance(loaded, MultiInterestBundle)
    _same_state(loaded.model, mi_bundle.model)

    out = ranker_bundle.write(tmp_path / "r")
    (out / MANIFEST_FILE).unlink()
    spec = json.loads((out / "kcan.json").read_text())
    del spec["class"]
    (out / "kcan.json").write_text(json.dumps(spec, indent=2))
    loaded = load_bundle(out)
    assert isinstance(loaded, RankerBundle)
    _same_state(loaded.model, ranker_bundle.model)


def test_dispatch_is_by_kind_and_a_subclass_loads_only_its_own(tmp_path, bundle, ranker_bundle):
    out = ranker_bundle.write(tmp_path / "r")
    with pytest.raises(BundleError, match="is a 'ranker' bundle, not 'embedding'"):
        RetrievalBundle.load(out)
    assert isinstance(Bundle.load(out), RankerBundle)
    out = bundle.write(tmp_path / "e")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "kind": "hologram"}))
    write_manifest(out)
    with pytest.raises(BundleError, match="unknown bundle kind 'hologram'"):
        load_bundle(out)


def test_a_new_kind_registers_itself(tmp_path):
    from dataclasses import dataclass, field

    from kgrec.serving import bundle as bundle_module

    try:
        @dataclass
        class ToyBundle(Bundle):
            kind = "toy"
            payload_files = ("toy.npy",)
            weights: np.ndarray
            users: pl.DataFrame
            items: pl.DataFrame
            meta: dict = field(default_factory=dict)

            def __post_init__(self):
                self._setup()

            def _write_payload(self, directory):
                np.save(directory / "toy.npy", self.weights)

            @classmethod
            def _read_payload(cls, directory, meta, users, items):
                return cls(np.load(directory / "toy.npy"), users, items, meta)

        users = pl.DataFrame({"user_id": ["a", "b"], "user_idx": [1, 0]})
        items = pl.DataFrame({"item_id": ["x"], "item_idx": [0]})
        toy = ToyBundle(np.arange(3.0), users, items, {"model": "toy"})
        loaded = load_bundle(toy.write(tmp_path / "t"))
        assert type(loaded) is ToyBundle and loaded.meta == {"model": "toy", "kind": "toy", "n_users": 2, "n_items": 1}
        with pytest.raises(TypeError, match="already registered"):
            class Impostor(Bundle):
                kind = "toy"
    finally:
        bundle_module._KINDS.pop("toy", None)


# ---------------------------------------------------------------------------- embedding bundle
def test_round_trip(tmp_path, bundle):
    out = bundle.write(tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == sorted((*BUNDLE_FILES, MANIFEST_FILE))
    loaded = RetrievalBundle.load(out)
    np.testing.assert_array_equal(loaded.user_embeddings, bundle.user_embeddings)
    np.testing.assert_array_equal(loaded.item_embeddings, bundle.item_embeddings)
    assert loaded.user_embeddings.dtype == np.float32
    assert (loaded.seen != bundle.seen).nnz == 0
    assert loaded.users.equals(bundle.users)
    assert loaded.items.equals(bundle.items)
    assert loaded.meta == bundle.meta
    assert loaded.meta["dim"] == 16 and loaded.meta["n_items"] == 800 and loaded.meta["kind"] == "embedding"
    mapped = RetrievalBundle.load(out, mmap=True)
    assert isinstance(mapped.item_embeddings, np.memmap) or mapped.item_embeddings.base is not None


def test_write_overwrites_atomically(tmp_path, bundle, make_bundle):
    target = tmp_path / "b"
    bundle.write(target)
    small = make_bundle(n_users=10, n_items=20, dim=4, seen_per_user=2)
    small.write(target)
    assert RetrievalBundle.load(target).n_items == 20
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp leftovers
    with pytest.raises(FileExistsError):
        small.write(target, overwrite=False)


def test_missing_file(tmp_path, bundle):
    out = bundle.write(tmp_path / "b")
    (out / "seen.npz").unlink()
    with pytest.raises(BundleError, match="missing seen.npz"):
        RetrievalBundle.load(out)
    (out / MANIFEST_FILE).unlink()  # an unverified bundle still needs its files
    with pytest.raises(BundleError, match="missing seen.npz"):
        RetrievalBundle.load(out)
    with pytest.raises(BundleError, match="does not exist"):
        RetrievalBundle.load(tmp_path / "nope")


def test_shape_mismatch(tmp_path, bundle):
    """Files that pass the manifest (re-signed) but disagree with each other are still refused."""
    out = bundle.write(tmp_path / "b")
    np.save(out / "item_embeddings.npy", np.zeros((5, 16), np.float32))
    write_manifest(out)
    with pytest.raises(BundleError, match="seen matrix shape"):
        RetrievalBundle.load(out)
    bundle.write(out)
    np.save(out / "user_embeddings.npy", np.zeros((300, 8), np.float32))
    write_manifest(out)
    with pytest.raises(BundleError, match="dims differ"):
        RetrievalBundle.load(out)
    bundle.write(out)
    meta = json.loads((out / "meta.json").read_text())
    meta["dim"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    write_manifest(out)
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


# ---------------------------------------------------------------------------- torch persistence
class _NotATensor:
    def __init__(self):
        self.payload = "would run arbitrary code on unpickling"


def test_save_module_round_trips_state_extra_tensors_and_hparams(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    extra = {"edges": torch.arange(6).view(2, 3)}
    save_module(module, tmp_path / "m", {"in_features": 3, "out_features": 2}, name="lin",
                tensors=extra, meta={"note": "hi"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["lin.json", "lin.pt"]
    tensors, spec = load_state(tmp_path / "m", "lin", expected_class="Linear")
    assert spec["class"] == "Linear" and spec["hparams"] == {"in_features": 3, "out_features": 2}
    assert spec["note"] == "hi"
    assert torch.equal(tensors["edges"], extra["edges"])
    rebuilt = torch.nn.Linear(**spec["hparams"])
    rebuilt.load_state_dict(tensors["state_dict"])
    _same_state(rebuilt, module)
    with pytest.raises(PersistenceError, match="not a Conv1d"):
        load_state(tmp_path / "m", "lin", expected_class="Conv1d")
    with pytest.raises(PersistenceError, match="not a tensor"):
        save_module(module, tmp_path / "bad", {}, tensors={"x": [1, 2]})


def test_load_state_is_weights_only(tmp_path):
    module = torch.nn.Linear(3, 2)
    save_module(module, tmp_path, {"in_features": 3, "out_features": 2})
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    blob["evil"] = _NotATensor()
    torch.save(blob, tmp_path / "model.pt")  # a pickled object: refused, never unpickled
    with pytest.raises(PersistenceError, match="weights-only"):
        load_state(tmp_path, "model")
    assert torch.load(tmp_path / "model.pt", weights_only=False)["evil"].payload  # it is really there


def test_a_tampered_model_file_in_a_bundle_is_refused_before_unpickling(tmp_path, ranker_bundle):
    out = ranker_bundle.write(tmp_path / "r")
    blob = torch.load(out / "kcan.pt", weights_only=True)
    blob["evil"] = _NotATensor()
    torch.save(blob, out / "kcan.pt")
    with pytest.raises(BundleError, match="kcan.pt"):
        load_bundle(out)
    (out / MANIFEST_FILE).unlink()  # unverified: the weights-only load still refuses it
    with pytest.raises(BundleError, match="weights-only"):
        load_bundle(out)
