"""Model registry by name: builds the recommender a :class:`TrainConfig` asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kgrec.models.base import Recommender
from kgrec.models.retrievers.bprmf import BPRMF
from kgrec.models.config import KGATParams, TrainConfig
from kgrec.models.retrievers.kgat import KGAT, interaction_ckg, pretrain_from_bprmf
from kgrec.models.retrievers.lightgcn import LightGCN

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData

MODEL_NAMES: tuple[str, ...] = ("bprmf", "lightgcn", "kgat", "rgcn", "hgt")


def build_model(config: TrainConfig, data: InteractionData) -> Recommender:
    """Instantiate ``config.model`` for ``data`` (graph models are built from ``data.train`` only).

    KGAT is built on ``data.ckg`` (the interaction-only CKG when ``data`` has no snapshot); with
    ``params.pretrain == "bprmf"`` a BPR-MF is trained here first (its own recommended config,
    same seed) and its embeddings initialise KGAT's users and items, also after
    ``fit(reset=True)``.
    """
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
    if config.model == "kgat":
        params = config.model_params()
        assert isinstance(params, KGATParams)
        pretrained = pretrain_from_bprmf(data, config) if params.pretrain == "bprmf" else None
        return KGAT(
            data.num_users,
            data.num_items,
            interaction_ckg(data),
            embedding_dim=config.embedding_dim,
            layer_sizes=params.layer_sizes,
            aggregator=params.aggregator,
            mess_dropout=params.mess_dropout,
            relation_dim=params.relation_dim,
            reg_weight=config.reg_weight,
            kg_reg_weight=params.kg_reg_weight,
            kg_batch_size=params.kg_batch_size,
            kg_learning_rate=params.kg_learning_rate,
            transr_relations=params.transr_relations,
            use_attention=params.use_attention,
            kg_step=params.kg_step,
            pretrained=pretrained,
        )
    if config.model == "rgcn":
        from kgrec.models.config import RGCNParams
        from kgrec.models.retrievers.rgcn import RGCN

        rgcn = config.model_params()
        assert isinstance(rgcn, RGCNParams)
        return RGCN(
            data.num_users,
            data.num_items,
            interaction_ckg(data),
            embedding_dim=config.embedding_dim,
            num_layers=config.num_layers,
            num_bases=rgcn.num_bases,
            num_blocks=rgcn.num_blocks,
            activation=rgcn.activation,
            dropout=rgcn.dropout,
            layer_combination=rgcn.layer_combination,
            root_weight=rgcn.root_weight,
            conv_impl=rgcn.conv_impl,
            reg_weight=config.reg_weight,
        )
    if config.model == "hgt":
        from kgrec.models.config import HGTParams
        from kgrec.models.retrievers.hgt import HGT, interaction_hetero

        hgt = config.model_params()
        assert isinstance(hgt, HGTParams)
        return HGT(
            data.num_users,
            data.num_items,
            interaction_hetero(data),  # train interactions only (+ KG with a snapshot)
            embedding_dim=config.embedding_dim,
            num_layers=config.num_layers,
            heads=hgt.heads,
            dropout=hgt.dropout,
            layer_combination=hgt.layer_combination,
            reg_weight=config.reg_weight,
        )
    raise ValueError(f"unknown model {config.model!r}; known: {MODEL_NAMES}")
