r"""MIND: multi-interest network with behaviour-to-interest dynamic routing."""

from __future__ import annotations

import torch
from kgrec.models.merge import MergeRule
from kgrec.models.sequential.config import (
    SEQUENTIAL_SEARCH_SPACE,
    SequentialModelConfig,
    hard_readout_only,
    served_as_configured,
    trained_merge_rule,
)
from kgrec.models.sequential.multi_interest import (
    MultiInterestModel,
    capsule_routing,
    dynamic_interest_count,
    init_normal_,
    item_shares,
)
from kgrec.models.spec import ModelSpec, register
from torch import Tensor


class MIND(MultiInterestModel):
    r"""MIND from `"Multi-Interest Network with Dynamic Routing for Recommendation at Tmall"
    <https://arxiv.org/abs/1904.08030>`_ (Li et al., CIKM 2019), without user-profile features.

    Behaviour-to-Interest (B2I) dynamic routing (Sec. 3.3, Algorithm 1) with a SHARED bilinear map
    :math:`S \in \mathbb{R}^{d \times d}` (Eq. 8):

    .. math:: b_{ij} \sim \mathcal{N}(0, \sigma^2)\ \text{(random, not learned)}, \quad
              w_{ij} = \frac{\exp b_{ij}}{\sum_{k=1}^{K'_u} \exp b_{ik}}, \quad
              z_j = \sum_{i \in \mathcal{I}_u} w_{ij} S e_i, \quad
              u_j = \mathrm{squash}(z_j), \quad b_{ij} \mathrel{+}= u_j^\top S e_i

    for ``routing_iterations`` (3) rounds, with the adaptive interest count (Eq. 9)
    :math:`K'_u = \max(1, \min(K, \lfloor\log_2 |\mathcal{I}_u|\rfloor))` (``|I_u|`` = the length of the
    history window used). The capsules then pass a ReLU layer, :math:`v_j = \mathrm{ReLU}(W u_j + b)`
    (the paper's "several ReLU layers", here one, optional). Training uses label-aware attention
    (Eq. 10) instead of the hard readout:

    .. math:: v_u = V_u\, \mathrm{softmax}(\mathrm{pow}(V_u^\top e_t, p))

    where we use the sign-preserving power :math:`\mathrm{sign}(x)|x|^p` (identical to ``pow`` for
    non-negative inner products) so that an anti-aligned interest is not up-weighted; ``p -> inf`` is
    the hard readout. In evaluation the routing logits are drawn from a generator seeded with
    ``routing_seed`` so that the interests of a history are deterministic (train mode uses the
    global RNG, as in the paper).

    Args:
        num_items: item count.
        embedding_dim: ``d``.
        num_interests: ``K``, the maximum number of interests.
        max_length: history items used.
        routing_iterations: routing rounds (3 in the paper).
        pow_p: label-aware attention power ``p``.
        routing_std: :math:`\sigma` of the random routing logits.
        relu_layer: apply the ReLU layer after routing.
        temperature: sampled-softmax temperature.
        merge_rule: how the interests' lists are merged at retrieval (:mod:`kgrec.models.merge`).
        routing_seed: seed of the evaluation-mode routing logits.
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        num_interests: int = 4,
        max_length: int = 20,
        routing_iterations: int = 3,
        pow_p: float = 2.0,
        routing_std: float = 1.0,
        relu_layer: bool = True,
        temperature: float = 0.1,
        merge_rule: MergeRule = "max",
        routing_seed: int = 0,
    ) -> None:
        super().__init__(num_items, embedding_dim, num_interests, max_length, temperature, merge_rule)
        self.hparams = dict(
            num_items=num_items, embedding_dim=embedding_dim, num_interests=num_interests,
            max_length=max_length, routing_iterations=routing_iterations, pow_p=pow_p,
            routing_std=routing_std, relu_layer=relu_layer, temperature=temperature, merge_rule=merge_rule,
            routing_seed=routing_seed,
        )
        self.routing_iterations = routing_iterations
        self.pow_p = pow_p
        self.routing_std = routing_std
        self.routing_seed = routing_seed
        self.item_embedding = torch.nn.Embedding(num_items, embedding_dim)
        self.bilinear = torch.nn.Linear(embedding_dim, embedding_dim, bias=False)  # S, shared
        self.out = torch.nn.Linear(embedding_dim, embedding_dim) if relu_layer else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_normal_(self.item_embedding.weight, self.embedding_dim)
        torch.nn.init.eye_(self.bilinear.weight)
        self.bilinear.weight.data += 0.01 * torch.randn_like(self.bilinear.weight)
        if self.out is not None:
            self.out.reset_parameters()

    has_routing = True

    def interests(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self._route(histories, lengths, coupling=False)[:2]

    def routing(self, histories: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Interests and the last routing iteration's coupling coefficients, each active interest's
        renormalised over the history items, as the routing matrix ``[B, K, L]`` (REMI's RR)."""
        return self._route(histories, lengths, coupling=True)

    def _route(self, histories: Tensor, lengths: Tensor, coupling: bool) -> tuple[Tensor, ...]:
        batch, width = histories.shape
        device = histories.device
        behaviour_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        k_user = dynamic_interest_count(lengths, self.num_interests)
        interest_mask = torch.arange(self.num_interests, device=device)[None, :] < k_user[:, None]
        pred = self.bilinear(self.item_embedding(histories))  # [B, L, d] = S e_i
        pred = pred.unsqueeze(1).expand(-1, self.num_interests, -1, -1)
        shape = (batch, self.num_interests, width)
        if self.training:
            logits = torch.randn(shape, device=device) * self.routing_std
        else:
            gen = torch.Generator(device="cpu").manual_seed(self.routing_seed)
            logits = (torch.randn(shape, generator=gen) * self.routing_std).to(device)
        routed = capsule_routing(pred, behaviour_mask, interest_mask, logits, self.routing_iterations, coupling=coupling)
        v, w = routed if coupling else (routed, None)
        if self.out is not None:
            v = torch.relu(self.out(v)) * interest_mask[:, :, None]
        return (v, interest_mask, item_shares(w)) if coupling else (v, interest_mask)

    def readout(self, interests: Tensor, mask: Tensor, target_emb: Tensor) -> Tensor:
        att = (interests * target_emb[:, None, :]).sum(-1)
        att = torch.sign(att) * att.abs().pow(self.pow_p)
        w = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=1)
        return (w.unsqueeze(-1) * interests).sum(1)


def build_mind(config: SequentialModelConfig, num_items: int) -> MIND:
    model = MIND(
        num_items, embedding_dim=config.embedding_dim, max_length=config.max_length,
        num_interests=config.num_interests, routing_iterations=config.routing_iterations,
        temperature=config.temperature, merge_rule=trained_merge_rule(config),
    )
    return served_as_configured(model, config)


SPEC = register(
    ModelSpec(
        name="mind",
        family="sequential",
        build=build_mind,
        summary="MIND: dynamic routing to an adaptive number of interests (Li et al., CIKM 2019)",
        check=hard_readout_only,
        search_space=SEQUENTIAL_SEARCH_SPACE,
    )
)
