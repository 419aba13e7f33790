from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from kgrec.features.split import random_split, split_counts, temporal_leave_last_out


def _interactions(sizes: list[int], with_ts: bool = True) -> pl.DataFrame:
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, int)
    data = {"user_idx": users.astype(np.int32), "item_idx": items.astype(np.int32)}
    if with_ts:
        data["timestamp"] = (1000 - items * 7).astype(np.int64)  # later items are older
    return pl.DataFrame(data)


def _pairs(frame: pl.DataFrame) -> set[tuple[int, int]]:
    return set(frame.select("user_idx", "item_idx").iter_rows())


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, [0, 0, 0]), (1, [1, 0, 0]), (2, [1, 0, 1]), (3, [1, 1, 1]), (4, [2, 1, 1]), (10, [8, 1, 1]), (11, [9, 1, 1]), (25, [21, 2, 2])],
)
def test_recbole_rounding(n: int, expected: list[int]) -> None:
    # n=2: 0.1*2 = 0.2 in (0, 1) -> test gets one; then cnt_0 = 1 stops. n=25: int(2.5) = 2.
    assert split_counts(np.array([n]), (0.8, 0.1, 0.1)).tolist() == [expected]


def test_rounding_matches_a_scalar_reference() -> None:
    def recbole(tot: int, ratios: list[float]) -> list[int]:
        ratios = [r / sum(ratios) for r in ratios]
        cnt = [int(ratios[i] * tot) for i in range(len(ratios))]
        cnt[0] = tot - sum(cnt[1:])
        for i in range(1, len(ratios)):
            if cnt[0] <= 1:
                break
            if 0 < ratios[-i] * tot < 1:
                cnt[-i] += 1
                cnt[0] -= 1
        return cnt

    ns = np.arange(0, 60)
    for ratios in ([0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [8, 1, 1], [0.6, 0.0, 0.4]):
        got = split_counts(ns, ratios).tolist()
        assert got == [recbole(int(n), ratios) for n in ns], ratios


def test_random_split_partition_and_counts() -> None:
    sizes = [1, 2, 3, 10, 11, 40]
    frame = _interactions(sizes)
    split = random_split(frame, seed=7)
    assert split.kind == "random" and split.seed == 7
    parts = [_pairs(split.train), _pairs(split.valid), _pairs(split.test)]
    assert sum(len(p) for p in parts) == frame.height
    assert set().union(*parts) == _pairs(frame)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    expected = split_counts(np.array(sizes), (0.8, 0.1, 0.1))
    for part, frame_part in enumerate([split.train, split.valid, split.test]):
        per_user = np.bincount(frame_part["user_idx"].to_numpy(), minlength=len(sizes))
        assert per_user.tolist() == expected[:, part].tolist()
    assert split.train.columns == frame.columns


def test_random_split_determinism() -> None:
    frame = _interactions([30] * 20)
    a, b = random_split(frame, seed=2020), random_split(frame, seed=2020)
    assert a.train.equals(b.train) and a.valid.equals(b.valid) and a.test.equals(b.test)
    c = random_split(frame, seed=2021)
    assert _pairs(c.test) != _pairs(a.test)


def test_random_split_empty_and_bad_ratios() -> None:
    split = random_split(_interactions([]))
    assert split.train.height == split.valid.height == split.test.height == 0
    with pytest.raises(ValueError, match="ratios"):
        random_split(_interactions([3]), ratios=(0.5, 0.5))


def test_temporal_leave_last_out() -> None:
    frame = pl.DataFrame(
        {
            "user_idx": [0, 0, 0, 0, 1, 1, 2, 2, 2],
            "item_idx": [5, 3, 9, 1, 4, 2, 7, 6, 8],
            "timestamp": [40, 10, 30, 20, 1, 2, 5, 5, 3],
        },
        schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "timestamp": pl.Int64},
    )
    split = temporal_leave_last_out(frame)
    assert _pairs(split.test) == {(0, 5), (2, 7)}  # user 2: tie at t=5 broken by item_idx
    assert _pairs(split.valid) == {(0, 9), (2, 6)}
    assert _pairs(split.train) == {(0, 3), (0, 1), (1, 4), (1, 2), (2, 8)}  # user 1 has < 3
    assert split.kind == "temporal_leave_last_out" and split.seed is None


def test_temporal_needs_timestamps() -> None:
    with pytest.raises(ValueError, match="needs a 'timestamp' column"):
        temporal_leave_last_out(_interactions([3], with_ts=False))


def test_real_music_split(music_ingested) -> None:
    _, snap = music_ingested
    split = random_split(snap.interactions)
    assert split.train.height + split.valid.height + split.test.height == snap.interactions.height
    assert random_split(snap.interactions).test.equals(split.test)
