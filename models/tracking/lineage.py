"""Lineage of a training run: the dataset snapshot it read and the code that trained it.

* :func:`log_snapshot_input` -- the snapshot as an MLflow dataset input of the active run
  (context ``training``): a metadata-only :class:`SnapshotDataset` -- source = the snapshot
  directory's URI, name = the dataset's name, digest = the snapshot's content hash (its first
  :data:`DIGEST_LENGTH` hex digits, the most MLflow stores; the full hash is the input tag
  ``kgrec.snapshot_hash``), schema = the interactions table's columns, profile = the table sizes
  from the snapshot's manifest. Nothing is read or hashed again: logging costs the same on any
  dataset size.
* :func:`lineage_tags` -- run tags: ``mlflow.source.git.commit`` and ``kgrec.git_dirty`` of the
  git checkout the kgrec code was imported from (absent when it was not imported from a checkout,
  e.g. an installed wheel, or git is missing), and ``kgrec.version``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from kgrec.features.snapshot import Snapshot
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.types.schema import ColSpec, DataType, Schema

logger = logging.getLogger("kgrec.models")

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the UI links the run to the commit
GIT_DIRTY_TAG = "kgrec.git_dirty"
VERSION_TAG = "kgrec.version"
SNAPSHOT_HASH_TAG = "kgrec.snapshot_hash"
TRAINING_CONTEXT = "training"
LOCAL_SOURCE = "local"  # MLflow's source type of file URIs (LocalArtifactDatasetSource)
DIGEST_LENGTH = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
#: The source root of the kgrec code (``models/tracking/lineage.py`` -> the folder holding ``models/``).
SOURCE_ROOT = Path(__file__).resolve().parents[2]
_GIT_TIMEOUT_S = 10


# ---------------------------------------------------------------------------- code
@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
    )


def git_state(root: Path = SOURCE_ROOT) -> GitState | None:
    """Commit and dirty flag (``git status --porcelain`` not empty: modified, staged or untracked
    files) of the checkout holding ``root``; None when ``root`` is not inside a git work tree, is
    ignored by it (a package installed into a virtual environment inside a checkout) or git is
    unavailable."""
    try:
        head = _git(root, "rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        if _git(root, "check-ignore", "-q", str(root)).returncode == 0:
            return None
        status = _git(root, "status", "--porcelain")
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("no git state for %s: %s", root, exc)
        return None
    if status.returncode != 0:
        return None
    return GitState(commit=head.stdout.strip(), dirty=bool(status.stdout.strip()))


def kgrec_version() -> str | None:
    try:
        return version("kgrec")
    except PackageNotFoundError:
        return None


def lineage_tags(root: Path = SOURCE_ROOT) -> dict[str, str]:
    """The run tags of the module docstring (only those that are known)."""
    tags: dict[str, str] = {}
    state = git_state(root)
    if state is not None:
        tags[GIT_COMMIT_TAG] = state.commit
        tags[GIT_DIRTY_TAG] = str(state.dirty).lower()
    if (installed := kgrec_version()) is not None:
        tags[VERSION_TAG] = installed
    return tags


# ---------------------------------------------------------------------------- data
_DTYPES: dict[type[pl.DataType], DataType] = {
    pl.Int8: DataType.integer, pl.Int16: DataType.integer, pl.Int32: DataType.integer,
    pl.UInt8: DataType.integer, pl.UInt16: DataType.integer,
    pl.Int64: DataType.long, pl.UInt32: DataType.long, pl.UInt64: DataType.long,
    pl.Float32: DataType.float, pl.Float64: DataType.double,
    pl.Boolean: DataType.boolean, pl.String: DataType.string,
    pl.Datetime: DataType.datetime, pl.Date: DataType.datetime,
}


def frame_schema(frame: pl.DataFrame) -> Schema:
    """MLflow column schema of a polars frame's columns (nothing is read: dtypes only)."""
    specs = []
    for name, dtype in frame.schema.items():
        kind = _DTYPES.get(dtype.base_type(), DataType.string)
        specs.append(ColSpec(kind, name))
    return Schema(specs)


class SnapshotDataset(MetaDataset):
    """A metadata-only MLflow dataset with a profile (the snapshot's table sizes)."""

    def __init__(self, source, name: str, digest: str, schema: Schema, profile: dict[str, Any]) -> None:
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile, sort_keys=True)}


def snapshot_source(snapshot: Snapshot):
    """MLflow's local-file dataset source (type ``local``) of the snapshot directory's URI."""
    uri = Path(snapshot.path).resolve().as_uri()
    return get_dataset_source_from_json(json.dumps({"uri": uri}), source_type=LOCAL_SOURCE)


def snapshot_dataset(snapshot: Snapshot) -> SnapshotDataset:
    """The snapshot as an MLflow dataset (module docstring)."""
    counts = snapshot.manifest.get("counts") or {}
    profile = {
        "num_rows": snapshot.interactions.height,
        "n_users": snapshot.n_users,
        "n_items": snapshot.n_items,
        **{k: v for k, v in counts.items() if isinstance(v, int | float)},  # n_interactions, n_triples, ...
    }
    return SnapshotDataset(
        source=snapshot_source(snapshot),
        name=snapshot.name,
        digest=snapshot.hash[:DIGEST_LENGTH],
        schema=frame_schema(snapshot.interactions),
        profile=profile,
    )


def log_snapshot_input(snapshot: Snapshot | None, context: str = TRAINING_CONTEXT) -> SnapshotDataset | None:
    """Log ``snapshot`` as a dataset input (``context``) of the active run; None without one."""
    if snapshot is None:
        return None
    dataset = snapshot_dataset(snapshot)
    try:
        mlflow.log_input(dataset, context=context, tags={SNAPSHOT_HASH_TAG: snapshot.hash})
    except MlflowException as exc:
        # Two runs of one experiment logging the same new dataset at once: the store checks for the
        # row, then inserts it, and the slower insert fails on the unique key. The row exists now,
        # so the second attempt only links this run to it.
        if "unique constraint" not in str(exc).lower():
            raise
        logger.info("dataset %s was logged by a concurrent run; linking this run to it", dataset.name)
        mlflow.log_input(dataset, context=context, tags={SNAPSHOT_HASH_TAG: snapshot.hash})
    return dataset
