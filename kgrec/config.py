"""Typed configuration of a pipeline run, validated at the edge (CLI, flow parameters).

Every field is logged to MLflow with each training run, so a run can be reproduced from its params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class PipelineConfig(BaseModel):
    """Parameters of ``kgrec pipeline`` / the Prefect ``pipeline`` flow."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "music"
    models: list[str] = Field(default_factory=lambda: ["bprmf", "lightgcn"], min_length=1)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    # The split of the embedding retrievers (bprmf, lightgcn, kgat); sequential models always use
    # the sequential split (features.sequences) with ``seed``.
    split: Literal["random", "temporal"] = "random"
    seed: int = 2020
    registered_model: str | None = None
    # The ranking stage: trained on the candidates of this run's best embedding retriever
    # (validation Recall@20) and registered as ``<registered model>-ranker``.
    ranker: Literal["kcan"] | None = None
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    progress: bool = False
    # Models trained at once. Two cores are best spent on one model at a time; parallel training
    # is not bitwise reproducible (models draw their initial weights from torch's global RNG).
    parallel_training: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1) // 4), ge=1)

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        from kgrec.models.sequential_zoo import SEQUENTIAL_MODEL_NAMES
        from kgrec.models.zoo import MODEL_NAMES

        known = set(MODEL_NAMES) | set(SEQUENTIAL_MODEL_NAMES)
        cleaned = [m.strip().lower() for m in models if m.strip()]
        unknown = sorted(set(cleaned) - known)
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(known)}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"a model is listed twice: {cleaned}")
        return cleaned

    @model_validator(mode="after")
    def _ranker_needs_a_retriever(self) -> PipelineConfig:
        from kgrec.models.zoo import MODEL_NAMES

        if self.ranker is not None and not any(m in MODEL_NAMES for m in self.models):
            raise ValueError(
                f"ranker {self.ranker!r} re-ranks an embedding retriever's candidates: list one of "
                f"{list(MODEL_NAMES)} in models"
            )
        return self

    @property
    def model_name(self) -> str:
        return self.registered_model or registered_model_name(self.dataset_name)

    @property
    def dataset_name(self) -> str:
        """Name of a bundled spec, or the stem of a spec file path."""
        return Path(self.dataset).stem if self.dataset.endswith((".yaml", ".yml")) else self.dataset
