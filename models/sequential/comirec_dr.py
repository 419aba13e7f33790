r"""ComiRec-DR: controllable multi-interest retrieval with capsule dynamic routing."""

from __future__ import annotations

import torch
from kgrec.models.merge import MergeRule
from kgrec.models.sequential.config import (
    SEQUENTIAL_SEARCH_SPACE,
    SequentialModelConfig,
    served_as_configured,
    trained_merge_rule,
    unnormalised_interests,
)
from kgrec.models.sequential.multi_interest import (
    MultiInterestModel,
    Readout,
    capsule_routing,
    init_normal_,
    item_shares,
)
from kgrec.models.spec import ModelSpec, register
from torch import Tensor


class ComiRecDR(MultiInterestModel):
    r"""ComiRec-DR from `"Controllable Multi-Interest Framework for Recommendation"
    <https://arxiv.org/abs/2005.09347>`_ (Cen et al., KDD 2020), Sec. 3.2.1.

    Capsule dynamic routing with a SEPARATE bilinear map per interest,
    :math:`\hat e_{j|i} = W_j e_i` (:math:`W_j \in \mathbb{R}^{d \times d}`), routing logits
    initialised to zero (the per-interest maps break the symmetry; not learned),
    :math:`c_{ij} = \mathrm{softmax}_j(b_{ij})`, :math:`s_j = \sum_i c_{ij} \hat e_{j|i}`,
    :math:`v_j = \mathrm{squash}(s_j)`, :math:`b_{ij} \mathrel{+}= v_j^\top \hat e_{j|i}`, for
    ``routing_iterations`` (3) rounds. Every user has all ``K`` interests. Training uses the hard
    readout :math:`v = V_u[:, \arg\max(V_u^\top e_t)]` and sampled softmax (Eq. 6-7).

    Args:
        num_items: item count.
        embedding_dim: ``d``.
        num_interests: ``K``.
        max_length: history items used.
        routing_iterations: routing rounds.
        temperature: sampled-softmax temperature.
        merge_rule: how the interests' lists are merged at retrieval (:mod:`kgrec.models.merge`).
        readout: training readout, ``"hard"``, ``"mixture"`` or ``"max"`` (:mod:`kgrec.models.sequential.multi_interest`).
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        num_interests: int = 4,
        max_length: int = 20,
        routing_iterations: int = 3,
        temperature: float = 0.1,
        merge_rule: MergeRule = "max",
        readout: Readout = "hard",
    ) -> None:
        super().__init__(num_items, embedding_dim, num_interests, max_length, temperature, merge_rule, readout)
        self.hparams = dict(
            num_items=num_items, embedding_dim=embedding_dim, num_interests=num_interests,
            max_length=max_length, routing_iterations=routing_iterations, temperature=temperature, merge_rule=merge_rule,
            readout=readout,
        )
        self.routing_iterations = routing_iterations
        self.item_embedding = torch.nn.Embedding(num_items, embedding_dim)
        self.maps = torch.nn.Parameter(torch.empty(num_interests, embedding_dim, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_(self.item_embedding.weight, self.embedding_dim)
        torch.nn.init.normal_(self.maps, std=1.0 / self.embedding_dim**0.5)

    has_routing = True

    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self._route(histories, lengths, coupling=False)[:2]

    def routing(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Interests and the last routing iteration's coupling coefficients, each interest's
        renormalised over the history items, as the routing matrix ``[B, K, L]`` (REMI's RR; the
        gradient reaches the maps through the routing logits, :func:`capsule_routing`)."""
        return self._route(histories, lengths, coupling=True)

    def _route(self, histories: Tensor, lengths: Tensor, coupling: bool) -> tuple[Tensor, ...]:
        batch, width = histories.shape
        device = histories.device
        behaviour_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        interest_mask = torch.ones(batch, self.num_interests, dtype=torch.bool, device=device)
        emb = self.item_embedding(histories)  # [B, L, d]
        pred = torch.einsum("kde,ble->bkld", self.maps, emb)  # W_j e_i
        logits = torch.zeros(batch, self.num_interests, width, device=device)
        if not coupling:
            return capsule_routing(pred, behaviour_mask, interest_mask, logits, self.routing_iterations), interest_mask
        v, w = capsule_routing(pred, behaviour_mask, interest_mask, logits, self.routing_iterations, coupling=True)
        return v, interest_mask, item_shares(w)


def build_comirec_dr(config: SequentialModelConfig, num_items: int) -> ComiRecDR:
    model = ComiRecDR(
        num_items, embedding_dim=config.embedding_dim, max_length=config.max_length,
        num_interests=config.num_interests, routing_iterations=config.routing_iterations,
        temperature=config.temperature, readout=config.readout, merge_rule=trained_merge_rule(config),
    )
    return served_as_configured(model, config)


SPEC = register(
    ModelSpec(
        name="comirec_dr",
        family="sequential",
        build=build_comirec_dr,
        summary="ComiRec-DR: capsule routing to K interests (Cen et al., KDD 2020)",
        check=unnormalised_interests,
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
# REMI (Xie et al., RecSys 2023) on the capsule routing: RR on the coupling coefficients (each
# interest's share of the items). Chosen on validation R@50 (ml-100k-seq, seeds 2020-2021, exact
# softmax): IHN hurts ComiRec-DR (0.370 -> 0.336 at beta = 1, 0.364 at 0.3), so it is off; RR is
# neutral (0.370 at 12,800, 0.366 at 100,000) and kept at the authors' scale.
REMI_SPEC = register(
    ModelSpec(
        name="comirec_dr_remi",
        family="sequential",
        build=build_comirec_dr,
        summary="ComiRec-DR + REMI's routing regularisation on the coupling coefficients (Xie et al., "
        "RecSys 2023; its hard negatives hurt ComiRec-DR on validation, so they are off)",
        defaults={"hard_negative_beta": 0.0, "routing_reg": 12800.0},
        check=unnormalised_interests,
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
