"""Pairwise ranking losses and regularisers shared by the recommenders."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Bayesian Personalised Ranking loss (Rendle et al., UAI 2009, Eq. 7 without the prior):

    .. math:: -\frac{1}{B} \sum_{(u,i,j)} \ln \sigma(\hat{x}_{ui} - \hat{x}_{uj})

    ``logsigmoid`` is the numerically stable form of ``log(sigmoid(.))``.
    """
    return -F.logsigmoid(pos_scores - neg_scores).mean()


def l2_reg(*embeddings: Tensor) -> Tensor:
    r"""Squared L2 norm of the batch's embeddings, halved and averaged over the batch:

    .. math:: \frac{1}{2B} \sum_t \lVert E_t \rVert_F^2

    This is the regulariser of the LightGCN reference code (He et al., SIGIR 2020), applied to the
    embeddings a batch touches rather than to the whole table, so its strength does not depend on
    how many users or items the dataset has.
    """
    batch_size = embeddings[0].size(0)
    total = sum(emb.pow(2).sum() for emb in embeddings)
    return 0.5 * total / max(batch_size, 1)
