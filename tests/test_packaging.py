"""The wheel (what the Docker images and a `pip install .` get) holds every module of the repo: the
editable install used in development would hide a package missing from pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: folder -> package, as pyproject.toml's package-dir maps them
ROOTS = {"kgrec": "kgrec", "features": "kgrec/features", "models": "kgrec/models",
         "serving": "kgrec/serving", "flows": "kgrec/flows"}


def test_the_wheel_holds_every_module_and_the_bundled_specs(tmp_path):
    # a clean copy: setuptools would otherwise reuse a stale build/ folder
    source = tmp_path / "src"
    for folder in ROOTS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("kgrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{package}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, package in ROOTS.items()
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert len(expected) > 80
    assert sorted(expected - names) == []
    assert "kgrec/features/specs/music.yaml" in names
