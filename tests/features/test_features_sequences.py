"""Sequential split and item categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from kgrec.features.ingest import ingest
from kgrec.features.sequences import n_targets_for, sequential_split
from kgrec.features.snapshot import load_snapshot
from kgrec.features.spec import load_spec


def _frame(n_users: int = 50, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(1, 40))
        items = rng.choice(200, n, replace=False)
        ts = rng.integers(0, 10, n)  # many timestamp ties
        rows += [(u, int(i), int(t)) for i, t in zip(items, ts, strict=True)]
    return pl.DataFrame(rows, schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64}, orient="row")


def test_n_targets_rounding() -> None:
    assert n_targets_for(np.array([1, 2, 5, 20, 22, 23, 100])).tolist() == [1, 1, 1, 4, 4, 5, 20]


def test_users_partitioned_8_1_1_deterministically() -> None:
    frame = _frame(50)
    a, b, c = sequential_split(frame, seed=7), sequential_split(frame, seed=7), sequential_split(frame, seed=8)
    assert (len(a.train_users), len(a.valid_users), len(a.test_users)) == (40, 5, 5)
    groups = np.concatenate([a.train_users, a.valid_users, a.test_users])
    assert sorted(groups.tolist()) == list(range(50))  # a partition
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("train_users", "valid_users", "test_users"))
    assert not np.array_equal(a.test_users, c.test_users)
    assert a.seed == 7


def test_inputs_precede_targets_and_ties_by_item() -> None:
    frame = _frame(50)
    split = sequential_split(frame, seed=3)
    ts = {(u, i): t for u, i, t in frame.iter_rows()}
    for part in ("valid", "test"):
        users, inputs, targets = split.part(part)
        for u, x, y in zip(users, inputs, targets, strict=True):
            seq = np.concatenate([x, y])
            n = len(seq)
            assert len(y) == n_targets_for(n)[()] and len(x) == n - len(y)
            keys = [(ts[(u, i)], i) for i in seq]
            assert keys == sorted(keys)  # time order, ties by item id
            if len(x):
                assert max(ts[(u, i)] for i in x) <= min(ts[(u, i)] for i in y)
    for u, s in zip(split.train_users, split.train_sequences, strict=True):
        assert len(s) == frame.filter(pl.col("user_idx") == u).height


@pytest.fixture(scope="module")
def ml100k_seq(tmp_path_factory: pytest.TempPathFactory):
    from kgrec.features.spec import data_dir

    try:
        if not (data_dir() / "ml-100k").is_dir():
            pytest.skip("ml-100k data missing")
    except FileNotFoundError:
        pytest.skip("no data directory")
    report = ingest(load_spec("ml-100k-seq"), tmp_path_factory.mktemp("seq"))
    return report, load_snapshot(report.snapshot_dir)


def test_ml100k_seq_spec_and_split(ml100k_seq) -> None:
    report, snap = ml100k_seq
    assert (report.n_interactions, report.n_users, report.n_items) == (100000, 943, 1682)
    assert snap.has_categories
    toy = snap.items.filter(pl.col("item_id") == "1")
    assert toy["categories"].to_list() == [["Animation", "Children's", "Comedy"]]
    assert all(len(c) >= 1 for c in snap.item_categories())
    split = sequential_split(snap, seed=2020)
    assert (len(split.train_users), len(split.valid_users), len(split.test_users)) == (755, 94, 94)
    # ties broken by the numeric raw item id, not the lexicographic item_idx
    raw = dict(zip(snap.items["item_idx"].to_list(), snap.items["item_id"].cast(pl.Int64).to_list(), strict=True))
    inter = snap.interactions
    for u, s in zip(split.train_users[:50], split.train_sequences[:50], strict=True):
        ts = dict(zip(*inter.filter(pl.col("user_idx") == u).select("item_idx", "timestamp").to_numpy().T.tolist(), strict=True))
        keys = [(ts[i], raw[i]) for i in s.tolist()]
        assert keys == sorted(keys)


def test_categories_column_and_hash_compat(make_spec, tmp_path: Path) -> None:
    names = tmp_path / "names.tsv"
    names.write_text("item\ttitle\tgenre\ni2\tSecond\tDrama  Comedy Drama\ni1\tFirst\t\ni3\tThird\tWar\n")
    plain = ingest(make_spec(item_names={"path": str(names), "item": "item", "name": "title"}), tmp_path / "a")
    with_cats = ingest(
        make_spec(item_names={"path": str(names), "item": "item", "name": "title", "categories": "genre"}),
        tmp_path / "b",
    )
    snap_plain, snap = load_snapshot(plain.snapshot_dir), load_snapshot(with_cats.snapshot_dir)
    assert "categories" not in snap_plain.items.columns and not snap_plain.has_categories
    assert snap_plain.item_categories() == [[], [], []]
    assert snap.item_categories() == [[], ["Drama", "Comedy"], ["War"]]
    assert plain.hash != with_cats.hash  # categories are content
    assert ingest(make_spec(item_names={"path": str(names), "item": "item", "name": "title", "categories": "genre"}),
                  tmp_path / "c").hash == with_cats.hash
    sep = ingest(
        make_spec(item_names={"path": str(names), "item": "item", "name": "title", "categories": "genre",
                              "category_separator": "|"}),
        tmp_path / "d",
    )
    assert load_snapshot(sep.snapshot_dir).item_categories()[1] == ["Drama  Comedy Drama"]
