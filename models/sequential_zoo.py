"""Sequential (multi-interest) candidate generators by name, and their typed training configuration.

``SEQUENTIAL_MODEL_NAMES`` are the models the pipeline trains on the sequential split
(:func:`kgrec.features.sequences.sequential_split`) instead of the per-user random split of the
embedding retrievers (``kgrec.models.zoo.MODEL_NAMES``):

==============  ==============================================================================
``youtube_dnn``  single vector (K = 1), :class:`kgrec.models.sequential.youtube_dnn.YouTubeDNN`
``mind``         MIND, dynamic routing with adaptive interest count
``comirec_dr``   ComiRec-DR, capsule routing
``comirec_sa``   ComiRec-SA, self-attention
``comirec_sa_mos`` ComiRec-SA trained with the mixture-of-softmaxes readout, unit-length interests
                 and the interest decorrelation penalty, served with the ``mixture`` merge
``comirec_sa_max`` ComiRec-SA trained on the softmax of the score the ``max`` merge serves
                 (``readout="max"``)
``mixture``      kNN-Embed-style interest mixture over the item vectors of a YouTube-DNN trained
                 first with the same configuration (not trained by gradient descent itself)
==============  ==============================================================================

:class:`SequentialModelConfig` is the one validated (pydantic, ``extra="forbid"``) configuration of
such a run: the architecture fields build the model, the training fields become the
:class:`~kgrec.models.sequential_trainer.SequentialTrainConfig` of
:func:`~kgrec.models.sequential_trainer.fit_sequential`. Defaults are the benchmark's
(``benchmarks/multi_interest.py``: d = 64, K = 4, L = 20, Adam at 1e-3, exact softmax over the
catalogue -- ``num_negatives = 0``; set it to a few hundred for catalogues beyond ~10^5 items, where
``batch x K x items`` scores per step no longer fit).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from kgrec.models.sequential.multi_interest import MultiInterestModel
from kgrec.models.sequential_trainer import SequentialTrainConfig
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEQUENTIAL_MODEL_NAMES: tuple[str, ...] = (
    "youtube_dnn", "mind", "comirec_dr", "comirec_sa", "comirec_sa_mos", "comirec_sa_max", "mixture",
)

#: Names that build a ComiRec-SA (the presets differ in how it is trained and served).
COMIREC_SA_VARIANTS: tuple[str, ...] = ("comirec_sa", "comirec_sa_mos", "comirec_sa_max")

#: Per-model defaults that differ from the field defaults (a named preset; overrides still win).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "comirec_sa_mos": {"readout": "mixture", "normalize_interests": True, "decorrelation": 1.0},
    "comirec_sa_max": {"readout": "max"},
}

#: The promotion gate's metric for sequential models (MLflow key of validation Recall@50).
SEQUENTIAL_SELECTION_METRIC = "best_valid_recall_at_50"

_METRIC = re.compile(r"^(recall|ndcg|hit)@(\d+)$")


def is_sequential(name: str) -> bool:
    return name in SEQUENTIAL_MODEL_NAMES


class SequentialModelConfig(BaseModel):
    """Model + training configuration of one sequential candidate generator (flat, for MLflow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Literal[
        "youtube_dnn", "mind", "comirec_dr", "comirec_sa", "comirec_sa_mos", "comirec_sa_max", "mixture"
    ] = "comirec_sa"
    # architecture
    embedding_dim: int = Field(64, ge=1, le=4096)
    num_interests: int = Field(4, ge=1, le=64, description="K (MIND: the maximum; mixture: kept components)")
    max_length: int = Field(20, ge=1, le=1000, description="most recent history items used (L)")
    temperature: float = Field(0.1, gt=0.0, description="sampled-softmax temperature")
    merge_rule: Literal["max", "weighted", "mixture", "controllable"] | None = Field(
        None,
        description="retrieval merge rule (None: the model's own -- mixture model: weighted; "
        "mixture readout: mixture; else max); controllable needs item categories",
    )
    diversity_weight: float = Field(
        0.5, ge=0.0, le=100.0, description="lambda of the controllable merge (used with merge_rule=controllable)"
    )
    readout: Literal["hard", "mixture", "max"] = Field(
        "hard",
        description="ComiRec-DR/SA training readout: argmax interest, mixture of softmaxes, or the softmax of "
        "the max merge's score",
    )
    normalize_interests: bool = Field(False, description="ComiRec-SA: unit-length interest vectors")
    hidden_dim: int = Field(0, ge=0, description="YouTube-DNN MLP width (0: mean pooling)")
    routing_iterations: int = Field(3, ge=1, le=10, description="MIND / ComiRec-DR")
    num_clusters: int = Field(8, ge=1, description="mixture: k-means clusters C")
    locality: float = Field(
        1.0, ge=0.0, le=1.0, description="mixture: weight of each cluster's local query against the global one"
    )
    # training (SequentialTrainConfig)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(256, ge=1)
    num_negatives: int = Field(0, ge=0, description="uniform negatives per batch; 0 = exact softmax")
    epochs: int = Field(30, ge=1, le=10_000)
    patience: int = Field(3, ge=1)
    min_history: int = Field(1, ge=1)
    seed: int = Field(2020, ge=0)
    selection_metric: str = "recall@50"
    ks: tuple[int, ...] = (20, 50)
    weight_decay: float = Field(0.0, ge=0.0)
    decorrelation: float = Field(0.0, ge=0.0, description="weight of the interest decorrelation penalty")
    mask_seen: bool = Field(False, description="leave the user's earlier items out of the softmax's negatives")
    target_window: int = Field(1, ge=1, le=1000, description="predict an item drawn from the next W (1: the next)")
    time_budget_s: float | None = Field(None, gt=0.0)
    # Per-batch tensors are tiny (B=256, L=20, d=64): OpenMP fan-out costs far more than it saves,
    # on a busy 2-core machine 20x more. None leaves torch's thread count alone.
    torch_threads: int | None = Field(1, ge=1)

    @field_validator("ks")
    @classmethod
    def _check_ks(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be a non-empty tuple of positive integers")
        return tuple(sorted(set(ks)))

    @model_validator(mode="after")
    def _check(self) -> SequentialModelConfig:
        match = _METRIC.match(self.selection_metric)
        if match is None or int(match.group(2)) not in self.ks:
            raise ValueError(
                f"selection_metric {self.selection_metric!r} must be <recall|ndcg|hit>@K with K in ks={self.ks}"
            )
        if self.readout != "hard" and self.model not in ("comirec_dr", *COMIREC_SA_VARIANTS):
            raise ValueError(f"readout={self.readout!r} is for comirec_dr / comirec_sa, not {self.model}")
        if self.normalize_interests and self.model not in COMIREC_SA_VARIANTS:
            raise ValueError(f"normalize_interests is for comirec_sa, not {self.model}")
        if self.model == "mixture" and self.num_interests > self.num_clusters:
            raise ValueError(
                f"mixture: num_interests ({self.num_interests}) must be <= num_clusters ({self.num_clusters})"
            )
        return self

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> SequentialModelConfig:
        """The default configuration of ``name``; ``None`` overrides mean "the default"."""
        if name not in SEQUENTIAL_MODEL_NAMES:
            raise ValueError(f"unknown sequential model {name!r}; known: {SEQUENTIAL_MODEL_NAMES}")
        return cls(model=name, **(MODEL_PRESETS.get(name, {}) | {k: v for k, v in overrides.items() if v is not None}))

    @property
    def mlflow_selection_metric(self) -> str:
        """MLflow key of the best validation selection metric (``best_valid_recall_at_50``)."""
        return "best_valid_" + self.selection_metric.replace("@", "_at_")

    def train_config(self) -> SequentialTrainConfig:
        return SequentialTrainConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            num_negatives=self.num_negatives,
            epochs=self.epochs,
            patience=self.patience,
            min_history=self.min_history,
            seed=self.seed,
            selection_metric=self.selection_metric,
            ks=self.ks,
            weight_decay=self.weight_decay,
            decorrelation=self.decorrelation,
            mask_seen=self.mask_seen,
            target_window=self.target_window,
            time_budget_s=self.time_budget_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{name: scalar}`` view for MLflow ``log_params`` (``ks`` joined, None as "none")."""
        params = self.model_dump()
        params["ks"] = ",".join(str(k) for k in self.ks)
        return {k: "none" if v is None else v for k, v in params.items()}


def build_sequential_model(config: SequentialModelConfig, num_items: int) -> MultiInterestModel:
    """An untrained model for ``config`` (the mixture still needs ``.fit(item_vectors)``)."""
    common = dict(embedding_dim=config.embedding_dim, max_length=config.max_length)
    rule = {"merge_rule": config.merge_rule or ("mixture" if config.readout == "mixture" else "max")}
    if config.model == "youtube_dnn":
        from kgrec.models.sequential.youtube_dnn import YouTubeDNN

        model: MultiInterestModel = YouTubeDNN(
            num_items, hidden_dim=config.hidden_dim, temperature=config.temperature, **common
        )
    elif config.model == "mind":
        from kgrec.models.sequential.mind import MIND

        model = MIND(
            num_items, num_interests=config.num_interests, routing_iterations=config.routing_iterations,
            temperature=config.temperature, **common, **rule,
        )
    elif config.model == "comirec_dr":
        from kgrec.models.sequential.comirec_dr import ComiRecDR

        model = ComiRecDR(
            num_items, num_interests=config.num_interests, routing_iterations=config.routing_iterations,
            temperature=config.temperature, readout=config.readout, **common, **rule,
        )
    elif config.model in COMIREC_SA_VARIANTS:
        from kgrec.models.sequential.comirec_sa import ComiRecSA

        model = ComiRecSA(
            num_items, num_interests=config.num_interests, temperature=config.temperature, readout=config.readout,
            normalize_interests=config.normalize_interests, **common, **rule,
        )
    elif config.model == "mixture":
        from kgrec.models.sequential.interest_mixture import InterestMixture

        model = InterestMixture(
            num_items, num_clusters=config.num_clusters, top_components=config.num_interests,
            seed=config.seed, locality=config.locality, **common,
        )
    else:  # pragma: no cover - guarded by the Literal
        raise ValueError(f"unknown sequential model {config.model!r}")
    if config.merge_rule and config.model in ("youtube_dnn", "mixture"):
        model.merge_rule = config.merge_rule
    model.diversity_weight = config.diversity_weight
    return model
