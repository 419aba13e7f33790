"""The three model families: what a :class:`~kgrec.models.spec.ModelSpec`'s ``family`` stands for.

A family binds, for all of its models, the configuration class, the training inputs, the training
task run by the one :class:`~kgrec.models.training.trainer.Trainer`, the test protocol (through
the one evaluator, :mod:`kgrec.models.evaluation`), the promotion metric and the artefact kind.
Library steps (``kgrec.models.tracking.experiment``) and the flow only ever call these methods,
so no caller branches on a family or a model name.

==========  ======================  ==============================  =================  ==============
family      inputs                  task                            selected on        artefact
==========  ======================  ==============================  =================  ==============
retriever   ``InteractionData``     :class:`BPRTask`                valid Recall@20    embedding
sequential  :class:`SequenceInputs` :class:`SequentialTask`         valid Recall@50    multi_interest
ranker      :class:`RankerInputs`   :class:`RerankTask`             valid NDCG@20      ranker
                                                                    (fused list)
==========  ======================  ==============================  =================  ==============
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.sequences import SequenceSplit, sequential_split
from kgrec.features.snapshot import Snapshot, load_snapshot
from kgrec.features.split import random_split, temporal_leave_last_out
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate_split, metric_key
from kgrec.models.rankers.kcan import KCANConfig
from kgrec.models.reranking import RerankTask, evaluate_reranking
from kgrec.models.retrievers.kgat import KGAT
from kgrec.models.sequential.config import SequentialModelConfig
from kgrec.models.sequential_evaluation import category_matrix, evaluate_sequential
from kgrec.models.spec import Family, ModelSpec, get_spec, require_kg
from kgrec.models.training.pairwise import BPRTask, batch_settings
from kgrec.models.training.sequential import SequentialTask
from kgrec.models.training.trainer import EpochCallback, FitResult, Trainer, torch_threads


@dataclass(frozen=True)
class SequenceInputs:
    """What a sequential model trains and is tested on: the snapshot, its sequential split and
    the items' multi-hot categories (``None`` without categories; they add diversity@K)."""

    snapshot: Snapshot
    split: SequenceSplit
    categories: np.ndarray | None = None

    @classmethod
    def of(cls, snapshot: Snapshot, split: SequenceSplit) -> SequenceInputs:
        if split.num_items != snapshot.n_items:
            raise ValueError(f"split has {split.num_items} items, snapshot {snapshot.n_items}")
        categories = category_matrix(snapshot.item_categories())[0] if snapshot.has_categories else None
        return cls(snapshot, split, categories)


@dataclass(frozen=True)
class RankerInputs:
    """What a ranker trains on: the interactions, the retriever whose candidates it re-ranks (and
    whose hard negatives it learns from) and optionally a trained KGAT its global layer starts from."""

    data: InteractionData
    retriever: torch.nn.Module
    retriever_name: str
    retriever_run_id: str
    global_init: KGAT | None = None


class ModelFamily:
    """Base of the three families (module docstring)."""

    name: ClassVar[Family]
    config_class: ClassVar[type]
    artifact: ClassVar[str]

    def config(self, spec: ModelSpec, **overrides: Any) -> Any:
        """The spec's recommended configuration with ``overrides`` (``None``: the default)."""
        return self.config_class.for_model(spec.name, **overrides)

    def selection_metric(self, config: Any) -> str:
        """The MLflow metric the promotion gate compares (``best_valid_recall_at_20``, ...)."""
        return metric_key("best_valid", config.selection_metric)

    def fit(
        self, spec: ModelSpec, config: Any, inputs: Any, callbacks: Sequence[EpochCallback] = (), **trainer: Any
    ) -> tuple[torch.nn.Module, FitResult]:
        """Build and train ``spec`` (its own ``fit`` for models not trained by gradient descent);
        a model that needs a KG refuses data without one."""
        require_kg(spec.name, self.snapshot(inputs))
        if spec.fit is not None:
            return spec.fit(spec, config, inputs, callbacks, **trainer)
        torch.manual_seed(config.seed)
        model = spec.build(config, self.build_inputs(inputs))
        result = Trainer(config, callbacks, **trainer).fit(model, self.task(config, inputs, model))
        return model, result

    def build_inputs(self, inputs: Any) -> Any:
        return inputs

    def task(self, config: Any, inputs: Any, model: torch.nn.Module) -> Any:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, config: Any, inputs: Any) -> dict[str, float]:
        """Test metrics (flat ``{name: value}``) of the best-validation weights."""
        raise NotImplementedError

    def data_params(self, inputs: Any) -> dict[str, Any]:
        """What identifies the data a model saw (snapshot hash, split, sizes): MLflow params."""
        raise NotImplementedError

    def snapshot(self, inputs: Any) -> Snapshot:
        """The snapshot the inputs come from (id maps of the exported bundle)."""
        return inputs.snapshot

    def summary(self, config: Any, inputs: Any, fit: FitResult) -> dict[str, Any]:
        """What the run's summary adds for this family (the CLI prints it)."""
        return {}


def interaction_params(data: InteractionData) -> dict[str, Any]:
    params: dict[str, Any] = {
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_train": int(data.train.nnz),
        "num_valid": int(data.valid.nnz),
        "num_test": int(data.test.nnz),
    }
    if data.snapshot is not None:
        params |= {"dataset": data.snapshot.name, "snapshot_hash": data.snapshot.hash}
    if data.split is not None:
        params |= {"split": data.split.kind, "split_seed": data.split.seed}
    return params


class RetrieverFamily(ModelFamily):
    name = "retriever"
    config_class = TrainConfig
    artifact = "embedding"

    def fit(self, spec, config: TrainConfig, inputs: InteractionData, callbacks=(), **trainer):
        # The batch (and learning rate) a graph model trains with depend on the data's size.
        trained = config.for_data(int(inputs.train.nnz))
        model, result = super().fit(spec, trained, inputs, callbacks, **trainer)
        result.settings = batch_settings(trained, int(inputs.train.nnz))
        return model, result

    def task(self, config: TrainConfig, inputs: InteractionData, model: torch.nn.Module) -> BPRTask:
        return BPRTask(inputs, config.batch_size, config.selection_metric, config.ks, config.eval_batch_size)

    def evaluate(self, model: torch.nn.Module, config: TrainConfig, inputs: InteractionData) -> dict[str, float]:
        model.eval()
        return evaluate_split(model, inputs, part="test", ks=config.ks)

    def data_params(self, inputs: InteractionData) -> dict[str, Any]:
        return interaction_params(inputs)


class SequentialFamily(ModelFamily):
    name = "sequential"
    config_class = SequentialModelConfig
    artifact = "multi_interest"

    def build_inputs(self, inputs: SequenceInputs) -> int:
        return inputs.split.num_items

    def task(self, config: SequentialModelConfig, inputs: SequenceInputs, model: torch.nn.Module) -> SequentialTask:
        return SequentialTask(inputs.split, config, model.max_length, inputs.categories)

    def fit(self, spec, config, inputs, callbacks=(), **trainer):
        if config.merge_rule == "controllable" and inputs.categories is None:
            raise ValueError(
                f"{config.model}: merge_rule 'controllable' chooses by item categories and "
                f"{inputs.snapshot.name} has none"
            )
        with torch_threads(config.torch_threads):
            return super().fit(spec, config, inputs, callbacks, **trainer)

    def evaluate(self, model, config: SequentialModelConfig, inputs: SequenceInputs) -> dict[str, float]:
        split = inputs.split
        with torch_threads(config.torch_threads):
            metrics = evaluate_sequential(model, split.test_inputs, split.test_targets, inputs.categories, ks=config.ks)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    def data_params(self, inputs: SequenceInputs) -> dict[str, Any]:
        snapshot, split = inputs.snapshot, inputs.split
        return {
            "dataset": snapshot.name,
            "snapshot_hash": snapshot.hash,
            "split": "sequential",
            "split_seed": split.seed,
            "split_ratios": ",".join(str(r) for r in split.ratios),
            "target_ratio": split.target_ratio,
            "num_users": split.num_users,
            "num_items": split.num_items,
            **{f"num_{k}": v for k, v in split.summary().items()},
        }


class RankerFamily(ModelFamily):
    name = "ranker"
    config_class = KCANConfig
    artifact = "ranker"

    def config(self, spec: ModelSpec, **overrides: Any) -> KCANConfig:
        """KCAN's defaults with the run's seed; ``epochs`` (the pipeline's ``--epochs``) only
        lowers the number of epochs (KCAN's epochs are expensive)."""
        epochs = overrides.pop("epochs", None)
        config = KCANConfig(**dict(spec.defaults), **{k: v for k, v in overrides.items() if v is not None})
        return config.model_copy(update={"epochs": min(epochs, config.epochs)}) if epochs else config

    def build_inputs(self, inputs: RankerInputs) -> InteractionData:
        return inputs.data

    def task(self, config: KCANConfig, inputs: RankerInputs, model: torch.nn.Module) -> RerankTask:
        return RerankTask(inputs.data, inputs.retriever, config, inputs.global_init)

    def evaluate(self, model, config: KCANConfig, inputs: RankerInputs) -> dict[str, float]:
        out = evaluate_reranking(
            inputs.retriever, model, inputs.data, "test", N=config.num_candidates, ks=(5, 10, 20, 50)
        )
        flat = dict(out["fused"])
        for stage in ("kcan", "retrieval"):
            flat |= {f"{stage}_{k}": v for k, v in out[stage].items()}
        flat |= {k: v for k, v in out.items() if k.startswith("candidate_")}
        flat["alpha"] = out["alpha"]
        return flat

    def snapshot(self, inputs: RankerInputs) -> Snapshot:
        return inputs.data.snapshot

    def summary(self, config: KCANConfig, inputs: RankerInputs, fit: FitResult) -> dict[str, Any]:
        return {
            "retriever": inputs.retriever_name,
            "alpha": fit.best_valid.get("alpha"),
            "num_candidates": config.num_candidates,
        }

    def data_params(self, inputs: RankerInputs) -> dict[str, Any]:
        return interaction_params(inputs.data) | {
            "retriever": inputs.retriever_name,
            "retriever_run_id": inputs.retriever_run_id,
        }


FAMILIES: Mapping[Family, ModelFamily] = {
    f.name: f for f in (RetrieverFamily(), SequentialFamily(), RankerFamily())
}


class PipelineInputs:
    """The training inputs of each family for one snapshot, built once on first use: the
    random (or temporal leave-last-out) split's ``InteractionData`` and the sequential split."""

    def __init__(self, snapshot_dir: Path, split: str = "random", seed: int = 2020) -> None:
        self.snapshot = load_snapshot(snapshot_dir)
        self.split, self.seed = split, seed
        self._built: dict[str, Any] = {}

    def for_family(self, family: Family) -> Any:
        """Retrievers and rankers share one ``InteractionData``; sequential models get the
        sequential split."""
        key = "sequential" if family == "sequential" else "interactions"
        if key not in self._built:
            if key == "sequential":
                self._built[key] = SequenceInputs.of(self.snapshot, sequential_split(self.snapshot, seed=self.seed))
            else:
                parts = (
                    random_split(self.snapshot.interactions, seed=self.seed)
                    if self.split == "random"
                    else temporal_leave_last_out(self.snapshot.interactions)
                )
                self._built[key] = InteractionData.from_snapshot(self.snapshot, parts)
        return self._built[key]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.snapshot.name, "snapshot_hash": self.snapshot.hash}
        if "sequential" in self._built:
            split = self._built["sequential"].split
            out["sequential_split"] = split.summary() | {"seed": split.seed}
        return out


def family_of(spec_or_name: ModelSpec | str) -> ModelFamily:
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    return FAMILIES[spec.family]
