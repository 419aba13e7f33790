"""KGAT: attention, TransR step, aggregators, persistence, pretraining and learning."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import scipy.sparse as sp
import torch
from ckg_helpers import make_ckg  # noqa: E402  (tests/models helper)
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.layers.kgat_conv import AttentiveAdjacency, KGATConv
from kgrec.models.layers.transr import TailCorruptor, relation_project, transr_loss
from kgrec.models.retrievers.kgat import KGAT, KGATParams, interaction_ckg, pretrain_from_bprmf
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import fit
from kgrec.models.training.trainer import hook_optimizer


def row_sums(model: KGAT) -> torch.Tensor:
    sums = torch.zeros(model.num_nodes, dtype=torch.float64)
    return sums.index_add_(0, model.edge_index[0], model.attention().double())


@pytest.fixture(scope="module")
def tiny_ckg(tiny_data):
    # items 0-4, entities 5-7 (KG node ids); two KG relations; (item 0, entity 5) linked twice
    kg = [(0, 0, 5), (1, 0, 5), (2, 0, 6), (3, 1, 7), (4, 1, 7), (0, 1, 5), (5, 0, 6)]
    return make_ckg(tiny_data.train, kg, num_entities=3, num_kg_relations=2)


@pytest.fixture(scope="module")
def planted_ckg(planted_data):
    """Planted KG: item -> its community's genre entity, plus one random 'noise' relation."""
    rng = np.random.default_rng(1)
    num_items = planted_data.num_items
    genre = [(i, 0, num_items + i // 20) for i in range(num_items)]
    noise = [(i, 1, num_items + 4 + int(rng.integers(6))) for i in range(num_items)]
    return make_ckg(planted_data.train, genre + noise, num_entities=10, num_kg_relations=2)


def _planted_config(**kw) -> TrainConfig:
    base = dict(
        embedding_dim=16,
        learning_rate=0.02,
        batch_size=256,
        epochs=15,
        patience=50,
        device="cpu",
        params={"layer_sizes": (16, 8), "kg_batch_size": 64, "kg_learning_rate": 0.02, "pretrain": None},
    )
    return TrainConfig.for_model("kgat", **{**base, **kw})


def test_attention_rows_sum_to_one_and_match_the_definition(tiny_data, tiny_ckg):
    torch.manual_seed(0)
    model = KGAT(4, 5, tiny_ckg, embedding_dim=6, layer_sizes=(4,), relation_dim=3)
    heads = torch.unique(model.edge_index[0])
    torch.testing.assert_close(row_sums(model)[heads], torch.ones(len(heads), dtype=torch.float64))
    model.update_attention()
    att = model.attention()
    assert att.shape == (tiny_ckg.edge_index.size(1),)
    assert torch.equal(model.edge_index, tiny_ckg.edge_index)
    assert torch.equal(model.edge_type, tiny_ckg.edge_type)
    torch.testing.assert_close(row_sums(model)[heads], torch.ones(len(heads), dtype=torch.float64))
    # reference: pi(h,r,t) = (W_r e_t)^T tanh(W_r e_h + e_r), softmax over each head's edges
    emb, rel, w = (model.node_embedding.weight, model.relation_embedding.weight, model.relation_weight)
    h, t = model.edge_index
    r = model.edge_type
    scores = torch.stack(
        [(emb[t[k]] @ w[r[k]]) @ torch.tanh(emb[h[k]] @ w[r[k]] + rel[r[k]]) for k in range(len(r))]
    ).detach()
    expected = torch.empty_like(scores)
    for node in heads:
        mask = h == node
        expected[mask] = torch.softmax(scores[mask], 0)
    torch.testing.assert_close(att, expected)
    # the propagation uses exactly these weights (duplicate (h, t) pairs summed)
    dense = torch.zeros(model.num_nodes, model.num_nodes).index_put_((h, t), att, accumulate=True)
    x = torch.randn(model.num_nodes, 6)
    torch.testing.assert_close(model.adjacency(x), dense @ x)


def test_attention_rows_sum_to_one_on_music_shapes():
    """Random CKG with the sizes of music's (1,872 users, 3,846 items, 5,520 entities, 60 KG
    relations, 17,350 train interactions, 15,518 KG triples)."""
    rng = np.random.default_rng(0)
    num_users, num_items, num_entities = 1872, 3846, 5520
    train = sp.csr_matrix(
        (
            np.ones(17350, np.float32),
            (rng.integers(num_users, size=17350), rng.integers(num_items, size=17350)),
        ),
        shape=(num_users, num_items),
    )
    train.sum_duplicates()
    kg = np.stack(
        [
            rng.integers(num_items, size=15518),
            rng.integers(60, size=15518),
            rng.integers(num_items, num_items + num_entities, size=15518),
        ],
        axis=1,
    )
    ckg = make_ckg(train, kg, num_entities, 60)
    torch.manual_seed(0)
    model = KGAT(num_users, num_items, ckg)
    model.update_attention()
    sums = row_sums(model)
    heads = torch.unique(model.edge_index[0])
    torch.testing.assert_close(sums[heads], torch.ones(len(heads), dtype=torch.float64))
    assert model.attention().shape == (ckg.edge_index.size(1),)
    assert float(model.attention().std()) > 0  # not the uniform initial weights any more


def test_adjacency_backward_uses_the_transpose():
    edge_index = torch.tensor([[0, 0, 1, 2, 2, 2], [1, 2, 0, 0, 1, 0]])  # (2, 0) twice
    weights = torch.tensor([0.3, 0.7, 1.0, 0.2, 0.5, 0.3])
    adj = AttentiveAdjacency(edge_index, 3)
    adj.set_values(weights)
    dense = torch.zeros(3, 3).index_put_(tuple(edge_index), weights, accumulate=True)
    x = torch.randn(3, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 4)
    (adj(x) * g).sum().backward()
    (dense @ x_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_grouped_transr_matches_per_row_reference():
    torch.manual_seed(0)
    w = torch.randn(5, 6, 3, requires_grad=True)
    x = torch.randn(40, 6, requires_grad=True)
    rel = torch.randint(0, 5, (40,))
    out = relation_project(x, rel, w)
    ref = torch.bmm(x.unsqueeze(1), w[rel]).squeeze(1)
    torch.testing.assert_close(out, ref)
    out.pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    # loss: -ln sigma(g(h,r,t') - g(h,r,t)) with g = ||W_r e_h + e_r - W_r e_t||^2
    h, t, tn, er = (torch.randn(40, 6), torch.randn(40, 6), torch.randn(40, 6), torch.randn(40, 3))
    wd = w.detach()
    g_pos = (
        (torch.bmm(h.unsqueeze(1), wd[rel]) + er.unsqueeze(1) - torch.bmm(t.unsqueeze(1), wd[rel]))
        .squeeze(1)
        .pow(2)
        .sum(-1)
    )
    g_neg = (
        (torch.bmm(h.unsqueeze(1), wd[rel]) + er.unsqueeze(1) - torch.bmm(tn.unsqueeze(1), wd[rel]))
        .squeeze(1)
        .pow(2)
        .sum(-1)
    )
    expected = -torch.nn.functional.logsigmoid(g_neg - g_pos).mean()
    torch.testing.assert_close(transr_loss(h, t, tn, er, rel, wd), expected)


def test_tail_corruptor_respects_ranges_and_rejects_true_triples():
    triples = torch.tensor([[0, 0, 0, 1], [2, 2, 3, 2], [5, 6, 7, 5]])  # (h, r, t) columns
    low = torch.tensor([0, 0, 5, 4])
    high = torch.tensor([1, 1, 8, 8])
    corruptor = TailCorruptor(triples, 10, 4, low=low, high=high, max_rounds=100)
    h = torch.tensor([0, 0, 1] * 500)
    r = torch.tensor([2, 2, 3] * 500)
    tails = corruptor.sample(h, r, torch.Generator().manual_seed(0))
    assert bool(((tails >= low[r]) & (tails < high[r])).all())
    assert not bool(corruptor.is_true(h, r, tails).any())


def test_transr_loss_decreases_when_only_the_kg_step_runs(tiny_ckg):
    torch.manual_seed(0)
    model = KGAT(4, 5, tiny_ckg, embedding_dim=8, layer_sizes=(4,), kg_batch_size=4, kg_learning_rate=0.01)
    h, r, t = model._kg_triples.repeat(1, 20)  # fixed probe: 20 corrupted tails per triple
    t_neg = model._corruptor.sample(h, r, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.kg_loss(h, r, t, t_neg).item()
    conv_before = [p.detach().clone() for p in model.convs.parameters()]
    (hook,) = model.epoch_hooks()  # the KG step gets its own Adam, owned by the trainer
    kg_optimizer = hook_optimizer(hook)
    logs = [hook.run(kg_optimizer) for _ in range(30)]
    with torch.no_grad():
        after = model.kg_loss(h, r, t, t_neg).item()
    assert after < 0.5 * before
    assert all(set(log) == {"kg_loss", "kg_seconds", "attention_seconds"} for log in logs)
    assert all(torch.equal(a, b) for a, b in zip(conv_before, model.convs.parameters()))


@pytest.mark.parametrize("aggregator", ["bi", "gcn", "graphsage"])
def test_aggregators_forward_backward_dims(tiny_ckg, aggregator):
    conv = KGATConv(8, 5, aggregator, dropout=0.0)
    assert conv.lin1.in_features == (16 if aggregator == "graphsage" else 8)
    torch.manual_seed(0)
    model = KGAT(4, 5, tiny_ckg, embedding_dim=8, layer_sizes=(6, 3), aggregator=aggregator)
    model.update_attention()
    out = model.propagate()
    assert out.shape == (model.num_nodes, 8 + 6 + 3)
    user_emb, item_emb = model.embeddings()
    assert user_emb.shape == (4, 17) and item_emb.shape == (5, 17)
    loss = model.loss(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([4, 3]))
    loss.backward()
    assert model.node_embedding.weight.grad is not None
    for conv in model.convs:
        assert conv.lin1.weight.grad is not None and conv.lin1.weight.grad.abs().sum() > 0
        assert (conv.lin2 is not None) == (aggregator == "bi")
    assert model.relation_weight.grad is None  # the CF loss does not touch TransR's parameters


def test_saved_model_reloads_to_identical_scores(planted_data, tmp_path):
    config = _planted_config(epochs=3)
    model = build_model(config, planted_data)
    fit(model, planted_data, config)
    assert float(model.attention().std()) > 0
    torch.save(model.state_dict(), tmp_path / "kgat.pt")
    (tmp_path / "config.json").write_text(config.model_dump_json())

    loaded_config = TrainConfig.model_validate_json((tmp_path / "config.json").read_text())
    assert loaded_config == config
    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    clone = build_model(loaded_config, planted_data)
    clone.load_state_dict(torch.load(tmp_path / "kgat.pt"))
    clone.eval()
    users = torch.arange(planted_data.num_users)
    assert torch.equal(clone.attention(), model.attention())
    assert torch.equal(clone.score(users), model.score(users))


def test_pretrained_embeddings_survive_fit_reset(planted_data, planted_ckg):
    user_emb = torch.randn(planted_data.num_users, 16)
    item_emb = torch.randn(planted_data.num_items, 16)
    model = KGAT(
        planted_data.num_users,
        planted_data.num_items,
        planted_ckg,
        embedding_dim=16,
        layer_sizes=(8,),
        kg_learning_rate=1e-9,
        pretrained=(user_emb, item_emb),
    )
    with torch.no_grad():
        model.node_embedding.weight.zero_()
    fit(model, planted_data, _planted_config(epochs=1, learning_rate=1e-9))
    u, i = planted_data.num_users, planted_data.num_items
    weight = model.node_embedding.weight.detach()
    torch.testing.assert_close(weight[:u], user_emb, atol=1e-6, rtol=0)
    torch.testing.assert_close(weight[u : u + i], item_emb, atol=1e-6, rtol=0)
    assert "pretrained_user" not in model.state_dict()


def test_zoo_pretrains_from_bprmf(planted_data):
    config = _planted_config(epochs=20, params={"pretrain": "bprmf"})
    model = build_model(config, planted_data)
    assert isinstance(model, KGAT) and model.pretrained_user is not None
    model.reset_parameters()
    u = planted_data.num_users
    torch.testing.assert_close(model.node_embedding.weight.detach()[:u], model.pretrained_user)
    # they are BPR-MF's, trained with its own recommended config and the same seed
    user_emb, item_emb = pretrain_from_bprmf(planted_data, config)
    torch.testing.assert_close(model.pretrained_user, user_emb)
    torch.testing.assert_close(model.pretrained_item, item_emb)


def test_cf_and_kg_training_improves_validation_recall(planted_data, planted_ckg):
    config = _planted_config()
    params = config.model_params()
    assert isinstance(params, KGATParams)
    model = KGAT(
        planted_data.num_users,
        planted_data.num_items,
        planted_ckg,
        embedding_dim=16,
        layer_sizes=params.layer_sizes,
        kg_batch_size=params.kg_batch_size,
        kg_learning_rate=params.kg_learning_rate,
    )
    torch.manual_seed(config.seed)
    model.reset_parameters()
    before = evaluate(model, planted_data.valid, planted_data.train, ks=(10,))["recall@10"]
    result = fit(model, planted_data, config)
    after = evaluate(model, planted_data.valid, planted_data.train, ks=(10,))["recall@10"]
    assert before < 0.3 and after > 0.6
    assert all("kg_loss" in log.extra for log in result.history)
    kg_losses = [log.extra["kg_loss"] for log in result.history]
    assert kg_losses[-1] < kg_losses[0]
    # the attention learned to prefer the planted genre edges over the noise edges of items
    att, etype, head = model.attention(), model.edge_type, model.edge_index[0]
    items = (head >= planted_data.num_users) & (head < planted_data.num_users + 80)
    genre, noise = att[items & (etype == 2)].mean(), att[items & (etype == 4)].mean()
    assert torch.isfinite(genre) and torch.isfinite(noise)


def test_interaction_only_ckg_without_snapshot(tiny_data):
    ckg = interaction_ckg(tiny_data)
    assert ckg.num_entities == 0 and ckg.edge_index.size(1) == 2 * tiny_data.train.nnz
    model = KGAT(4, 5, ckg, embedding_dim=8, layer_sizes=(4,))
    (hook,) = model.epoch_hooks()
    assert hook.parameters == () and hook.run(hook_optimizer(hook)) == {}  # attention refresh only


def test_config_params_are_validated_and_flat():
    config = TrainConfig.for_model("kgat", epochs=None, seed=7)
    assert config.model == "kgat" and config.seed == 7
    assert config.epochs == TrainConfig.for_model("kgat").epochs
    # the paper's parameters with the validation-tuned overrides (message dropout 0)
    assert config.params == KGATParams(mess_dropout=0.0).model_dump()
    flat = config.to_dict()
    assert flat["params.layer_sizes"] == "64,32,16" and flat["params.aggregator"] == "bi"
    assert all(isinstance(v, int | float | str) for v in flat.values())
    merged = TrainConfig.for_model("kgat", params={"aggregator": "gcn"})
    assert merged.params["aggregator"] == "gcn"
    assert merged.params["layer_sizes"] == config.params["layer_sizes"]
    for bad in ({"aggregator": "max"}, {"unknown": 1}, {"layer_sizes": (64, 0)}):
        with pytest.raises(pydantic.ValidationError):
            TrainConfig.for_model("kgat", params=bad)
    with pytest.raises(pydantic.ValidationError):
        TrainConfig(model="bprmf", params={"aggregator": "bi"})
    assert TrainConfig.for_model("bprmf") == TrainConfig(model="bprmf", learning_rate=2e-3)  # its spec default
    assert TrainConfig.for_model("lightgcn", epochs=None) == TrainConfig(
        model="lightgcn", max_batches_per_epoch=40
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_ckg):
    torch.manual_seed(0)
    model = KGAT(4, 5, tiny_ckg, embedding_dim=8, layer_sizes=(4,), mess_dropout=0.0)
    model.update_attention()
    model.eval()
    cpu = model.score(torch.arange(4))
    model.cuda()
    model.update_attention()
    torch.testing.assert_close(model.score(torch.arange(4, device="cuda")).cpu(), cpu)
    for hook in model.epoch_hooks():
        hook.run(hook_optimizer(hook))


def _kg_steps(model: KGAT) -> int:
    optimizer = torch.optim.Adam(model.kg_parameters(), lr=1e-3)
    steps = 0

    def count(*_):
        nonlocal steps
        steps += 1

    optimizer.register_step_post_hook(count)
    model.kg_epoch(optimizer)
    return steps


def test_the_transr_pass_takes_a_bounded_number_of_steps(planted_data, planted_ckg):
    kwargs = dict(embedding_dim=8, layer_sizes=(8,), relation_dim=4, kg_batch_size=16)
    torch.manual_seed(0)
    triples = KGAT(planted_data.num_users, planted_data.num_items, planted_ckg, **kwargs)._kg_triples.size(1)
    assert triples > 3 * 16  # the bound below binds on this KG
    bounded = KGAT(planted_data.num_users, planted_data.num_items, planted_ckg, max_kg_batches_per_epoch=3, **kwargs)
    assert _kg_steps(bounded) == 3 and bounded.kg_step_batch_size(triples) == -(-triples // 3)
    loose = KGAT(planted_data.num_users, planted_data.num_items, planted_ckg, max_kg_batches_per_epoch=None, **kwargs)
    assert _kg_steps(loose) == -(-triples // 16)
    # The default bound (40 steps of at least 8,192) leaves the bundled datasets' KGs alone.
    assert KGATParams().max_kg_batches_per_epoch == 40 and KGATParams().kg_batch_size == 8192
