"""The training-loop settings every family's configuration shares (:class:`LoopConfig`).

Each family's config (``TrainConfig`` for retrievers, ``SequentialModelConfig``, ``KCANConfig``)
subclasses it and sets its own defaults; the :class:`~kgrec.models.training.trainer.Trainer` reads
only these fields, so a loop setting means the same thing in every family.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


def check_selection_metric(metric: str, ks: tuple[int, ...], names: tuple[str, ...]) -> None:
    """``metric`` must be ``<name>@K`` with a name of ``names`` and K among the evaluated ``ks``."""
    match = re.match(r"^(\w+)@(\d+)$", metric)
    if match is None or match.group(1) not in names or int(match.group(2)) not in ks:
        raise ValueError(f"selection_metric {metric!r} must be <{'|'.join(names)}>@K with K in ks={ks}")


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    batch_size: int = Field(2048, ge=1)
    epochs: int = Field(100, ge=1, le=10_000, description="maximum number of epochs")
    patience: int = Field(10, ge=1, description="validations without improvement before stopping")
    eval_every: int = Field(1, ge=1, description="epochs between validations")
    seed: int = Field(2020, ge=0)
    device: str = Field("auto", description='"auto" (cuda if available, else cpu), "cpu", "cuda[:n]"')
    time_budget_s: float | None = Field(None, gt=0.0, description="stop after this much training time")

    @field_validator("ks", check_fields=False)  # the families that evaluate at several K
    @classmethod
    def _check_ks(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be a non-empty tuple of positive integers")
        return tuple(sorted(set(ks)))

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if device != "auto":
            try:
                torch.device(device)
            except RuntimeError as exc:  # pydantic only turns ValueError into a validation error
                raise ValueError(str(exc)) from exc
        return device

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{name: scalar}`` view for MLflow ``log_params`` (tuples joined, None as "none")."""
        flat = {}
        for key, value in self.model_dump().items():
            if isinstance(value, dict):
                continue  # nested params: flattened by the family config
            if isinstance(value, tuple | list):
                value = ",".join(str(v) for v in value)
            flat[key] = "none" if value is None else value
        return flat

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
