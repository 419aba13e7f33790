"""Library steps of the ranking stage that the flow wires together."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kgrec.models.experiment import TrainedModel
from kgrec.models.ranking_experiment import best_retriever, ranker_config


def _trained(name: str, recall: float) -> TrainedModel:
    fit = SimpleNamespace(best_valid={"recall@20": recall})
    return TrainedModel(run_id=name, config=SimpleNamespace(model=name), model=None, fit=fit)


def test_the_ranker_learns_from_the_best_validation_retriever():
    models = [_trained("bprmf", 0.31), _trained("lightgcn", 0.38), _trained("kgat", 0.36)]
    sequential = SimpleNamespace(fit=SimpleNamespace(best_valid={"recall@20": 0.99}))  # not a retriever
    assert best_retriever([*models, sequential]).run_id == "lightgcn"
    with pytest.raises(ValueError, match="embedding retriever"):
        best_retriever([sequential])


def test_the_epoch_cap_only_lowers_kcan_epochs():
    default = ranker_config(7).epochs
    assert ranker_config(7, 3).epochs == 3
    assert ranker_config(7, 10 * default).epochs == default
    assert ranker_config(7).seed == 7


def test_kcan_starts_from_the_runs_kgat_when_there_is_one():
    from kgrec.models.ranking_experiment import trained_kgat

    models = [_trained("lightgcn", 0.38), _trained("kgat", 0.36)]
    assert trained_kgat(models).run_id == "kgat"
    assert trained_kgat(models[:1]) is None
