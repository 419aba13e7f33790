"""One KGAT propagation layer: attentive neighbourhood aggregation with three aggregators."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Aggregator = Literal["bi", "gcn", "graphsage"]
AGGREGATORS: tuple[str, ...] = ("bi", "gcn", "graphsage")


def _csr(crow: Tensor, col: Tensor, values: Tensor, n: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(n, n))


class AttentiveAdjacency(torch.nn.Module):
    r"""The attention-weighted CKG adjacency :math:`A_{ht} = \sum_{r} \pi(h, r, t)` as a pair of
    torch sparse CSR matrices, :math:`A` and :math:`A^\top`, for the ego-network sum
    :math:`\mathbf{e}_{\mathcal{N}_h} = \sum_{(h,r,t)} \pi(h,r,t)\, \mathbf{e}_t = (A \mathbf{E})_h`
    (KGAT Eq. 3).

    The sparsity pattern is fixed by the graph and precomputed once: edges are merged into unique
    ``(h, t)`` pairs (a pair linked by several relations sums its weights), sorted row-major for
    :math:`A` and column-major for :math:`A^\top`, with the permutation between the two value
    arrays. :meth:`set_values` then sets both matrices from edge weights ``[E]`` with one
    ``index_add`` and one gather (the CSR tensors are built lazily on the buffers' device). Attention is not symmetric, so the backward of ``A @ X`` needs
    :math:`A^\top` (see :func:`attentive_spmm`); building it here once per attention update avoids
    the transpose autograd's generic CSR backward performs on every call.

    Args:
        edge_index: ``[2, E]`` (head, tail) node ids.
        num_nodes: number of nodes ``N``.
    """

    def __init__(self, edge_index: Tensor, num_nodes: int) -> None:
        super().__init__()
        self.num_nodes = int(num_nodes)
        head, tail = edge_index.to(torch.int64).cpu()
        pair_key = head * num_nodes + tail
        unique_keys, pair_id = torch.unique(pair_key, sorted=True, return_inverse=True)
        rows, cols = unique_keys // num_nodes, unique_keys % num_nodes
        crow = torch.zeros(num_nodes + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=num_nodes), 0)
        t_order = torch.argsort(cols * num_nodes + rows)  # column-major order of the pairs
        crow_t = torch.zeros(num_nodes + 1, dtype=torch.int64)
        crow_t[1:] = torch.cumsum(torch.bincount(cols, minlength=num_nodes), 0)
        # Structure buffers are derived from the graph: moved by .to(), not saved.
        self.register_buffer("pair_id", pair_id, persistent=False)
        self.register_buffer("crow", crow, persistent=False)
        self.register_buffer("col", cols.contiguous(), persistent=False)
        self.register_buffer("t_order", t_order, persistent=False)
        self.register_buffer("crow_t", crow_t, persistent=False)
        self.register_buffer("col_t", rows[t_order].contiguous(), persistent=False)
        self.num_pairs = int(unique_keys.numel())
        self.register_buffer("values", torch.zeros(self.num_pairs), persistent=False)
        self._cache: tuple[Tensor, Tensor] | None = None

    def set_values(self, edge_weight: Tensor) -> None:
        """Set :math:`A`'s entries from the edge weights ``[E]`` (no gradient flows to them)."""
        values = torch.zeros(self.num_pairs, dtype=edge_weight.dtype, device=edge_weight.device)
        values.index_add_(0, self.pair_id.to(edge_weight.device), edge_weight.detach())
        self.values = values
        self._cache = None

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(A, A^T)`` as sparse CSR tensors on the buffers' device (rebuilt after a move)."""
        if self._cache is None or self._cache[0].device != self.values.device:
            self._cache = (
                _csr(self.crow, self.col, self.values, self.num_nodes),
                _csr(self.crow_t, self.col_t, self.values[self.t_order], self.num_nodes),
            )
        return self._cache

    def forward(self, x: Tensor) -> Tensor:
        """``A @ x`` with the fast backward ``A^T @ grad``."""
        return attentive_spmm(*self.matrices(), x)

    def extra_repr(self) -> str:
        return f"num_nodes={self.num_nodes}, num_pairs={self.num_pairs}"


class _SpMMWithTranspose(torch.autograd.Function):
    """``adj @ x`` whose backward is ``adj_t @ grad`` with a precomputed transpose ``adj_t``."""

    @staticmethod
    def forward(ctx, adj: Tensor, adj_t: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(adj_t)
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        (adj_t,) = ctx.saved_tensors
        return None, None, torch.sparse.mm(adj_t, grad.contiguous())


def attentive_spmm(adj: Tensor, adj_t: Tensor, x: Tensor) -> Tensor:
    """``adj @ x`` for a sparse CSR ``adj`` that gets no gradient, with ``adj_t`` = its transpose."""
    return _SpMMWithTranspose.apply(adj, adj_t, x)


class KGATConv(torch.nn.Module):
    r"""Knowledge-aware attentive embedding propagation layer of KGAT (Wang et al., KDD 2019, §3.2).

    Information propagation (Eq. 3) -- the attention-weighted sum over each head's outgoing CKG
    edges, :math:`\mathbf{e}_{\mathcal{N}_h} = \sum_{(h,r,t) \in \mathcal{N}_h} \pi(h,r,t)\,\mathbf{e}_t`,
    one sparse matmul with :class:`AttentiveAdjacency` -- followed by one of the aggregators:

    * ``"bi"`` (bi-interaction, Eq. 8, the paper's default):
      :math:`\mathrm{LeakyReLU}(\mathbf{W}_1(\mathbf{e}_h + \mathbf{e}_{\mathcal{N}_h}))
      + \mathrm{LeakyReLU}(\mathbf{W}_2(\mathbf{e}_h \odot \mathbf{e}_{\mathcal{N}_h}))`
    * ``"gcn"`` (Eq. 6): :math:`\mathrm{LeakyReLU}(\mathbf{W}(\mathbf{e}_h + \mathbf{e}_{\mathcal{N}_h}))`
    * ``"graphsage"`` (Eq. 7): :math:`\mathrm{LeakyReLU}(\mathbf{W}(\mathbf{e}_h \,\|\, \mathbf{e}_{\mathcal{N}_h}))`

    then message dropout on the output (§3.4.2). :math:`\mathbf{W}` are dense layers with a bias,
    as in the authors' code; the LeakyReLU slope 0.2 is theirs (TensorFlow's default).
    L2 normalisation for the layer combination is left to the model.

    Args:
        in_channels: input dimension :math:`d_{l-1}`.
        out_channels: output dimension :math:`d_l`.
        aggregator: ``"bi"``, ``"gcn"`` or ``"graphsage"``.
        dropout: message dropout probability.
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        aggregator: Aggregator = "bi",
        dropout: float = 0.1,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; known: {AGGREGATORS}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.aggregator = aggregator
        self.dropout = dropout
        self.negative_slope = negative_slope
        fan_in = 2 * in_channels if aggregator == "graphsage" else in_channels
        self.lin1 = torch.nn.Linear(fan_in, out_channels)
        self.lin2 = torch.nn.Linear(in_channels, out_channels) if aggregator == "bi" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin1, self.lin2):
            if lin is not None:
                torch.nn.init.xavier_uniform_(lin.weight)
                torch.nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, adj: AttentiveAdjacency, rows: Tensor | None = None) -> Tensor:
        """``x [N, in_channels]`` -> ``[N, out_channels]``, or ``[len(rows), out_channels]`` for
        the given head nodes only (what the last layer of a mini-batch needs)."""
        neigh = adj(x)
        if rows is not None:
            x, neigh = x[rows], neigh[rows]
        slope = self.negative_slope
        if self.aggregator == "bi":
            assert self.lin2 is not None
            out = F.leaky_relu(self.lin1(x + neigh), slope) + F.leaky_relu(self.lin2(x * neigh), slope)
        elif self.aggregator == "gcn":
            out = F.leaky_relu(self.lin1(x + neigh), slope)
        else:
            out = F.leaky_relu(self.lin1(torch.cat([x, neigh], dim=-1)), slope)
        return F.dropout(out, self.dropout, self.training)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, aggregator={self.aggregator!r}, dropout={self.dropout}"
        )
