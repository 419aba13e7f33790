"""LightGCN: linear neighbourhood propagation over the user-item graph."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.models.base import Recommender
from kgrec.models.config import BPR_SEARCH_SPACE
from kgrec.models.spec import ModelSpec, register
from kgrec.models.training.losses import bpr_loss, l2_reg
from optuna.distributions import IntDistribution
from torch import Tensor

if TYPE_CHECKING:
    from kgrec.features.dataset import InteractionData
    from kgrec.models.config import TrainConfig


class _SymmetricSpMM(torch.autograd.Function):
    """``adj @ x`` for a *symmetric* sparse ``adj``: the gradient is ``adj @ grad`` again.

    Autograd's generic CSR backward transposes the matrix on every call (~25x slower than the
    forward on CPU); symmetry lets the backward reuse the same CSR matrix.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(adj)
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        (adj,) = ctx.saved_tensors
        return None, torch.sparse.mm(adj, grad)


def normalized_adjacency(train: sp.spmatrix, num_users: int, num_items: int) -> Tensor:
    r"""Symmetric-normalised bipartite adjacency :math:`D^{-1/2} A D^{-1/2}` of the training
    interactions over ``U + I`` nodes (users first, then items), as a torch sparse CSR tensor.

    Isolated nodes get degree 1 instead of 0 (their row is empty anyway) to avoid dividing by zero.
    """
    r = sp.csr_matrix(train, dtype=np.float32)
    r.data[:] = 1.0
    adj = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    adj.sum_duplicates()
    deg = np.asarray(adj.sum(axis=1)).ravel()
    d_inv_sqrt = 1.0 / np.sqrt(np.maximum(deg, 1.0))
    adj = sp.csr_matrix(sp.diags(d_inv_sqrt) @ adj @ sp.diags(d_inv_sqrt), dtype=np.float32)
    adj.sort_indices()
    n = num_users + num_items
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(adj.indptr.astype(np.int64)),
            torch.from_numpy(adj.indices.astype(np.int64)),
            torch.from_numpy(adj.data),
            size=(n, n),
        )


class LightGCN(Recommender):
    r"""LightGCN from `"LightGCN: Simplifying and Powering Graph Convolution Network for
    Recommendation" <https://arxiv.org/abs/2002.02126>`_ (He et al., SIGIR 2020).

    Light graph convolution (Eq. 3), in matrix form (Eq. 7) over the user-item graph :math:`A`,

    .. math:: \mathbf{E}^{(k+1)} = D^{-1/2} A D^{-1/2} \mathbf{E}^{(k)},

    and layer combination (Eq. 4) with :math:`\alpha_k = 1 / (K + 1)`,

    .. math:: \mathbf{E} = \frac{1}{K+1} \sum_{k=0}^{K} \mathbf{E}^{(k)};

    the score is :math:`\hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i` (Eq. 5), trained with BPR and L2
    on the ego embeddings :math:`\mathbf{E}^{(0)}` of the batch (Eq. 15).

    The normalised adjacency is precomputed once as a torch sparse CSR tensor, so each layer is one
    sparse-dense matmul -- what :class:`torch_geometric.nn.LGConv` with ``normalize=False``
    computes, with a backward that exploits the symmetry of the adjacency (see
    :class:`_SymmetricSpMM`).

    Args:
        num_users: number of users :math:`U`.
        num_items: number of items :math:`I`.
        train: users × items matrix of the *training* interactions (the graph; never valid/test).
        embedding_dim: embedding dimension :math:`d`.
        num_layers: number of propagation layers :math:`K`.
        reg_weight: L2 weight :math:`\lambda` on the batch's ego embeddings.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        train: sp.spmatrix,
        embedding_dim: int = 64,
        num_layers: int = 2,
        reg_weight: float = 1e-4,
    ) -> None:
        super().__init__(num_users, num_items)
        if train.shape != (num_users, num_items):
            raise ValueError(f"train has shape {train.shape}, expected {(num_users, num_items)}")
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.reg_weight = reg_weight
        self.user_embedding = torch.nn.Embedding(num_users, embedding_dim)
        self.item_embedding = torch.nn.Embedding(num_items, embedding_dim)
        # Derived from the data, not learned: not persistent, so state dicts hold parameters only.
        self.register_buffer(
            "adj_t", normalized_adjacency(train, num_users, num_items), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_normal_(self.user_embedding.weight)
        torch.nn.init.xavier_normal_(self.item_embedding.weight)

    def propagate_all(self) -> Tensor:
        """Layer-combined embeddings ``[U + I, d]`` (Eq. 4)."""
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)
        out = x
        for _ in range(self.num_layers):
            x = _SymmetricSpMM.apply(self.adj_t, x)
            out = out + x
        return out / (self.num_layers + 1)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        out = self.propagate_all()
        return out[: self.num_users], out[self.num_users :]

    def loss(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        user_emb, item_emb = self.embeddings()
        u, p, n = user_emb[users], item_emb[pos_items], item_emb[neg_items]
        bpr = bpr_loss((u * p).sum(-1), (u * n).sum(-1))
        reg = l2_reg(
            self.user_embedding(users), self.item_embedding(pos_items), self.item_embedding(neg_items)
        )
        return bpr + self.reg_weight * reg

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.num_layers}"
        )


def build_lightgcn(config: TrainConfig, data: InteractionData) -> LightGCN:
    return LightGCN(
        data.num_users,
        data.num_items,
        data.train,
        embedding_dim=config.embedding_dim,
        num_layers=config.num_layers,
        reg_weight=config.reg_weight,
    )


SPEC = register(
    ModelSpec(
        name="lightgcn",
        family="retriever",
        build=build_lightgcn,
        summary="LightGCN: linear propagation over the user-item graph (He et al., SIGIR 2020)",
        # Every batch propagates the whole graph: 40 batches (ml-100k's epoch at 2048) per epoch at
        # most, the batch growing beyond, so an epoch costs time linear in the interactions.
        defaults={"max_batches_per_epoch": 40},
        search_space={**BPR_SEARCH_SPACE, "num_layers": IntDistribution(1, 4)},
    )
)
