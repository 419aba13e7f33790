"""Configuration of the sequential (multi-interest) family: one validated, flat config per run.

The architecture fields build the model (each model file's ``build``), the loop fields drive the
:class:`~kgrec.models.training.trainer.Trainer` (:class:`~kgrec.models.training.config.LoopConfig`),
the rest the :class:`~kgrec.models.training.sequential.SequentialTask`. Defaults are the
benchmark's (``benchmarks/multi_interest.py``: d = 64, K = 4, L = 20, Adam at 1e-3, exact softmax
over catalogues up to ``exact_softmax_max_items`` = 5,000 items, where an epoch's
``samples x K x items`` scores stay affordable; above it a log-Q-corrected sampled softmax with
1,024 popularity-drawn negatives: ``benchmarks/sampled_softmax.py``). A model's preset (e.g.
``comirec_sa_max``: ``readout="max"``) is its spec's ``defaults``; its own constraints are the
spec's ``check``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from kgrec.models.spec import get_spec
from kgrec.models.training.config import LoopConfig, check_selection_metric
from optuna.distributions import CategoricalDistribution, FloatDistribution
from pydantic import Field, model_validator

M = TypeVar("M")


#: What ``kgrec tune`` searches for the next-item softmax models (around the defaults: lr 1e-3,
#: batch 256, temperature 0.1); K, L and the width stay fixed so that runs compare.
SEQUENTIAL_SEARCH_SPACE = {
    "learning_rate": FloatDistribution(3e-4, 3e-3, log=True),
    "batch_size": CategoricalDistribution((128, 256, 512)),
    "temperature": FloatDistribution(0.05, 0.5, log=True),
}

class SequentialModelConfig(LoopConfig):
    """Model + training configuration of one sequential candidate generator (flat, for MLflow)."""

    model: str = Field("comirec_sa", description="a sequential model of the registry (kgrec.models.spec)")
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
    # training
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(256, ge=1)
    num_negatives: int | None = Field(
        None, ge=0,
        description="negatives per batch: 0 = the exact softmax over the catalogue, N = a sampled softmax "
        "with N negatives shared by the batch; None = exact up to exact_softmax_max_items items, else "
        "sampled_negatives (the choice is logged as the run's softmax / softmax_negatives params)",
    )
    exact_softmax_max_items: int = Field(
        5000, ge=1, description="largest catalogue trained with the exact softmax when num_negatives is None"
    )
    sampled_negatives: int = Field(1024, ge=1, description="negatives of the sampled softmax chosen above that size")
    negative_sampler: Literal["uniform", "popularity"] | None = Field(
        None,
        description="proposal of the sampled softmax: uniform, or popularity (train counts^0.75, log-Q "
        "corrected); None = popularity when the catalogue size chose the sampled softmax, uniform when "
        "num_negatives is set or with REMI's hard negatives (their weights assume uniform draws)",
    )
    epochs: int = Field(30, ge=1, le=10_000)
    patience: int = Field(3, ge=1)
    min_history: int = Field(1, ge=1)
    device: str = Field("cpu", description="the sequence tensors and the merge run on the CPU")
    selection_metric: str = "recall@50"
    ks: tuple[int, ...] = (20, 50)
    decorrelation: float = Field(0.0, ge=0.0, description="weight of the interest decorrelation penalty")
    hard_negative_beta: float = Field(
        0.0, ge=0.0, le=100.0,
        description="REMI interest-aware hard negatives: hardness beta of the negative weights exp(beta * logit) "
        "(0: the plain softmax)",
    )
    routing_reg: float = Field(
        0.0, ge=0.0, le=1e9,
        description="REMI routing regularisation weight (ComiRec-SA attention, ComiRec-DR/MIND coupling; "
        "0: off)",
    )
    mask_seen: bool = Field(False, description="leave the user's earlier items out of the softmax's negatives")
    target_window: int = Field(1, ge=1, le=1000, description="predict an item drawn from the next W (1: the next)")
    # Per-batch tensors are tiny (B=256, L=20, d=64): OpenMP fan-out costs far more than it saves,
    # on a busy 2-core machine 20x more. None leaves torch's thread count alone.
    torch_threads: int | None = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SequentialModelConfig:
        check_selection_metric(self.selection_metric, self.ks, ("recall", "ndcg", "hit"))
        spec = get_spec(self.model, "sequential")
        if spec.check is not None:
            spec.check(self)
        return self

    def softmax(self, num_items: int) -> tuple[int, str]:
        """(negatives per batch, sampler) for a catalogue of ``num_items``: 0 negatives is the exact
        softmax (``"exact"``); else ``"uniform"`` or ``"popularity"``."""
        negatives, auto = self.num_negatives, self.num_negatives is None
        if auto:
            negatives = 0 if num_items <= self.exact_softmax_max_items else self.sampled_negatives
        if negatives == 0:
            return 0, "exact"
        if self.negative_sampler is not None:
            return negatives, self.negative_sampler
        # an explicit num_negatives keeps the uniform draws it always had
        return negatives, "popularity" if auto and self.hard_negative_beta == 0 else "uniform"

    @model_validator(mode="after")
    def _sampler_fits_the_loss(self) -> SequentialModelConfig:
        if self.negative_sampler == "popularity" and self.hard_negative_beta > 0:
            raise ValueError("negative_sampler 'popularity' with hard_negative_beta > 0: REMI's hard-negative "
                             "weights assume uniform negatives")
        return self

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> SequentialModelConfig:
        """The default configuration of ``name``; ``None`` overrides mean "the default"."""
        defaults = get_spec(name, "sequential").defaults
        return cls(model=name, **(dict(defaults) | {k: v for k, v in overrides.items() if v is not None}))


def trained_merge_rule(config: SequentialModelConfig) -> str:
    """The merge rule a model is served with: the config's, else the one its readout trains."""
    return config.merge_rule or ("mixture" if config.readout == "mixture" else "max")


def served_as_configured(model: M, config: SequentialModelConfig) -> M:
    """The last step of every sequential ``build``: the config's merge rule (when it names one),
    the controllable merge's lambda and REMI's training-only weights (IHN beta, RR weight)."""
    if config.merge_rule:
        model.merge_rule = config.merge_rule
    model.diversity_weight = config.diversity_weight
    model.hard_negative_beta = config.hard_negative_beta
    model.routing_reg = config.routing_reg
    return model


def unnormalised_interests(config: SequentialModelConfig) -> None:
    """``check`` of the models without interest normalisation (all but ComiRec-SA)."""
    if config.normalize_interests:
        raise ValueError(f"normalize_interests is for comirec_sa, not {config.model}")


def no_routing_matrix(config: SequentialModelConfig) -> None:
    """``check`` part of the models without an item-to-interest routing matrix (REMI's RR)."""
    if config.routing_reg > 0:
        raise ValueError(f"routing_reg is for models with a routing matrix (comirec_sa, comirec_dr, mind), "
                         f"not {config.model}")


def hard_readout_only(config: SequentialModelConfig) -> None:
    """``check`` of the models without a readout choice or interest normalisation."""
    if config.readout != "hard":
        raise ValueError(f"readout={config.readout!r} is for comirec_dr / comirec_sa, not {config.model}")
    unnormalised_interests(config)
