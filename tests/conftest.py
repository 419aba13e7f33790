from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DATA_DIR / "music" / "user_artists.dat").exists():
        pytest.skip(f"the shared datasets are not at {DATA_DIR}")
    return DATA_DIR
