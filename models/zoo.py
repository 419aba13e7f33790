"""Model registry by name: builds the recommender a :class:`TrainConfig` asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kgrec.models.base import Recommender
from kgrec.models.bprmf import BPRMF
from kgrec.models.config import TrainConfig
from kgrec.models.lightgcn import LightGCN

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

MODEL_NAMES: tuple[str, ...] = ("bprmf", "lightgcn")


def build_model(config: TrainConfig, data: InteractionData) -> Recommender:
    """Instantiate ``config.model`` for ``data`` (graph models are built from ``data.train`` only)."""
    if config.model == "bprmf":
        return BPRMF(data.num_users, data.num_items, config.embedding_dim, config.reg_weight)
    if config.model == "lightgcn":
        return LightGCN(
            data.num_users,
            data.num_items,
            data.train,
            embedding_dim=config.embedding_dim,
            num_layers=config.num_layers,
            reg_weight=config.reg_weight,
        )
    raise ValueError(f"unknown model {config.model!r}; known: {MODEL_NAMES}")
