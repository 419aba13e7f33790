"""Library steps of the ranking stage that the flow wires together."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kgrec.models.retrievers.kgat import KGAT
from kgrec.models.spec import get_spec
from kgrec.models.tracking.experiment import Trained, ranker_inputs


def _trained(name: str, recall: float, model=None) -> Trained:
    fit = SimpleNamespace(best_valid={"recall@20": recall})
    return Trained(run_id=name, spec=get_spec(name), config=None, model=model, fit=fit, inputs=None)


def test_the_ranker_learns_from_the_best_validation_retriever():
    models = [_trained("bprmf", 0.31), _trained("lightgcn", 0.38), _trained("kgat", 0.36)]
    sequential = _trained("youtube_dnn", 0.99)  # not a retriever
    inputs = ranker_inputs(data="data", trained=[*models, sequential])
    assert (inputs.retriever_name, inputs.retriever_run_id, inputs.data) == ("lightgcn", "lightgcn", "data")
    with pytest.raises(ValueError, match="embedding retriever"):
        ranker_inputs("data", [sequential])


def test_kcan_starts_from_the_runs_kgat_when_there_is_one():
    kgat = KGAT.__new__(KGAT)  # only its type matters here
    models = [_trained("lightgcn", 0.38), _trained("kgat", 0.36, model=kgat)]
    assert ranker_inputs("data", models).global_init is kgat
    assert ranker_inputs("data", models[:1]).global_init is None
