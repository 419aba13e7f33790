"""Time-ordered user sequences and the sequential / multi-interest split (``SequenceSplit``).

Protocol (``/work/shared/data/README.md``, "Sequential / multi-interest split"), as implemented by
:func:`sequential_split`:

1. Each user's interactions are ordered by ``timestamp``; ties are broken by the *raw* item id --
   numerically when every raw item id of the snapshot is an integer (MovieLens), else by the id
   string -- and then by ``item_idx`` (only reached for equal raw ids, i.e. never).
   (``item_idx`` alone would order ties lexicographically: ``"10" < "9"``.)
2. The users (every user with at least one interaction) are shuffled with
   ``numpy.random.default_rng(seed).permutation`` over the users sorted by ``user_idx`` and cut
   8:1:1: ``n_valid = round(0.1 U)``, ``n_test = round(0.1 U)`` (Python's ``round``),
   ``n_train = U - n_valid - n_test``; the first ``n_train`` permuted users train, the next
   ``n_valid`` validate, the last ``n_test`` test.
3. A validation or test user with ``n`` interactions gives the first ``n - n_targets`` items as
   input and the last ``n_targets`` as targets, with
   ``n_targets = clip(floor(target_ratio * n + 0.5), 1, n - 1)`` (round half up; at least one target
   and, for ``n >= 2``, at least one input). For ``target_ratio = 0.2``: ``n = 20 -> 4``,
   ``n = 22 -> 4``, ``n = 23 -> 5``. A user with a single interaction has it as the target and
   an empty input.
4. Training users' full sequences are training data.

Everything is vectorised (polars sort + numpy ``split``); no Python loop per interaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from kgrec.features.snapshot import Snapshot


@dataclass(frozen=True)
class SequenceSplit:
    """Users partitioned into train / validation / test with time-ordered item sequences.

    Every sequence is an ``int64`` numpy array of ``item_idx`` in time order (oldest first).

    Attributes:
        num_users, num_items: sizes of the snapshot's index spaces.
        train_users: ``user_idx`` of the training users (sorted); ``train_sequences[j]`` is the full
            sequence of ``train_users[j]``.
        valid_users, valid_inputs, valid_targets: validation users (sorted), their input prefixes
            and target suffixes (same order).
        test_users, test_inputs, test_targets: the same for test users.
        seed: the numpy seed of the user permutation.
        target_ratio: share of a held-out user's sequence used as targets.
    """

    num_users: int
    num_items: int
    train_users: np.ndarray
    train_sequences: list[np.ndarray]
    valid_users: np.ndarray
    valid_inputs: list[np.ndarray]
    valid_targets: list[np.ndarray]
    test_users: np.ndarray
    test_inputs: list[np.ndarray]
    test_targets: list[np.ndarray]
    seed: int
    target_ratio: float = 0.2
    ratios: tuple[float, float, float] = field(default=(0.8, 0.1, 0.1))

    def part(self, name: str) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """``(users, inputs, targets)`` of ``"valid"`` or ``"test"``."""
        if name == "valid":
            return self.valid_users, self.valid_inputs, self.valid_targets
        if name == "test":
            return self.test_users, self.test_inputs, self.test_targets
        raise ValueError(f"part must be 'valid' or 'test', got {name!r}")

    def summary(self) -> dict[str, int]:
        return {
            "train_users": len(self.train_users),
            "valid_users": len(self.valid_users),
            "test_users": len(self.test_users),
            "train_interactions": int(sum(len(s) for s in self.train_sequences)),
            "valid_targets": int(sum(len(t) for t in self.valid_targets)),
            "test_targets": int(sum(len(t) for t in self.test_targets)),
        }


def n_targets_for(n: np.ndarray | int, target_ratio: float = 0.2) -> np.ndarray:
    """``clip(floor(target_ratio * n + 0.5), 1, max(n - 1, 1))`` per sequence length ``n``."""
    n = np.asarray(n, dtype=np.int64)
    # The epsilon keeps exact halves (0.2 * 22.5 ...) from falling below .5 by float error.
    raw = np.floor(target_ratio * n + 0.5 + 1e-9).astype(np.int64)
    return np.clip(raw, 1, np.maximum(n - 1, 1))


def ordered_sequences(
    interactions: pl.DataFrame, item_order_key: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Users (sorted ``user_idx``) and their item sequences ordered by ``(timestamp, tie key)``.

    ``item_order_key[item_idx]`` is the tie-break key (default: ``item_idx``).
    """
    if "timestamp" not in interactions.columns:
        raise ValueError("sequential splits need a timestamp column in the interactions")
    frame = interactions.select(
        pl.col("user_idx").cast(pl.Int64), pl.col("item_idx").cast(pl.Int64), pl.col("timestamp")
    )
    key = (
        pl.col("item_idx")
        if item_order_key is None
        else pl.Series(np.asarray(item_order_key))[frame["item_idx"].to_numpy()].alias("_key")
    )
    frame = frame.with_columns(key.alias("_key")).sort(["user_idx", "timestamp", "_key", "item_idx"])
    users_col = frame["user_idx"].to_numpy()
    items = frame["item_idx"].to_numpy().astype(np.int64)
    users, starts = np.unique(users_col, return_index=True)
    return users.astype(np.int64), np.split(items, starts[1:])


def raw_id_order(items: pl.DataFrame) -> np.ndarray:
    """Rank of each ``item_idx`` by raw item id: numeric if every id is an integer, else string."""
    frame = items.select("item_id", "item_idx").sort("item_idx")
    numeric = frame["item_id"].cast(pl.Int64, strict=False)
    key = numeric if numeric.null_count() == 0 else frame["item_id"]
    order = np.argsort(key.to_numpy(), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def sequential_split(
    snapshot: Snapshot | pl.DataFrame,
    seed: int = 2020,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    target_ratio: float = 0.2,
    num_items: int | None = None,
) -> SequenceSplit:
    """The sequential / multi-interest split (see the module docstring for the exact rules).

    Args:
        snapshot: a :class:`Snapshot` (raw item ids break timestamp ties) or an interactions
            frame with ``user_idx``, ``item_idx``, ``timestamp`` (``item_idx`` breaks ties).
        seed: seed of ``numpy.random.default_rng`` for the user permutation.
        ratios: train / validation / test shares of the users (must sum to 1).
        target_ratio: share of a held-out user's sequence that becomes targets.
        num_items: item count when ``snapshot`` is a frame (default ``max(item_idx) + 1``).
    """
    if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"ratios must be three non-negative shares summing to 1, got {ratios}")
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"target_ratio must be in (0, 1), got {target_ratio}")
    if isinstance(snapshot, Snapshot):
        interactions = snapshot.interactions
        n_users, n_items = snapshot.n_users, snapshot.n_items
        tie_key = raw_id_order(snapshot.items)
    else:
        interactions = snapshot
        n_users = int(interactions["user_idx"].max()) + 1 if interactions.height else 0
        n_items = num_items if num_items is not None else int(interactions["item_idx"].max()) + 1
        tie_key = None
    users, sequences = ordered_sequences(interactions, tie_key)

    n = len(users)
    n_valid = round(ratios[1] * n)
    n_test = round(ratios[2] * n)
    n_train = n - n_valid - n_test
    perm = np.random.default_rng(seed).permutation(n)
    groups = [np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_valid]), np.sort(perm[n_train + n_valid :])]

    def held_out(positions: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        lengths = np.array([len(sequences[p]) for p in positions], dtype=np.int64)
        cut = lengths - n_targets_for(lengths, target_ratio)
        return (
            [sequences[p][:c] for p, c in zip(positions, cut, strict=True)],
            [sequences[p][c:] for p, c in zip(positions, cut, strict=True)],
        )

    valid_inputs, valid_targets = held_out(groups[1])
    test_inputs, test_targets = held_out(groups[2])
    return SequenceSplit(
        num_users=n_users,
        num_items=n_items,
        train_users=users[groups[0]],
        train_sequences=[sequences[p] for p in groups[0]],
        valid_users=users[groups[1]],
        valid_inputs=valid_inputs,
        valid_targets=valid_targets,
        test_users=users[groups[2]],
        test_inputs=test_inputs,
        test_targets=test_targets,
        seed=seed,
        target_ratio=target_ratio,
        ratios=tuple(ratios),
    )
