"""Grouped relational layers against PyG's own: same parameters -> same outputs and gradients.

The graphs have a relation (edge type) without edges, a node without in-edges, multi-edges and
targets with several in-edges of one relation (so mean and sum aggregation differ)."""

from __future__ import annotations

import pytest
import torch
from kgrec.features.graph import CollaborativeKG, ckg_relation_names
from kgrec.models.layers.grouped_hgt_conv import GroupedHGTConv
from kgrec.models.layers.grouped_rgcn_conv import GroupedRGCNConv
from kgrec.models.layers.relational_adjacency import RelationalAdjacency
from kgrec.models.retrievers.hgt import HGT
from kgrec.models.retrievers.rgcn import RGCN
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.nn import HGTConv, RGCNConv

NUM_NODES, NUM_RELATIONS = 24, 5
EMPTY_RELATION, ISOLATED_NODE = NUM_RELATIONS - 1, NUM_NODES - 1


def relational_graph(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, NUM_NODES - 1, (2, 90), generator=g)  # ISOLATED_NODE: no edges
    edge_type = torch.randint(0, NUM_RELATIONS - 1, (90,), generator=g)  # EMPTY_RELATION: none
    # a multi-edge, and several in-edges of one relation into node 0
    edge_index = torch.cat([edge_index, torch.tensor([[3, 3, 5, 7], [0, 0, 0, 0]])], 1)
    edge_type = torch.cat([edge_type, torch.tensor([1, 1, 1, 1])])
    return edge_index, edge_type


def grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def assert_same_gradients(reference: torch.nn.Module, ours: torch.nn.Module) -> None:
    theirs = dict(reference.named_parameters())
    mine = dict(ours.named_parameters())
    assert theirs.keys() == mine.keys()
    for name, p in theirs.items():
        torch.testing.assert_close(grad_or_zeros(mine[name]), grad_or_zeros(p), msg=name)


DECOMPOSITIONS = [{"num_bases": 3}, {"num_blocks": 4}, {}]


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS, ids=["bases", "blocks", "full"])
@pytest.mark.parametrize("aggr", ["mean", "add"])
@pytest.mark.parametrize("root_weight", [True, False])
def test_grouped_rgcn_matches_pyg_rgcn(decomposition, aggr, root_weight):
    torch.manual_seed(0)
    edge_index, edge_type = relational_graph()
    reference = RGCNConv(16, 8, NUM_RELATIONS, aggr=aggr, root_weight=root_weight, **decomposition)
    ours = GroupedRGCNConv(16, 8, NUM_RELATIONS, aggr=aggr, root_weight=root_weight, **decomposition)
    with torch.no_grad():  # a non-zero bias, so that it is checked too
        reference.bias.uniform_(-1, 1)
    ours.load_state_dict(reference.state_dict())
    x_ref = torch.randn(NUM_NODES, 16, requires_grad=True)
    x_ours = x_ref.detach().clone().requires_grad_()
    adjacency = RelationalAdjacency(
        edge_index, edge_type, NUM_NODES, NUM_RELATIONS, aggr="mean" if aggr == "mean" else "sum"
    )

    out_ref = reference(x_ref, edge_index, edge_type)
    out_ours = ours(x_ours, adjacency)
    torch.testing.assert_close(out_ours, out_ref)
    torch.testing.assert_close(ours(x_ours, edge_index, edge_type), out_ref)  # grouped per call
    upstream = torch.randn_like(out_ref)
    out_ref.backward(upstream)
    out_ours.backward(upstream)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    assert_same_gradients(reference, ours)

    # the node without in-edges gets only its root term and the bias
    expected = ours.bias + (x_ours[ISOLATED_NODE] @ ours.root if root_weight else 0.0)
    torch.testing.assert_close(out_ours[ISOLATED_NODE], expected)
    if "num_bases" not in decomposition:  # the empty relation's own weight gets no gradient
        assert grad_or_zeros(ours.weight)[EMPTY_RELATION].abs().sum() == 0
        assert grad_or_zeros(ours.weight)[1].abs().sum() > 0


def test_grouped_rgcn_check_can_fail():
    """The comparison above discriminates: a sum aggregation differs from PyG's mean here."""
    torch.manual_seed(0)
    edge_index, edge_type = relational_graph()
    reference = RGCNConv(16, 8, NUM_RELATIONS, num_blocks=4, aggr="mean")
    ours = GroupedRGCNConv(16, 8, NUM_RELATIONS, num_blocks=4, aggr="add")
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(NUM_NODES, 16)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours(x, edge_index, edge_type), reference(x, edge_index, edge_type))


def test_grouped_rgcn_rejects_mismatched_adjacency():
    edge_index, edge_type = relational_graph()
    conv = GroupedRGCNConv(16, 8, NUM_RELATIONS)
    summed = RelationalAdjacency(edge_index, edge_type, NUM_NODES, NUM_RELATIONS, aggr="sum")
    with pytest.raises(ValueError, match="aggr"):
        conv(torch.randn(NUM_NODES, 16), summed)
    with pytest.raises(ValueError, match="edge_type"):
        RelationalAdjacency(edge_index, torch.full_like(edge_type, NUM_RELATIONS), NUM_NODES, NUM_RELATIONS)


NODE_COUNTS = {"user": 6, "item": 9, "entity": 8, "tag": 4}
EDGE_TYPES = [
    ("user", "interacts", "item"),
    ("item", "rev_interacts", "user"),
    ("item", "film.genre", "entity"),  # a dotted relation name, as in Freebase
    ("entity", "rev_film.genre", "item"),
    ("item", "never", "entity"),  # no edges
    ("item", "sequel", "item"),
    ("tag", "tags", "item"),  # "tag" is never a target: no output for it
]


def hetero_graph(seed: int = 0) -> dict[tuple[str, str, str], Tensor]:
    g = torch.Generator().manual_seed(seed)
    edges = {}
    for edge_type in EDGE_TYPES:
        src, rel, dst = edge_type
        count = 0 if rel == "never" else 14
        # the last node of every target type receives no edge
        edges[edge_type] = torch.stack([
            torch.randint(0, NODE_COUNTS[src], (count,), generator=g),
            torch.randint(0, NODE_COUNTS[dst] - 1, (count,), generator=g),
        ])
    multi = torch.tensor([[2, 2, 4], [0, 0, 0]])  # a multi-edge and a shared target
    edges[("user", "interacts", "item")] = torch.cat([edges[("user", "interacts", "item")], multi], 1)
    return edges


@pytest.mark.parametrize("heads", [1, 2])
def test_grouped_hgt_matches_pyg_hgt(heads):
    torch.manual_seed(0)
    edges = hetero_graph()
    metadata = (list(NODE_COUNTS), EDGE_TYPES)
    reference = HGTConv(8, 8, metadata, heads=heads)
    ours = GroupedHGTConv(8, 8, metadata, heads=heads)
    with torch.no_grad():  # away from their initial ones, so that the prior and gate matter
        for p in reference.p_rel.values():
            p.uniform_(0.5, 2.0)
        for p in reference.skip.values():
            p.uniform_(-1.0, 1.0)
    ours.load_state_dict(reference.state_dict())
    x_ref = {t: torch.randn(n, 8, requires_grad=True) for t, n in NODE_COUNTS.items()}
    x_ours = {t: x.detach().clone().requires_grad_() for t, x in x_ref.items()}
    adjacency = RelationalAdjacency.from_hetero(edges, NODE_COUNTS, EDGE_TYPES)

    out_ref = reference(x_ref, edges)
    out_ours = ours(x_ours, adjacency)
    assert out_ours.keys() == out_ref.keys() == {"user", "item", "entity"}
    for node_type, out in out_ref.items():
        torch.testing.assert_close(out_ours[node_type], out, msg=node_type)
    for node_type, out in ours(x_ours, edges).items():  # grouped per call
        torch.testing.assert_close(out, out_ref[node_type])
    weights = {t: torch.randn_like(out) for t, out in out_ref.items()}
    sum((out_ref[t] * w).sum() for t, w in weights.items()).backward()
    sum((out_ours[t] * w).sum() for t, w in weights.items()).backward()
    for node_type, x in x_ref.items():
        torch.testing.assert_close(x_ours[node_type].grad, x.grad, msg=node_type)
    assert_same_gradients(reference, ours)
    assert x_ours["tag"].grad.abs().sum() > 0  # a source-only type still gets gradients
    prior = ours.p_rel["__".join(("item", "never", "entity"))]
    assert grad_or_zeros(prior).abs().sum() == 0


def test_grouped_hgt_check_can_fail():
    """The comparison above discriminates: a changed relation prior changes the output."""
    torch.manual_seed(0)
    edges = hetero_graph()
    metadata = (list(NODE_COUNTS), EDGE_TYPES)
    reference = HGTConv(8, 8, metadata, heads=2)
    ours = GroupedHGTConv(8, 8, metadata, heads=2)
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():
        ours.p_rel["__".join(("user", "interacts", "item"))].fill_(3.0)
    x = {t: torch.randn(n, 8) for t, n in NODE_COUNTS.items()}
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours(x, edges)["item"], reference(x, edges)["item"])


def test_sparse_kernels_gradcheck():
    """The hand-written backward passes of the CSR kernels, against finite differences."""
    edge_index, edge_type = relational_graph()
    adjacency = RelationalAdjacency(edge_index, edge_type, NUM_NODES, NUM_RELATIONS, aggr="mean")
    heads, dim, pairs, edges = 2, 3, adjacency.num_pairs, adjacency.num_edges
    options = {"dtype": torch.float64, "requires_grad": True}
    left, right = torch.randn(NUM_NODES, heads, dim, **options), torch.randn(pairs, heads, dim, **options)
    weight, messages = torch.randn(edges, heads, **options), torch.randn(pairs, heads, dim, **options)
    assert torch.autograd.gradcheck(lambda a, b: adjacency.edge_dot(a, b), (left, right))
    assert torch.autograd.gradcheck(lambda w, m: adjacency.weighted_aggregate(w, m), (weight, messages))
    assert torch.autograd.gradcheck(adjacency.aggregate, (torch.randn(pairs, 4, **options),))
    # against the per-edge definitions
    src = adjacency.pair_source[adjacency.edge_pair]
    assert torch.equal(torch.sort(src * NUM_NODES + adjacency.edge_target).values,
                       torch.sort(edge_index[0] * NUM_NODES + edge_index[1]).values)
    per_edge = (left[adjacency.edge_target] * right[adjacency.edge_pair]).sum(-1)
    torch.testing.assert_close(adjacency.edge_dot(left, right), per_edge)
    summed = torch.zeros(NUM_NODES, heads, dim, dtype=torch.float64).index_add_(
        0, adjacency.edge_target, weight.unsqueeze(-1) * messages[adjacency.edge_pair]
    )
    torch.testing.assert_close(adjacency.weighted_aggregate(weight, messages), summed)


def test_adjacency_without_edges():
    empty = torch.zeros(2, 0, dtype=torch.int64)
    adjacency = RelationalAdjacency(empty, torch.zeros(0, dtype=torch.int64), 5, 3)
    assert adjacency.num_pairs == 0 and adjacency.relation_sizes == (0, 0, 0)
    conv = GroupedRGCNConv(4, 4, 3, num_blocks=2)
    x = torch.randn(5, 4, requires_grad=True)
    out = conv(x, adjacency)
    torch.testing.assert_close(out, x @ conv.root + conv.bias)
    out.sum().backward()
    assert x.grad is not None


def ckg_and_hetero() -> tuple[CollaborativeKG, HeteroData]:
    edges = hetero_graph()
    num_users, num_items = NODE_COUNTS["user"], NODE_COUNTS["item"]
    hetero = HeteroData()
    for node_type, count in NODE_COUNTS.items():
        hetero[node_type].num_nodes = count
    for edge_type, edge_index in edges.items():
        hetero[edge_type].edge_index = edge_index
    edge_index, edge_type = relational_graph()
    ckg = CollaborativeKG(
        edge_index=edge_index % (num_users + num_items + 4),
        edge_type=edge_type,
        num_users=num_users,
        num_items=num_items,
        num_entities=4,
        relation_names=ckg_relation_names(["r0", "r1"]),  # 6 relations: 4 and 5 empty
    )
    return ckg, hetero


@pytest.mark.parametrize("decomposition", [{"num_bases": 2, "num_blocks": None}, {"num_blocks": 4}])
def test_rgcn_model_grouped_equals_standard(decomposition):
    ckg, _ = ckg_and_hetero()
    models = {
        impl: RGCN(NODE_COUNTS["user"], NODE_COUNTS["item"], ckg, embedding_dim=8, num_layers=2,
                   dropout=0.0, conv_impl=impl, **decomposition)
        for impl in ("auto", "standard")
    }
    grouped, standard = models["auto"], models["standard"]
    assert grouped.conv_impl == "grouped" and isinstance(grouped.convs[0], GroupedRGCNConv)
    assert grouped.state_dict().keys() == standard.state_dict().keys()  # checkpoints load both ways
    grouped.load_state_dict(standard.state_dict())
    users, pos, neg = torch.tensor([0, 1, 5]), torch.tensor([0, 2, 8]), torch.tensor([1, 0, 3])
    for model in (grouped, standard):
        model.loss(users, pos, neg).backward()
    for a, b in zip(grouped.embeddings(), standard.embeddings()):
        torch.testing.assert_close(a, b)
    assert_same_gradients(standard, grouped)


def test_hgt_model_grouped_equals_standard():
    _, hetero = ckg_and_hetero()
    models = {
        impl: HGT(NODE_COUNTS["user"], NODE_COUNTS["item"], hetero, embedding_dim=8, num_layers=2,
                  heads=2, dropout=0.0, conv_impl=impl)
        for impl in ("auto", "einsum", "standard")
    }
    grouped = models["auto"]
    assert grouped.conv_impl == "grouped" and isinstance(grouped.convs[0], GroupedHGTConv)
    users, pos, neg = torch.tensor([0, 1, 5]), torch.tensor([0, 2, 8]), torch.tensor([1, 0, 3])
    for impl in ("einsum", "standard"):
        other = models[impl]
        assert grouped.state_dict().keys() == other.state_dict().keys()
        grouped.load_state_dict(other.state_dict())
        grouped.zero_grad()
        other.zero_grad()
        grouped.loss(users, pos, neg).backward()
        other.loss(users, pos, neg).backward()
        for a, b in zip(grouped.embeddings(), other.embeddings()):
            torch.testing.assert_close(a, b)
        assert_same_gradients(other, grouped)
