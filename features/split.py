"""Train/validation/test splits of a snapshot's interactions (vectorised, no loop per user)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Split:
    """Three disjoint parts of the interactions; each frame keeps the snapshot's columns
    (``user_idx``, ``item_idx``, + ``timestamp``/``weight`` when present)."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    kind: str
    seed: int | None = None

    def sizes(self) -> dict[str, int]:
        return {"train": self.train.height, "valid": self.valid.height, "test": self.test.height}


def split_counts(n: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """Per-user part sizes, RecBole's ``split_by_ratio`` rounding, vectorised over users.

    ``cnt_i = int(ratio_i * n)`` for ``i >= 1`` and ``cnt_0 = n - sum``; then, from the last part
    backwards, a part whose share is in (0, 1) gets one row taken from ``cnt_0`` while
    ``cnt_0 > 1`` (``cnt_0`` only decreases, so checking it per step equals RecBole's ``break``).
    Returns an int64 array [len(n), len(ratios)].
    """
    total = float(sum(ratios))
    shares = np.asarray([r / total for r in ratios], dtype=np.float64)  # RecBole normalises too
    n = np.asarray(n, dtype=np.int64)
    exact = n[:, None].astype(np.float64) * shares[None, :]
    counts = np.floor(exact).astype(np.int64)
    counts[:, 0] = n - counts[:, 1:].sum(axis=1)
    for i in range(len(shares) - 1, 0, -1):  # loop over parts (3), not users
        bump = (counts[:, 0] > 1) & (exact[:, i] > 0) & (exact[:, i] < 1)
        counts[bump, i] += 1
        counts[bump, 0] -= 1
    return counts


def _group_positions(users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows sorted by user: (position within the user's rows, group sizes, group id per row)."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(users)])
    group = np.repeat(np.arange(len(starts)), sizes)
    position = np.arange(len(users)) - starts[group]
    return position, sizes, group


def _take(frame: pl.DataFrame, rows: np.ndarray) -> pl.DataFrame:
    return frame[pl.Series(rows.astype(np.int64))] if len(rows) else frame.clear()


def random_split(
    interactions: pl.DataFrame, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 2020
) -> Split:
    """Per user, shuffle the user's interactions and cut them by ``ratios`` (RecBole's rounding).

    One permutation of all rows with ``numpy.random.default_rng(seed)``, then a stable sort by
    user, so the split depends only on the seed and the row order of ``interactions``.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers with a positive sum, got {ratios}")
    rng = np.random.default_rng(seed)
    users = interactions["user_idx"].to_numpy()
    perm = rng.permutation(len(users))
    order = perm[np.argsort(users[perm], kind="stable")]
    position, sizes, group = _group_positions(users[order])
    counts = split_counts(sizes, ratios)
    train_end = counts[:, 0][group]
    valid_end = train_end + counts[:, 1][group]
    part = np.where(position < train_end, 0, np.where(position < valid_end, 1, 2))
    return _by_part(interactions, order, part, kind="random", seed=seed)


def temporal_leave_last_out(interactions: pl.DataFrame) -> Split:
    """Per user ordered by timestamp (ties by ``item_idx``): last -> test, second last -> valid.

    Users with fewer than 3 interactions keep everything in train.
    """
    if "timestamp" not in interactions.columns:
        raise ValueError(
            "temporal_leave_last_out needs a 'timestamp' column; this dataset has none "
            f"(columns: {interactions.columns}); use random_split instead"
        )
    ordered = interactions.sort(["user_idx", "timestamp", "item_idx"], maintain_order=True)
    position, sizes, group = _group_positions(ordered["user_idx"].to_numpy())
    from_end = sizes[group] - 1 - position  # 0 = the user's last interaction
    eligible = sizes[group] >= 3
    part = np.where(eligible & (from_end == 0), 2, np.where(eligible & (from_end == 1), 1, 0))
    return _by_part(
        ordered, np.arange(ordered.height), part, kind="temporal_leave_last_out", seed=None
    )


def _by_part(
    frame: pl.DataFrame, rows: np.ndarray, part: np.ndarray, kind: str, seed: int | None
) -> Split:
    """``rows[i]`` of ``frame`` goes to train, valid or test as ``part[i]`` is 0, 1 or 2."""
    return Split(
        train=_take(frame, rows[part == 0]),
        valid=_take(frame, rows[part == 1]),
        test=_take(frame, rows[part == 2]),
        kind=kind,
        seed=seed,
    )
