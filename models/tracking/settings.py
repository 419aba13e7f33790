"""Where runs, models and artefacts go (:class:`TrackingSettings`) and how registered models are named."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_WORKDIR = "kgrec-work"


def default_workdir() -> Path:
    return Path(os.environ.get("KGREC_HOME", DEFAULT_WORKDIR)).resolve()


class TrackingSettings(BaseModel):
    """Where runs, models and artefacts go.

    The embedded default is a SQLite tracking store and a local artefact folder inside the working
    directory; ``KGREC_TRACKING_URI`` (or MLflow's own ``MLFLOW_TRACKING_URI``) points at a tracking
    server instead, e.g. ``http://mlflow:5000`` backed by Postgres and object storage (infra/).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    workdir: Path = Field(default_factory=default_workdir)
    tracking_uri: str | None = None
    experiment: str = "kgrec"

    @property
    def resolved_tracking_uri(self) -> str:
        uri = (
            self.tracking_uri
            or os.environ.get("KGREC_TRACKING_URI")
            or os.environ.get("MLFLOW_TRACKING_URI")
        )
        return uri or f"sqlite:///{self.workdir / 'mlflow.db'}"

    @property
    def is_embedded(self) -> bool:
        return self.resolved_tracking_uri.startswith("sqlite:///")

    @property
    def artifact_location(self) -> str | None:
        """Artefact root for new experiments; a tracking server decides its own."""
        return (self.workdir / "mlartifacts").as_uri() if self.is_embedded else None

    @property
    def snapshot_dir(self) -> Path:
        return self.workdir / "snapshots"


def registered_model_name(dataset: str) -> str:
    """One registered retrieval model per dataset: champions on different data are not comparable."""
    return f"kgrec-{dataset}"


def registered_ranker_name(retrieval_model_name: str) -> str:
    """The ranking stage registers next to its retrieval model: ``kgrec-music`` -> ``kgrec-music-ranker``."""
    return f"{retrieval_model_name}-ranker"
