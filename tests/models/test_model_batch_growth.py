"""Batches that grow with the data: an epoch of a graph model keeps a bounded number of whole-graph
propagations (``TrainConfig.max_batches_per_epoch``), so its cost is linear in the interactions."""

from __future__ import annotations

import math

import pytest
import torch
from kgrec.models.config import TrainConfig
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import fit
from torch.optim.optimizer import register_optimizer_step_post_hook


def _config(**kw) -> TrainConfig:
    base = dict(model="lightgcn", embedding_dim=8, learning_rate=0.01, batch_size=64, epochs=2,
                patience=50, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_small_data_trains_exactly_as_configured():
    config = _config(max_batches_per_epoch=10)
    assert config.for_data(640) is config  # 10 batches of 64: nothing grows
    assert _config(max_batches_per_epoch=None).for_data(10**9).batch_size == 64


@pytest.mark.parametrize(("scaling", "factor"), [("sqrt", math.sqrt(100 / 64)), ("none", 1.0)])
def test_the_batch_grows_to_keep_the_number_of_batches(scaling, factor):
    grown = _config(max_batches_per_epoch=10, lr_scaling=scaling).for_data(1000)
    assert grown.batch_size == 100 and -(-1000 // grown.batch_size) == 10
    assert grown.learning_rate == pytest.approx(0.01 * factor)
    huge = _config(max_batches_per_epoch=1, learning_rate=0.5).for_data(10**8)
    assert huge.learning_rate == 1.0  # capped at the field's bound


def test_graph_models_default_to_a_bounded_epoch():
    for name, batches in (("lightgcn", 40), ("kgin", 40), ("kgat", 20), ("rgcn", 20), ("hgt", 20)):
        assert TrainConfig.for_model(name).max_batches_per_epoch == batches
    assert TrainConfig.for_model("bprmf").max_batches_per_epoch is None  # no propagation


def _steps_per_epoch(data, config) -> tuple[int, dict]:
    torch.manual_seed(config.seed)
    model = build_model(config, data)
    steps = 0

    def count(*_):
        nonlocal steps
        steps += 1

    handle = register_optimizer_step_post_hook(count)
    try:
        result = fit(model, data, config.model_copy(update={"epochs": 1}))
    finally:
        handle.remove()
    return steps, result.settings


def test_an_epoch_takes_at_most_max_batches_optimiser_steps(planted_data):
    n = planted_data.train.nnz
    config = _config(max_batches_per_epoch=3)
    assert n > 3 * config.batch_size  # the cap binds on this data
    steps, settings = _steps_per_epoch(planted_data, config)
    assert steps == 3 == settings["batches_per_epoch"]
    assert settings["effective_batch_size"] == math.ceil(n / 3)
    uncapped, _ = _steps_per_epoch(planted_data, _config())
    assert uncapped == math.ceil(n / 64) > 3


def test_a_cap_that_does_not_bind_changes_nothing(planted_data):
    loose = _config(max_batches_per_epoch=planted_data.train.nnz)  # never binds
    histories = []
    for config in (loose, _config()):
        torch.manual_seed(config.seed)
        result = fit(build_model(config, planted_data), planted_data, config)
        histories.append([(h.loss, h.valid) for h in result.history])
    assert histories[0] == histories[1]  # bitwise
