"""Training loop: learning, reproducibility, early stopping and best-weight restoration."""

from __future__ import annotations

import kgrec.models.training.pairwise as trainer_mod
import pytest
import torch
from kgrec.models.base import EpochHook
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.retrievers.bprmf import BPRMF
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import fit
from kgrec.models.training.trainer import EpochLog, FitResult


def _config(**kw) -> TrainConfig:
    base = dict(
        embedding_dim=16, learning_rate=0.02, batch_size=256, epochs=15, patience=50, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["bprmf", "lightgcn"])
def test_loss_decreases_and_recall_improves(planted_data, name):
    cfg = _config(model=name)
    model = build_model(cfg, planted_data)
    torch.manual_seed(cfg.seed)
    model.reset_parameters()  # what fit starts from
    before = evaluate(model, planted_data.valid, planted_data.train, ks=(10,))["recall@10"]
    logs: list[EpochLog] = []
    result = fit(model, planted_data, cfg, on_epoch=logs.append)
    assert isinstance(result, FitResult) and logs == result.history
    losses = [h.loss for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    after = evaluate(model, planted_data.valid, planted_data.train, ks=(10, 20))
    assert before < 0.3 and after["recall@10"] > 0.6
    # fit returns the model with its best epoch's weights
    assert after["recall@20"] == pytest.approx(result.best_valid["recall@20"])
    assert all(h.valid is not None and h.seconds > 0 for h in result.history)
    assert result.seconds_per_epoch > 0 and result.total_seconds >= sum(h.seconds for h in logs)


def test_same_seed_same_history(planted_data):
    cfg = _config(model="lightgcn", epochs=4)
    runs = []
    for _ in range(2):
        model = build_model(cfg, planted_data)
        runs.append((fit(model, planted_data, cfg), model.embeddings()[0].detach()))
    (r1, e1), (r2, e2) = runs
    assert [h.loss for h in r1.history] == [h.loss for h in r2.history]
    assert [h.valid for h in r1.history] == [h.valid for h in r2.history]
    assert torch.equal(e1, e2)
    other = fit(build_model(cfg, planted_data), planted_data, cfg.model_copy(update={"seed": 7}))
    assert [h.loss for h in other.history] != [h.loss for h in r1.history]


def test_early_stopping_restores_best_weights(planted_data, monkeypatch):
    # Scripted validation scores: the best is epoch 2, then 3 evaluations without improvement.
    scripted = iter([0.1, 0.5, 0.4, 0.5, 0.3, 0.9])

    def fake_evaluate(*args, **kwargs):
        return {"recall@20": next(scripted)}

    monkeypatch.setattr(trainer_mod, "evaluate", fake_evaluate)
    cfg = _config(model="bprmf", epochs=20, patience=3)
    model = build_model(cfg, planted_data)
    snapshots: dict[int, torch.Tensor] = {}
    result = fit(
        model,
        planted_data,
        cfg,
        on_epoch=lambda log: snapshots.__setitem__(log.epoch, model.user_embedding.weight.detach().clone()),
    )
    assert result.stopped_early and len(result.history) == 5
    assert result.stop_reason == "patience" and not result.capped
    assert result.best_epoch == 2 and result.best_valid == {"recall@20": 0.5}
    assert torch.equal(model.user_embedding.weight, snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[5])


def test_time_budget_stops_after_the_epoch_that_passes_it(planted_data):
    """Every epoch takes longer than a nanosecond: one epoch, then the budget; it says so."""
    capped = fit(build_model(_config(model="bprmf"), planted_data), planted_data,
                 _config(model="bprmf", epochs=20, time_budget_s=1e-9))
    assert len(capped.history) == 1 and capped.best_epoch == 1
    assert capped.stop_reason == "time_budget" and capped.capped
    full = fit(build_model(_config(model="bprmf"), planted_data), planted_data,
               _config(model="bprmf", epochs=3))
    assert len(full.history) == 3 and full.stop_reason == "epochs" and not full.capped


def test_eval_every_and_extra_epoch_hook(planted_data):
    class WithExtra(BPRMF):
        calls = 0
        optimizers: list = []

        def epoch_hooks(self):
            def step(optimizer):
                WithExtra.calls += 1
                WithExtra.optimizers.append(optimizer)
                return {"kg_loss": 1.5}

            return [EpochHook("extra", step, (self.item_embedding.weight,), 0.5)]

    cfg = _config(model="bprmf", epochs=5, eval_every=2)
    model = WithExtra(planted_data.num_users, planted_data.num_items, cfg.embedding_dim)
    result = fit(model, planted_data, cfg)
    assert WithExtra.calls == 5
    # the trainer owns one Adam for the hook, over the hook's parameters only, kept across epochs
    assert len({id(o) for o in WithExtra.optimizers}) == 1
    (group,) = WithExtra.optimizers[0].param_groups
    assert group["lr"] == 0.5 and group["params"] == [model.item_embedding.weight]
    assert [h.valid is not None for h in result.history] == [False, True, False, True, True]
    assert result.history[0].extra == {"kg_loss": 1.5}
    assert result.best_epoch in (2, 4, 5)
