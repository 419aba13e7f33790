"""Typed configuration of a pipeline run, validated at the edge (CLI, flow parameters).

Every field is logged to MLflow with each training run, so a run can be reproduced from its params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from kgrec.models.spec import get_spec, model_names
from kgrec.models.tracking.settings import TrackingSettings, registered_model_name
from kgrec.models.tracking.tuning import TuneSettings
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: URL schemes of a cluster address per task runner (a bare ``host:port`` is accepted by both).
RUNNER_SCHEMES = {"dask": ("tcp", "tls", "ws", "wss"), "ray": ("ray",)}


class PipelineConfig(BaseModel):
    """Parameters of ``kgrec pipeline`` / the Prefect ``pipeline`` flow."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "music"
    models: list[str] = Field(default_factory=lambda: ["bprmf", "lightgcn"], min_length=1)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    # Training time per model (seconds): fitting stops after the epoch that passes it, and the best
    # validation epoch so far is tested and registered as usual; the run says it was capped.
    time_cap_s: float | None = Field(default=None, gt=0.0)
    # The split of the embedding retrievers (bprmf, lightgcn, kgat); sequential models always use
    # the sequential split (features.sequences) with ``seed``.
    split: Literal["random", "temporal"] = "random"
    seed: int = 2020
    registered_model: str | None = None
    # The ranking stage: trained on the candidates of this run's best embedding retriever
    # (validation Recall@20) and registered as ``<registered model>-ranker``.
    ranker: str | None = None
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    progress: bool = False
    # Models trained at once. Two cores are best spent on one model at a time; parallel training
    # is not bitwise reproducible (models draw their initial weights from torch's global RNG).
    parallel_training: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1) // 4), ge=1)
    # Where the training tasks run (flows/runners.py): threads of the flow's process (the default),
    # or the worker processes of a Dask or Ray cluster. Without ``runner_address`` "dask" starts a
    # temporary LocalCluster on this machine and "ray" a local Ray instance; with one they join an
    # existing cluster (Dask scheduler ``tcp://host:8786``, Ray client ``ray://host:10001``).
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    runner_address: str | None = None
    # Train each model with the configuration `kgrec tune` recommended for this snapshot, where a
    # study of it exists in the tracking store (its defaults otherwise, with a warning).
    tuned: bool = False
    # Merge the items posted to the registered model's versions (POST /v1/items; their overlays in
    # the serve cache) into the ingested snapshot before training: kgrec.features.overlay.
    overlay: bool = True
    # The serve cache root holding those overlays (default: <workdir>/serve-cache, the service's).
    overlay_dir: Path | None = None

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        known = set(model_names("retriever")) | set(model_names("sequential"))
        cleaned = [m.strip().lower() for m in models if m.strip()]
        unknown = sorted(set(cleaned) - known)
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(known)}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"a model is listed twice: {cleaned}")
        return cleaned

    @field_validator("ranker")
    @classmethod
    def _known_ranker(cls, ranker: str | None) -> str | None:
        if ranker is not None:
            get_spec(ranker, "ranker")
        return ranker

    @field_validator("runner_address")
    @classmethod
    def _blank_address_is_none(cls, address: str | None) -> str | None:
        return (address.strip() or None) if address is not None else None

    @model_validator(mode="after")
    def _address_of_the_chosen_cluster(self) -> PipelineConfig:
        address = self.runner_address
        if address is None:
            return self
        if self.task_runner == "thread":
            raise ValueError(
                f"runner_address {address!r} is the address of a Dask or Ray cluster, but task_runner "
                "is 'thread': set task_runner to 'dask' or 'ray' too, or leave the address out"
            )
        # Caught here rather than as a connection timeout minutes later (e.g. a dashboard URL).
        schemes = RUNNER_SCHEMES[self.task_runner]
        scheme, sep, rest = address.partition("://")
        if sep:
            ok = scheme in schemes and bool(rest)
        else:  # a bare host:port (Ray also takes "auto": the cluster this machine has joined)
            ok = ":" in address or (self.task_runner == "ray" and address == "auto")
        if not ok:
            raise ValueError(
                f"runner_address {address!r} is not a {self.task_runner} cluster address: expected "
                + " or ".join(f"{s}://host:port" for s in schemes[:2])
                + (" or auto" if self.task_runner == "ray" else "")
            )
        return self

    @model_validator(mode="after")
    def _ranker_needs_a_retriever(self) -> PipelineConfig:
        retrievers = model_names("retriever")
        if self.ranker is not None and not any(m in retrievers for m in self.models):
            raise ValueError(
                f"ranker {self.ranker!r} re-ranks an embedding retriever's candidates: list one of "
                f"{list(retrievers)} in models"
            )
        return self

    @property
    def model_name(self) -> str:
        return self.registered_model or registered_model_name(self.dataset_name)

    @property
    def dataset_name(self) -> str:
        """Name of a bundled spec, or the stem of a spec file path."""
        return Path(self.dataset).stem if self.dataset.endswith((".yaml", ".yml")) else self.dataset


class TuneConfig(PipelineConfig):
    """Parameters of ``kgrec tune`` / the Prefect ``tune`` flow: one study per model (the budget
    in ``tune``), then the pipeline with the recommended configs (``tuned``)."""

    tune: TuneSettings = Field(default_factory=TuneSettings)
    tuned: bool = True

    @field_validator("models")
    @classmethod
    def _tunable(cls, models: list[str]) -> list[str]:
        untunable = [m for m in models if not get_spec(m).search_space]
        if untunable:
            raise ValueError(f"model(s) {untunable} declare no search space and cannot be tuned")
        return models

    def pipeline(self) -> PipelineConfig:
        """The pipeline that follows the studies."""
        return PipelineConfig(**self.model_dump(exclude={"tune"}))
