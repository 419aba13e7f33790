from __future__ import annotations

from pathlib import Path

import pytest
from kgrec.models.tracking import registry
from kgrec.models.tracking.settings import TrackingSettings

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA_DIR / "music" / "user_artists.dat").exists():
        pytest.skip(f"the shared datasets are not at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> TrackingSettings:
    """An embedded tracking store of its own for one test, configured as the pipeline does."""
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; undo it after each test.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KGREC_TRACKING_URI", raising=False)
    settings = TrackingSettings(workdir=tmp_path / "work", tracking_uri=None)
    registry.configure_tracking(settings)
    return settings
