"""R-HGNN: its vectorised layers against a per-node loop of the docstring's equations, the
relation-level attention, gradients, learning, and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.retrievers.kgat import interaction_ckg
from kgrec.models.retrievers.rhgnn import RHGNN
from kgrec.models.spec import build_model, get_spec
from kgrec.models.training.pairwise import fit

from tests.models.ckg_helpers import make_ckg
from tests.models.test_model_rgcn_hgt import check_forward_backward, planted_graphs


def reference_propagation(model: RHGNN) -> torch.Tensor:
    """The docstring's equations with Python loops over nodes, relations and neighbours."""
    src, dst = model._ckg.edge_index[0].tolist(), model._ckg.edge_index[1].tolist()
    rel = model._ckg.edge_type.tolist()
    x = model.node_embedding.weight
    slots = sorted({(t, r) for t, r in zip(dst, rel, strict=True)})
    h = {slot: x[slot[0]] for slot in slots}
    rho = model.relation_embedding
    d, slope = model.embedding_dim, model.negative_slope
    for k in range(model.num_layers):
        w = model.weight[k]
        c = {}
        for t, r in slots:
            a = rho[r] @ model.neighbour_attention[k]
            sources = [s for s, tt, rr in zip(src, dst, rel, strict=True) if tt == t and rr == r]
            scores = torch.stack([F.leaky_relu(a[:d] @ (h[(t, r)] @ w) + a[d:] @ (h[(s, r ^ 1)] @ w), slope)
                                  for s in sources])
            alpha = torch.softmax(scores, 0)
            c[(t, r)] = h[(t, r)] + sum(alpha[j] * (h[(s, r ^ 1)] @ w) for j, s in enumerate(sources))
        new = {}
        for t, r in slots:
            mine = [rr for tt, rr in slots if tt == t]
            q = model.crossing[k][r]
            beta = torch.softmax(torch.stack([F.leaky_relu(q @ c[(t, rr)], slope) for rr in mine]), 0)
            out = sum(beta[j] * c[(t, rr)] for j, rr in enumerate(mine))
            new[(t, r)] = F.elu(out) if k < model.num_layers - 1 else out
        h = new
        rho = rho @ model.relation_weight[k]
    rows = []
    for node in range(model.num_nodes):
        mine = [r for t, r in slots if t == node]
        if not mine:
            rows.append(x[node])
            continue
        projected = [h[(node, r)] @ model.fusion for r in mine]
        gamma = torch.softmax(torch.stack([p @ (rho[r] @ model.fusion_relation) / math.sqrt(d)
                                           for p, r in zip(projected, mine, strict=True)]), 0)
        rows.append((x[node] + sum(g * p for g, p in zip(gamma, projected, strict=True))) / 2)
    return torch.stack(rows)


@pytest.fixture()
def tiny_model() -> RHGNN:
    import scipy.sparse as sp

    train = sp.csr_matrix(([1.0] * 7, ([0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 2, 3, 0, 4])), shape=(4, 5))
    # items 0-4; entities 5-7 (KG node space); two relations, item 2 with two facts of relation 0
    kg = [(0, 0, 5), (1, 0, 5), (2, 0, 6), (2, 0, 7), (3, 1, 6), (4, 1, 7)]
    ckg = make_ckg(train, kg, num_entities=3, num_kg_relations=2)
    torch.manual_seed(0)
    model = RHGNN(4, 5, ckg, embedding_dim=6, num_layers=2, dropout=0.0)
    model._ckg = ckg  # for the reference
    return model


def test_layers_match_the_per_node_equations(tiny_model):
    model = tiny_model
    with torch.no_grad():
        ours, reference = model.propagate_all(), reference_propagation(model)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # a changed weight changes the output (the comparison is not vacuous)
    with torch.no_grad():
        model.crossing[0][0] += 1.0
        assert not torch.allclose(model.propagate_all(), ours)
        torch.testing.assert_close(model.propagate_all(), reference_propagation(model), rtol=1e-5, atol=1e-6)


def test_slots_and_relation_attention(tiny_model):
    model = tiny_model
    ckg = model._ckg
    expected = {(t, r) for t, r in zip(ckg.edge_index[1].tolist(), ckg.edge_type.tolist(), strict=True)}
    assert model.num_slots == len(expected)
    per_node = torch.bincount(model.slot_node, minlength=model.num_nodes)
    assert model.pair_query.numel() == int((per_node**2).sum())
    # every CKG edge once (in the slot graph's order), its source slot the source node's slot of
    # the inverse relation and its target slot the target node's slot of the edge's relation
    ours = sorted(zip(model.slot_node[model.edge_source_slot].tolist(), model.edge_relation.tolist(),
                      model.slot_node[model.edge_slot].tolist(), strict=True))
    assert ours == sorted(zip(ckg.edge_index[0].tolist(), ckg.edge_type.tolist(), ckg.edge_index[1].tolist(),
                              strict=True))
    assert torch.equal(model.slot_relation[model.edge_source_slot], model.edge_relation ^ 1)
    assert torch.equal(model.slot_relation[model.edge_slot], model.edge_relation)
    weights = model.relation_attention(torch.tensor([4 + 2, 0, 4 + 5]))  # item 2, user 0, entity 5
    assert set(weights[0]) == {0, 3}  # item 2: interacted (relation 0) and rev of KG relation 0 (3)
    for w in weights:
        assert sum(w.values()) == pytest.approx(1.0)


def test_forward_backward_and_every_parameter_learns(planted_data):
    import numpy as np

    rng = np.random.default_rng(1)
    n = planted_data.num_items
    kg = [(i, 0, n + i // 20) for i in range(n)] + [(i, 1, n + 4 + int(rng.integers(6))) for i in range(n)]
    ckg, _ = planted_graphs(planted_data, kg, num_entities=10, num_kg_relations=2)
    model = RHGNN(planted_data.num_users, planted_data.num_items, ckg, embedding_dim=16, num_layers=2)
    check_forward_backward(model, planted_data.num_users, planted_data.num_items)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    config = TrainConfig(
        model="rhgnn", embedding_dim=16, learning_rate=0.01, batch_size=256, epochs=8,
        patience=8, reg_weight=1e-4, device="cpu", ks=(10,), selection_metric="recall@10",
    )
    torch.manual_seed(config.seed)
    model.reset_parameters()
    model.eval()
    before = evaluate(model, planted_data.valid, planted_data.train, ks=(10,))["recall@10"]
    result = fit(model, planted_data, config)
    after = evaluate(model, planted_data.valid, planted_data.train, ks=(10,))["recall@10"]
    assert result.history[-1].loss < result.history[0].loss
    assert after > before + 0.2, (before, after)


def test_registered_with_the_relational_defaults(planted_data):
    spec = get_spec("rhgnn")
    assert spec.needs_kg and spec.family == "retriever" and spec.search_space
    config = TrainConfig.for_model("rhgnn", epochs=1)
    model = build_model(config, planted_data)  # interaction-only CKG without a snapshot
    assert isinstance(model, RHGNN) and model.num_relations == 2
    with pytest.raises(ValueError, match="num_layers"):
        RHGNN(planted_data.num_users, planted_data.num_items, interaction_ckg(planted_data), num_layers=0)


def test_attention_explains_like_kgat(tiny_model, planted_data):
    model = tiny_model
    attention = model.attention()
    heads = model.edge_index[0]
    assert attention.shape == model.edge_type.shape == heads.shape
    # every receiver's weights (over all its relations and neighbours) sum to one
    totals = torch.zeros(model.num_nodes).index_add(0, heads, attention)
    receivers = torch.unique(heads)
    torch.testing.assert_close(totals[receivers], torch.ones(receivers.numel()))
    # read from the receiver: a user hears from its items through "interact" (relation 0)
    user_edges = heads < model.num_users
    assert set(model.edge_type[user_edges].tolist()) == {0}
    # and the explanation machinery finds user -> item paths through them
    from kgrec.models.explain import AttentionGraph

    graph = AttentionGraph(
        heads=heads.numpy(), tails=model.edge_index[1].numpy(), edge_type=model.edge_type.numpy(),
        attention=attention.numpy(), num_users=4, num_items=5, num_entities=3,
        relation_names=list(model._ckg.relation_names), entity_ids=["e5", "e6", "e7"],
    )
    paths = graph.explain(0, 2, max_paths=3)  # user 0 liked items 0, 1; item 1 was liked by user 1 with item 2
    assert paths and all(p.steps[0].relation == "interact" for p in paths)
