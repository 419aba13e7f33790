r"""ComiRec-SA: controllable multi-interest retrieval with self-attention."""

from __future__ import annotations

import torch
from kgrec.models.merge import MergeRule
from kgrec.models.sequential.config import (
    SEQUENTIAL_SEARCH_SPACE,
    SequentialModelConfig,
    served_as_configured,
    trained_merge_rule,
)
from kgrec.models.sequential.multi_interest import MultiInterestModel, Readout, init_normal_
from kgrec.models.spec import ModelSpec, register
from torch import Tensor


class ComiRecSA(MultiInterestModel):
    r"""ComiRec-SA from `"Controllable Multi-Interest Framework for Recommendation"
    <https://arxiv.org/abs/2005.09347>`_ (Cen et al., KDD 2020), Sec. 3.2.2.

    With :math:`H \in \mathbb{R}^{d \times L}` the history embeddings (plus optional learned
    positional embeddings, indexed by recency: 0 = most recent item),

    .. math:: A = \mathrm{softmax}\big(W_2^\top \tanh(W_1 H)\big)^\top \in \mathbb{R}^{L \times K},
              \qquad V_u = H A \in \mathbb{R}^{d \times K}

    with :math:`W_1 \in \mathbb{R}^{d_a \times d}`, :math:`W_2 \in \mathbb{R}^{d_a \times K}` and the
    softmax over the (non-padding) history positions, i.e. in row form ``A = softmax(W2 tanh(W1 H^T))``
    and ``interests = A H``. The attention width is :math:`d_a = 4d` as in the paper. Training uses
    the hard readout (or the mixture of softmaxes, ``readout="mixture"``, or the softmax of the max
    merge's score, ``readout="max"``) and sampled softmax. With
``normalize_interests`` every interest is scaled to unit length, so no interest outranks the others
by its norm alone and the temperature alone sets the softmax's sharpness.

    Args:
        num_items: item count.
        embedding_dim: ``d``.
        num_interests: ``K``.
        max_length: history items used (also the number of positional embeddings).
        attention_dim: :math:`d_a` (default ``4 d``).
        positional: add learned positional embeddings to ``H`` before the attention.
        temperature: sampled-softmax temperature.
        merge_rule: how the interests' lists are merged at retrieval (:mod:`kgrec.models.merge`).
        readout: training readout, ``"hard"``, ``"mixture"`` or ``"max"`` (:mod:`kgrec.models.sequential.multi_interest`).
        normalize_interests: L2-normalise the interest vectors.
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        num_interests: int = 4,
        max_length: int = 20,
        attention_dim: int | None = None,
        positional: bool = True,
        temperature: float = 0.1,
        merge_rule: MergeRule = "max",
        readout: Readout = "hard",
        normalize_interests: bool = False,
    ) -> None:
        super().__init__(num_items, embedding_dim, num_interests, max_length, temperature, merge_rule, readout)
        attention_dim = attention_dim or 4 * embedding_dim
        self.hparams = dict(
            num_items=num_items, embedding_dim=embedding_dim, num_interests=num_interests,
            max_length=max_length, attention_dim=attention_dim, positional=positional,
            temperature=temperature, merge_rule=merge_rule, readout=readout,
            normalize_interests=normalize_interests,
        )
        self.normalize_interests = normalize_interests
        self.attention_dim = attention_dim
        self.item_embedding = torch.nn.Embedding(num_items, embedding_dim)
        self.position_embedding = torch.nn.Embedding(max_length, embedding_dim) if positional else None
        self.w1 = torch.nn.Linear(embedding_dim, attention_dim, bias=False)
        self.w2 = torch.nn.Linear(attention_dim, num_interests, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_(self.item_embedding.weight, self.embedding_dim)
        if self.position_embedding is not None:
            torch.nn.init.normal_(self.position_embedding.weight, std=0.01)
        self.w1.reset_parameters()
        self.w2.reset_parameters()

    has_routing = True

    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        v, mask, _ = self.routing(histories, lengths)
        return v, mask

    def routing(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Interests and the attention ``A`` as the routing matrix ``[B, K, L]`` (REMI's RR)."""
        batch, width = histories.shape
        device = histories.device
        positions = torch.arange(width, device=device)[None, :]
        behaviour_mask = positions < lengths[:, None]
        h = self.item_embedding(histories)  # [B, L, d]
        keys = h
        if self.position_embedding is not None:
            recency = (lengths[:, None] - 1 - positions).clamp(min=0, max=self.max_length - 1)
            keys = h + self.position_embedding(recency)
        scores = self.w2(torch.tanh(self.w1(keys)))  # [B, L, K]
        scores = scores.masked_fill(~behaviour_mask.unsqueeze(-1), float("-inf"))
        a = torch.softmax(scores, dim=1)
        a = torch.nan_to_num(a, nan=0.0)  # an empty history attends to nothing
        v = torch.einsum("blk,bld->bkd", a, h)
        if self.normalize_interests:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v, torch.ones(batch, self.num_interests, dtype=torch.bool, device=device), a.transpose(1, 2)


def build_comirec_sa(config: SequentialModelConfig, num_items: int) -> ComiRecSA:
    model = ComiRecSA(
        num_items, embedding_dim=config.embedding_dim, max_length=config.max_length,
        num_interests=config.num_interests, temperature=config.temperature, readout=config.readout,
        normalize_interests=config.normalize_interests, merge_rule=trained_merge_rule(config),
    )
    return served_as_configured(model, config)


SPEC = register(
    ModelSpec(
        name="comirec_sa",
        family="sequential",
        build=build_comirec_sa,
        summary="ComiRec-SA: multi-head self-attention to K interests (Cen et al., KDD 2020)",
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
# Presets: the same network, trained and served another way (BENCHMARKS.md, multi-interest table).
MOS_SPEC = register(
    ModelSpec(
        name="comirec_sa_mos",
        family="sequential",
        build=build_comirec_sa,
        summary="ComiRec-SA with the mixture-of-softmaxes readout, unit interests and decorrelation, "
        "served with the mixture merge",
        defaults={"readout": "mixture", "normalize_interests": True, "decorrelation": 1.0},
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
MAX_SPEC = register(
    ModelSpec(
        name="comirec_sa_max",
        family="sequential",
        build=build_comirec_sa,
        summary="ComiRec-SA trained on the softmax of the score the max merge serves",
        defaults={"readout": "max"},
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
# REMI (Xie et al., RecSys 2023): the hard readout trained with interest-aware hard negatives and
# the routing regularisation on the attention (models/sequential/multi_interest.py). Weights chosen
# on validation R@50 with the valid interest cosine < 0.5 (ml-100k-seq, seeds 2020-2021, exact
# softmax; grid beta 0 / 0.3 / 1 / 2 / 3 x RR 0 / 300 / 1,000 / 12,800): beta = 1 lifts ComiRec-SA
# from 0.352 to 0.372; RR at the authors' scale (rlambda 100 summed over a batch of 128 = 12,800
# here) pulls the interests together (cosine 0.33 -> 0.65) for no recall, RR 300 gives 0.372 at 0.41.
REMI_SPEC = register(
    ModelSpec(
        name="comirec_sa_remi",
        family="sequential",
        build=build_comirec_sa,
        summary="ComiRec-SA + REMI: interest-aware hard negatives and routing regularisation "
        "(Xie et al., RecSys 2023)",
        defaults={"hard_negative_beta": 1.0, "routing_reg": 300.0},
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
