"""R-GCN and HGT retrievers: shapes, gradients, decompositions, train-only graphs and learning."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.graph import REV_PREFIX, CollaborativeKG, ckg_relation_names
from kgrec.features.split import random_split
from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.retrievers.hgt import HGT, RelationGroupedHGTConv
from kgrec.models.retrievers.rgcn import RGCN
from kgrec.models.training.pairwise import fit
from torch_geometric.data import HeteroData
from torch_geometric.nn import HGTConv


def planted_graphs(data: InteractionData, kg: np.ndarray, num_entities: int, num_kg_relations: int):
    """``(CollaborativeKG, HeteroData)`` laid out as ``build_ckg`` / ``build_hetero_graph`` do,
    from ``data.train`` and ``kg`` rows ``(head, relation, tail)`` with item heads and entity tails
    (KG node space: items ``[0, I)``, entities ``[I, I + E)``)."""
    coo = sp.csr_matrix(data.train).tocoo()
    num_users, num_items = data.num_users, data.num_items
    users, items = coo.row.astype(np.int64), coo.col.astype(np.int64)
    head, rel, tail = (np.asarray(kg, dtype=np.int64).reshape(-1, 3)[:, c] for c in range(3))
    names = [f"genre.r{r}" for r in range(num_kg_relations)]  # dotted, like Satori/Freebase names
    src = np.concatenate([users, items + num_users, head + num_users, tail + num_users])
    dst = np.concatenate([items + num_users, users, tail + num_users, head + num_users])
    etype = np.concatenate([np.zeros_like(users), np.ones_like(users), 2 + 2 * rel, 3 + 2 * rel])
    ckg = CollaborativeKG(
        edge_index=torch.from_numpy(np.stack([src, dst])),
        edge_type=torch.from_numpy(etype),
        num_users=num_users,
        num_items=num_items,
        num_entities=num_entities,
        relation_names=ckg_relation_names(names),
    )
    hetero = HeteroData()
    hetero["user"].num_nodes = num_users
    hetero["item"].num_nodes = num_items
    hetero["entity"].num_nodes = num_entities
    hetero["user", "interacts", "item"].edge_index = torch.from_numpy(np.stack([users, items]))
    hetero["item", "rev_interacts", "user"].edge_index = torch.from_numpy(np.stack([items, users]))
    for r, name in enumerate(names):
        mask = rel == r
        forward = np.stack([head[mask], tail[mask] - num_items])
        hetero["item", name, "entity"].edge_index = torch.from_numpy(forward)
        hetero["entity", REV_PREFIX + name, "item"].edge_index = torch.from_numpy(forward[::-1].copy())
    return ckg, hetero


@pytest.fixture(scope="module")
def planted_graph(planted_data):
    """Planted KG on ``planted_data``: item -> its community's genre entity, plus a noise relation."""
    rng = np.random.default_rng(1)
    num_items = planted_data.num_items
    genre = [(i, 0, num_items + i // 20) for i in range(num_items)]
    noise = [(i, 1, num_items + 4 + int(rng.integers(6))) for i in range(num_items)]
    return planted_graphs(planted_data, genre + noise, num_entities=10, num_kg_relations=2)


@pytest.fixture(scope="module")
def snapshot_data() -> InteractionData:
    snap = powerlaw_snapshot(
        PowerLawConfig(
            num_users=120, num_items=60, num_interactions=1500, num_entities=40,
            num_triples=200, num_relations=3,
        )
    )
    return InteractionData.from_snapshot(snap, random_split(snap.interactions, seed=2020))


def check_forward_backward(model, num_users: int, num_items: int) -> None:
    users = torch.tensor([0, 1, num_users - 1])
    pos, neg = torch.tensor([0, 2, num_items - 1]), torch.tensor([1, 0, 3])
    model.train()
    loss = model.loss(users, pos, neg)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
        scores = model.score(torch.tensor([0, 1]))
    assert user_emb.shape == (num_users, model.output_dim)
    assert item_emb.shape == (num_items, model.output_dim)
    assert scores.shape == (2, num_items)
    torch.testing.assert_close(scores, user_emb[:2] @ item_emb.t())


@pytest.mark.parametrize(
    "decomposition", [{"num_bases": 3, "num_blocks": None}, {"num_bases": None, "num_blocks": 4}]
)
@pytest.mark.parametrize("conv_impl", ["grouped", "standard", "fast"])
@pytest.mark.parametrize("combination", ["concat", "mean"])
def test_rgcn_forward_backward(planted_data, planted_graph, decomposition, conv_impl, combination):
    ckg, _ = planted_graph
    model = RGCN(
        planted_data.num_users, planted_data.num_items, ckg, embedding_dim=16, num_layers=2,
        conv_impl=conv_impl, layer_combination=combination, **decomposition,
    )
    assert model.conv_impl == conv_impl
    expected = 16 * 3 if combination == "concat" else 16
    assert model.output_dim == expected
    check_forward_backward(model, planted_data.num_users, planted_data.num_items)
    # every relation weight of the decomposition receives a gradient through the layers
    conv = model.convs[0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_rgcn_rejects_bad_decomposition(planted_data, planted_graph):
    ckg, _ = planted_graph
    with pytest.raises(ValueError, match="not both"):
        RGCN(planted_data.num_users, planted_data.num_items, ckg, num_bases=2, num_blocks=2)
    with pytest.raises(ValueError, match="divide"):
        RGCN(planted_data.num_users, planted_data.num_items, ckg, embedding_dim=10, num_blocks=4)


@pytest.mark.parametrize("combination", ["concat", "mean", "last"])
def test_hgt_forward_backward(planted_data, planted_graph, combination):
    _, hetero = planted_graph
    model = HGT(
        planted_data.num_users, planted_data.num_items, hetero, embedding_dim=16, num_layers=2,
        heads=2, layer_combination=combination,
    )
    check_forward_backward(model, planted_data.num_users, planted_data.num_items)
    # dotted relation names are handled (escaped by HGTConv's ParameterDict)
    assert any("." in et[1] for et in model.edge_types)


def test_grouped_hgtconv_matches_pyg(planted_graph):
    _, hetero = planted_graph
    torch.manual_seed(0)
    ours = RelationGroupedHGTConv(8, 8, hetero.metadata(), heads=2)
    ref = HGTConv(8, 8, hetero.metadata(), heads=2)
    ref.load_state_dict(ours.state_dict())
    x = {t: torch.randn(hetero[t].num_nodes, 8, requires_grad=True) for t in hetero.node_types}
    a, b = ours(x, hetero.edge_index_dict), ref(x, hetero.edge_index_dict)
    for t in a:
        torch.testing.assert_close(a[t], b[t])
    ga = torch.autograd.grad(sum(v.sum() for v in a.values()), ours.k_rel.weight)[0]
    gb = torch.autograd.grad(sum(v.sum() for v in b.values()), ref.k_rel.weight)[0]
    torch.testing.assert_close(ga, gb)


def test_models_see_train_edges_only(snapshot_data):
    data = snapshot_data
    train = {tuple(p) for p in np.argwhere(data.train.toarray() > 0)}
    held_out = {tuple(p) for m in (data.valid, data.test) for p in np.argwhere(m.toarray() > 0)}
    assert held_out and not held_out & train

    rgcn = RGCN(data.num_users, data.num_items, data.ckg, embedding_dim=8, num_layers=1)
    for rel, (a, b) in ((0, (0, 1)), (1, (1, 0))):  # interact: user -> item; rev: item -> user
        edges = rgcn.edge_index[:, rgcn.edge_type == rel]
        pairs = {(int(u), int(i) - data.num_users) for u, i in zip(edges[a], edges[b], strict=True)}
        assert pairs == train and not pairs & held_out

    hgt = HGT(data.num_users, data.num_items, data.hetero, embedding_dim=8, num_layers=1, heads=2)
    ei = hgt.edge_index_dict()
    pairs = {(int(u), int(i)) for u, i in ei["user", "interacts", "item"].t()}
    rev = {(int(u), int(i)) for i, u in ei["item", "rev_interacts", "user"].t()}
    assert pairs == rev == train and not pairs & held_out
    # KG edge types are present too (entities reachable)
    assert any(et[0] == "entity" or et[2] == "entity" for et in hgt.edge_types)
    check_forward_backward(rgcn, data.num_users, data.num_items)
    check_forward_backward(hgt, data.num_users, data.num_items)


@pytest.mark.parametrize("name", ["rgcn", "hgt"])
def test_training_improves_validation_recall(planted_data, planted_graph, name):
    ckg, hetero = planted_graph
    data = planted_data
    if name == "rgcn":
        model = RGCN(data.num_users, data.num_items, ckg, embedding_dim=16, num_layers=2, num_blocks=4)
    else:
        model = HGT(data.num_users, data.num_items, hetero, embedding_dim=16, num_layers=1, heads=2)
    config = TrainConfig(
        model="lightgcn", embedding_dim=16, learning_rate=0.01, batch_size=256, epochs=8,
        patience=8, reg_weight=1e-4, device="cpu", ks=(10,), selection_metric="recall@10",
    )
    torch.manual_seed(config.seed)
    model.reset_parameters()
    model.eval()
    before = evaluate(model, data.valid, data.train, ks=(10,))["recall@10"]
    result = fit(model, data, config)
    after = evaluate(model, data.valid, data.train, ks=(10,))["recall@10"]
    assert result.history[-1].loss < result.history[0].loss
    assert after == pytest.approx(result.best_valid["recall@10"])
    assert after > before + 0.2, (before, after)


def test_zoo_builds_rgcn_and_hgt(snapshot_data):
    import pydantic
    from kgrec.models.spec import build_model, model_names

    assert {"rgcn", "hgt"} <= set(model_names("retriever"))
    config = TrainConfig.for_model("rgcn", embedding_dim=8, params={"num_blocks": None, "num_bases": 2})
    model = build_model(config, snapshot_data)
    assert isinstance(model, RGCN) and model.num_bases == 2 and model.conv_impl == "grouped"
    assert model.num_layers == config.num_layers and model.reg_weight == config.reg_weight
    model = build_model(TrainConfig.for_model("hgt", embedding_dim=8, params={"heads": 4}), snapshot_data)
    assert isinstance(model, HGT) and model.heads == 4
    with pytest.raises(pydantic.ValidationError):
        TrainConfig.for_model("rgcn", params={"num_bases": 2})  # blocks default is 8: both set
    with pytest.raises(pydantic.ValidationError):
        TrainConfig.for_model("hgt", params={"unknown": 1})


def test_hgt_without_snapshot_uses_interaction_graph(tiny_data):
    from kgrec.models.retrievers.hgt import interaction_hetero

    graph = interaction_hetero(tiny_data)
    assert graph.node_types == ["user", "item"]
    assert graph["user", "interacts", "item"].edge_index.size(1) == tiny_data.train.nnz
    model = HGT(tiny_data.num_users, tiny_data.num_items, graph, embedding_dim=8, heads=2)
    check_forward_backward(model, tiny_data.num_users, tiny_data.num_items)
