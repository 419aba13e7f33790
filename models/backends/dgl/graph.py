"""kgrec's graphs as DGL graphs: the PyG ``HeteroData`` and the homogeneous collaborative KG.

Both conversions keep kgrec's index spaces (ARCHITECTURE.md, "Index spaces") and edge order, so
edge ``k`` of a DGL edge type is edge ``k`` of the PyG edge type of the same name, and a node id
means the same user, item or entity on both sides:

* :func:`hetero_to_dgl` -- node types ``user`` / ``item`` / ``entity`` (local ids), one canonical
  edge type per PyG edge type (``("user", "interacts", "item")``, ``("item", "rev_interacts",
  "user")``, ``(src_type, rel, dst_type)`` and its ``rev_`` inverse per KG relation).
* :func:`ckg_to_dgl` -- one node type, CKG node ids (users ``[0, U)``, items ``[U, U+I)``,
  entities ``[U+I, U+I+E)``), ``edata["etype"]`` = ``CollaborativeKG.edge_type`` and
  ``ndata["ntype"]`` = 0 user / 1 item / 2 entity (the layout ``dgl.to_homogeneous`` produces).

Importing this module imports ``dgl``: only ``.venv-dgl`` (``make dgl-env``) can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dgl
import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.graph import CollaborativeKG

if TYPE_CHECKING:
    from kgrec.features.snapshot import Snapshot
    from kgrec.features.split import Split
    from torch_geometric.data import HeteroData

#: ``ndata["ntype"]`` of :func:`ckg_to_dgl`, in CKG node order.
CKG_NODE_TYPES: tuple[str, ...] = ("user", "item", "entity")


def hetero_to_dgl(hetero: HeteroData) -> dgl.DGLGraph:
    """A ``dgl.heterograph`` with the node types, node counts and edges (same order) of ``hetero``."""
    data_dict = {}
    for edge_type in hetero.edge_types:
        src, dst = hetero[edge_type].edge_index.to(torch.int64)
        data_dict[edge_type] = (src, dst)
    num_nodes = {node_type: int(hetero[node_type].num_nodes) for node_type in hetero.node_types}
    # int64 ids: a CKG of a large catalogue overflows DGL's int32 option.
    return dgl.heterograph(data_dict, num_nodes_dict=num_nodes, idtype=torch.int64)


def ckg_to_dgl(ckg: CollaborativeKG) -> dgl.DGLGraph:
    """The collaborative KG as one homogeneous ``DGLGraph`` (``edata["etype"]``, ``ndata["ntype"]``)."""
    src, dst = ckg.edge_index.to(torch.int64)
    graph = dgl.graph((src, dst), num_nodes=ckg.num_nodes, idtype=torch.int64)
    graph.edata["etype"] = ckg.edge_type.to(torch.int64)
    graph.ndata["ntype"] = torch.repeat_interleave(
        torch.arange(len(CKG_NODE_TYPES)),
        torch.tensor([ckg.num_users, ckg.num_items, ckg.num_entities]),
    )
    return graph


def dgl_hetero_graph(data: InteractionData) -> dgl.DGLGraph:
    """:func:`hetero_to_dgl` of ``data.hetero`` (train interactions and the KG)."""
    return hetero_to_dgl(data.hetero)


def dgl_ckg(data: InteractionData) -> dgl.DGLGraph:
    """:func:`ckg_to_dgl` of ``data.ckg`` (train interactions and the KG)."""
    return ckg_to_dgl(data.ckg)


def snapshot_to_dgl(snapshot: Snapshot, split: Split) -> tuple[dgl.DGLGraph, dgl.DGLGraph]:
    """``(heterograph, homogeneous CKG)`` of a snapshot with ``split.train`` as its interactions."""
    data = InteractionData.from_snapshot(snapshot, split)
    return dgl_hetero_graph(data), dgl_ckg(data)
