"""Model modules, the zoo and the config."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
from kgrec.models.base import Recommender
from kgrec.models.config import TrainConfig
from kgrec.models.retrievers.bprmf import BPRMF
from kgrec.models.retrievers.lightgcn import LightGCN
from kgrec.models.spec import build_model, model_names
from kgrec.models.training.trainer import hook_optimizer


def _dense_lightgcn(data, user_w, item_w, num_layers):
    r = torch.from_numpy(data.train.toarray()).double()
    u, i = r.shape
    a = torch.zeros(u + i, u + i, dtype=torch.float64)
    a[:u, u:], a[u:, :u] = r, r.t()
    deg = a.sum(1).clamp(min=1)
    norm = a / deg.sqrt()[:, None] / deg.sqrt()[None, :]
    x = torch.cat([user_w, item_w]).double()
    layers = [x]
    for _ in range(num_layers):
        layers.append(norm @ layers[-1])
    out = torch.stack(layers).mean(0)
    return out[:u], out[u:]


@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_lightgcn_propagation_matches_dense_reference(tiny_data, num_layers):
    torch.manual_seed(0)
    model = LightGCN(tiny_data.num_users, tiny_data.num_items, tiny_data.train, 8, num_layers)
    user_emb, item_emb = model.embeddings()
    ref_u, ref_i = _dense_lightgcn(
        tiny_data, model.user_embedding.weight.detach(), model.item_embedding.weight.detach(), num_layers
    )
    torch.testing.assert_close(user_emb.double(), ref_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(item_emb.double(), ref_i, rtol=1e-5, atol=1e-6)


def test_lightgcn_gradient_matches_dense_reference(tiny_data):
    torch.manual_seed(0)
    model = LightGCN(tiny_data.num_users, tiny_data.num_items, tiny_data.train, 4, 2).double()
    weight = torch.randn(tiny_data.num_users + tiny_data.num_items, 4, dtype=torch.float64)
    user_emb, item_emb = model.embeddings()
    (torch.cat([user_emb, item_emb]) * weight).sum().backward()
    ref_w_u = model.user_embedding.weight.detach().clone().requires_grad_()
    ref_w_i = model.item_embedding.weight.detach().clone().requires_grad_()
    ref_u, ref_i = _dense_lightgcn(tiny_data, ref_w_u, ref_w_i, 2)
    (torch.cat([ref_u, ref_i]) * weight).sum().backward()
    torch.testing.assert_close(model.user_embedding.weight.grad, ref_w_u.grad)
    torch.testing.assert_close(model.item_embedding.weight.grad, ref_w_i.grad)


def test_lightgcn_uses_train_only_and_keeps_graph_out_of_state_dict(tiny_data):
    model = LightGCN(tiny_data.num_users, tiny_data.num_items, tiny_data.train)
    assert model.adj_t._nnz() == 2 * tiny_data.train.nnz
    assert set(model.state_dict()) == {"user_embedding.weight", "item_embedding.weight"}


@pytest.mark.parametrize("name", model_names("retriever"))
def test_zoo_models_follow_the_contract(tiny_data, name):
    model = build_model(TrainConfig(model=name, embedding_dim=8), tiny_data)
    assert isinstance(model, Recommender)
    model.eval()  # message dropout (KGAT) makes train-mode forwards differ
    user_emb, item_emb = model.embeddings()
    # width is embedding_dim, except for models that concatenate layers (KGAT: 8 + 64 + 32 + 16)
    assert user_emb.shape[0] == 4 and item_emb.shape == (5, user_emb.shape[1])
    users = torch.tensor([0, 2])
    torch.testing.assert_close(model.score(users), user_emb[users] @ item_emb.t())
    model.train()
    loss = model.loss(users, torch.tensor([0, 3]), torch.tensor([4, 1]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for hook in model.epoch_hooks():  # e.g. KGAT's TransR step: finite stats
        assert all(math.isfinite(v) for v in hook.run(hook_optimizer(hook)).values())
    before = user_emb.detach().clone()
    model.reset_parameters()
    assert not torch.equal(before, model.embeddings()[0].detach())


def test_bprmf_loss_is_bpr_plus_l2():
    model = BPRMF(2, 3, embedding_dim=2, reg_weight=0.5)
    with torch.no_grad():
        model.user_embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.item_embedding.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    loss = model.loss(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    # x_ui - x_uj = 2 - 0; reg = 0.5 * (1 + 4 + 1) / 1
    expected = -np.log(1 / (1 + np.exp(-2.0))) + 0.5 * 0.5 * 6.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_config_validation_and_flat_dict():
    cfg = TrainConfig(model="bprmf", ks=(20, 10))
    assert cfg.ks == (10, 20)
    flat = cfg.to_dict()
    assert flat["ks"] == "10,20" and flat["model"] == "bprmf"
    assert all(isinstance(v, int | float | str) for v in flat.values())
    for bad in (
        {"learning_rate": 0.0},
        {"model": "no-such-model"},
        {"unknown": 1},
        {"selection_metric": "recall@30"},
        {"batch_size": 0},
        {"device": "tpu-ish:x"},
    ):
        with pytest.raises((pydantic.ValidationError, ValueError)):
            TrainConfig(**bad)
    assert TrainConfig(device="cpu").resolved_device() == torch.device("cpu")
