"""The DGL variants in the model registry, declared without importing ``dgl``.

The core registry imports this module on first use (``kgrec.models.backends`` is one of
``MODEL_PACKAGES``). A variant is registered only where a ``dgl`` distribution is installed
(``.venv-dgl``), so the core's model table, CLI choices and tests are those of an environment
without DGL; its model class is imported when the model is built (``importlib``, by name: neither
this module nor the registry ever imports ``dgl``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Literal

from kgrec.models.retrievers.rgcn import RELATIONAL_DEFAULTS, RELATIONAL_SEARCH_SPACE
from kgrec.models.spec import ModelSpec, register
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig
    from torch import nn

#: Module of the DGL models, imported only by :func:`build_rgcn_dgl`.
RGCN_MODULE = "kgrec.models.backends.dgl.rgcn"


def dgl_installed() -> bool:
    """Whether a ``dgl`` distribution is installed here (its metadata; nothing is imported). Not
    ``find_spec``: under pytest a folder named ``dgl`` on ``sys.path`` (tests/dgl) is found too."""
    try:
        importlib.metadata.distribution("dgl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class DGLRGCNParams(BaseModel):
    """``rgcn_dgl`` hyper-parameters: those of ``rgcn`` without its PyG ``conv_impl`` switch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bases: int | None = Field(None, ge=1, description="basis decomposition (exclusive with blocks)")
    num_blocks: int | None = Field(8, ge=1, description="block-diagonal decomposition")
    activation: Literal["tanh", "relu", "leaky_relu", "none"] = "tanh"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_combination: Literal["concat", "mean", "last"] = "mean"
    root_weight: bool = True

    @model_validator(mode="after")
    def _check_decomposition(self) -> DGLRGCNParams:
        if (self.num_bases is None) == (self.num_blocks is None):
            raise ValueError("set exactly one of num_bases or num_blocks (the other to None)")
        return self


def build_rgcn_dgl(config: TrainConfig, data: InteractionData) -> nn.Module:
    params = DGLRGCNParams.model_validate(config.params)
    rgcn = importlib.import_module(RGCN_MODULE)
    kgat = importlib.import_module("kgrec.models.retrievers.kgat")
    return rgcn.DGLRGCN(
        data.num_users,
        data.num_items,
        kgat.interaction_ckg(data),
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        num_bases=params.num_bases,
        num_blocks=params.num_blocks,
        activation=params.activation,
        dropout=params.dropout,
        layer_combination=params.layer_combination,
        root_weight=params.root_weight,
        reg_weight=config.reg_weight,
    )


RGCN_DGL_SPEC = ModelSpec(
    name="rgcn_dgl",
    family="retriever",
    build=build_rgcn_dgl,
    needs_kg=True,
    summary="R-GCN on DGL's RelGraphConv, the DGL backend's variant of rgcn (Schlichtkrull et al., ESWC 2018)",
    params=DGLRGCNParams,
    defaults=RELATIONAL_DEFAULTS,  # rgcn's, so the two are compared like for like
    search_space=RELATIONAL_SEARCH_SPACE,
)
if dgl_installed():
    register(RGCN_DGL_SPEC)
