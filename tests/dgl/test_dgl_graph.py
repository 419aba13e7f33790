"""Data interop: kgrec's PyG ``HeteroData`` and ``CollaborativeKG`` as DGL graphs (ids, counts, edges)."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import dgl

    # Without a dgl distribution, pytest's rootdir on sys.path makes this folder `dgl` (a namespace
    # package).
    if getattr(dgl, "__file__", None) is None:
        raise ModuleNotFoundError("no dgl distribution installed")
except Exception as exc:  # not installed (the core .venv), or built for another torch
    pytest.skip(
        f"dgl is not importable here ({type(exc).__name__}: {exc}); create .venv-dgl with "
        "`make dgl-env`, then run `make test-dgl`",
        allow_module_level=True,
    )

import torch
from kgrec.features.dataset import InteractionData
from kgrec.models.backends.dgl.graph import (
    CKG_NODE_TYPES,
    ckg_to_dgl,
    dgl_ckg,
    dgl_hetero_graph,
    snapshot_to_dgl,
)
from kgrec.models.retrievers.kgat import interaction_ckg

pytestmark = pytest.mark.dgl

DATASETS = ["synthetic_data", "music_data"]


def sample(n: int, k: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(n, size=min(n, k), replace=False)


@pytest.mark.parametrize("dataset", DATASETS)
def test_heterograph_has_the_pyg_types_ids_and_edges(dataset: str, request: pytest.FixtureRequest) -> None:
    data: InteractionData = request.getfixturevalue(dataset)
    hetero = data.hetero
    graph = dgl_hetero_graph(data)
    assert isinstance(graph, dgl.DGLGraph)
    assert sorted(graph.ntypes) == sorted(hetero.node_types) == ["entity", "item", "user"]
    assert sorted(graph.canonical_etypes) == sorted(hetero.edge_types)
    for node_type in hetero.node_types:
        assert graph.num_nodes(node_type) == hetero[node_type].num_nodes
    assert (graph.num_nodes("user"), graph.num_nodes("item")) == (data.num_users, data.num_items)
    for edge_type in hetero.edge_types:
        expected = hetero[edge_type].edge_index
        src, dst = graph.edges(etype=edge_type, order="eid")
        assert graph.num_edges(edge_type) == expected.size(1)
        picked = torch.from_numpy(sample(expected.size(1)))
        # same edge ids: DGL edge k of a type is PyG edge k of that type
        assert torch.equal(src[picked], expected[0, picked]) and torch.equal(dst[picked], expected[1, picked])
    assert graph.num_edges() == sum(hetero[et].edge_index.size(1) for et in hetero.edge_types)
    assert graph.num_edges(("user", "interacts", "item")) == data.train.nnz


@pytest.mark.parametrize("dataset", DATASETS)
def test_homogeneous_ckg_matches_the_collaborative_kg(dataset: str, request: pytest.FixtureRequest) -> None:
    data: InteractionData = request.getfixturevalue(dataset)
    ckg = data.ckg
    graph = dgl_ckg(data)
    assert graph.is_homogeneous
    assert (graph.num_nodes(), graph.num_edges()) == (ckg.num_nodes, ckg.edge_index.size(1))
    assert torch.equal(graph.edata["etype"], ckg.edge_type)
    src, dst = graph.edges(order="eid")
    assert torch.equal(torch.stack([src, dst]), ckg.edge_index)
    counts = torch.bincount(graph.edata["etype"], minlength=ckg.num_relations)
    assert torch.equal(counts, torch.bincount(ckg.edge_type, minlength=ckg.num_relations))
    assert counts[0] == counts[1] == data.train.nnz
    ntype = graph.ndata["ntype"]
    assert [int((ntype == t).sum()) for t in range(len(CKG_NODE_TYPES))] == [
        ckg.num_users, ckg.num_items, ckg.num_entities,
    ]


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_two_dgl_graphs_hold_the_same_typed_edges(dataset: str, request: pytest.FixtureRequest) -> None:
    """Every heterograph edge is one CKG edge once mapped to CKG ids and relation ids."""
    data: InteractionData = request.getfixturevalue(dataset)
    hetero, ckg_graph = snapshot_to_dgl(data.snapshot, data.split)
    names = data.ckg.relation_names
    offset = {"user": 0, "item": data.num_users, "entity": data.num_users + data.num_items}
    rename = {"interacts": "interact", "rev_interacts": "rev_interact"}
    src, dst = ckg_graph.edges(order="eid")
    ckg_edges = set(zip(src.tolist(), dst.tolist(), ckg_graph.edata["etype"].tolist(), strict=True))
    mapped = set()
    for src_t, rel, dst_t in hetero.canonical_etypes:
        s, d = hetero.edges(etype=(src_t, rel, dst_t))
        r = names.index(rename.get(rel, rel))
        mapped |= set(zip((s + offset[src_t]).tolist(), (d + offset[dst_t]).tolist(), [r] * len(s), strict=True))
    assert mapped == ckg_edges


def test_ckg_to_dgl_on_a_graph_without_entities(synthetic_data: InteractionData) -> None:
    bare = InteractionData(
        num_users=synthetic_data.num_users, num_items=synthetic_data.num_items,
        train=synthetic_data.train, valid=synthetic_data.valid, test=synthetic_data.test,
    )
    graph = ckg_to_dgl(interaction_ckg(bare))
    assert graph.num_nodes() == bare.num_users + bare.num_items
    assert graph.num_edges() == 2 * bare.train.nnz and set(graph.edata["etype"].tolist()) == {0, 1}
