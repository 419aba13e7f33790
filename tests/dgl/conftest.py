"""Fixtures of the DGL backend tests: the bundled ``music`` data and a small synthetic snapshot."""

from __future__ import annotations

import pytest
from kgrec.features.dataset import InteractionData
from kgrec.features.ingest import ingest
from kgrec.features.snapshot import load_snapshot
from kgrec.features.spec import data_dir, load_spec
from kgrec.features.split import random_split
from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot


@pytest.fixture(scope="session")
def music_data(tmp_path_factory: pytest.TempPathFactory) -> InteractionData:
    try:
        root = data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"shared data not available: {exc}")
    if not (root / "music").is_dir():
        pytest.skip(f"shared data set 'music' missing under {root}")
    report = ingest(load_spec("music"), tmp_path_factory.mktemp("snapshots"))
    snap = load_snapshot(report.snapshot_dir)
    return InteractionData.from_snapshot(snap, random_split(snap.interactions, seed=2020))


@pytest.fixture(scope="session")
def synthetic_data() -> InteractionData:
    """120 users, 60 items, 40 entities, 3 relations: item and entity heads and tails mixed."""
    snap = powerlaw_snapshot(
        PowerLawConfig(
            num_users=120, num_items=60, num_interactions=1500, num_entities=40,
            num_triples=200, num_relations=3,
        )
    )
    return InteractionData.from_snapshot(snap, random_split(snap.interactions, seed=2020))
