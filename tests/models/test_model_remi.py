"""REMI (Xie et al., RecSys 2023) on the multi-interest models: interest-aware hard negatives (IHN)
and routing regularisation (RR), their config fields and presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kgrec.features.sequences import SequenceSplit, sequential_split
from kgrec.models.sequential.comirec_dr import ComiRecDR
from kgrec.models.sequential.comirec_sa import ComiRecSA
from kgrec.models.sequential.config import SequentialModelConfig
from kgrec.models.sequential.mind import MIND
from kgrec.models.sequential.multi_interest import (
    capsule_routing,
    hard_negative_log_partition,
    hard_negative_weights,
    item_shares,
    pad_histories,
    routing_regularisation,
)
from kgrec.models.sequential.youtube_dnn import YouTubeDNN
from kgrec.models.spec import build_model, get_spec
from kgrec.models.training.sequential import fit_sequential
from kgrec.models.training.trainer import torch_threads

HISTORIES = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]


def batch(width: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, n = pad_histories(HISTORIES, width)
    return h, n, torch.tensor([13, 14, 15])


# ---------------------------------------------------------------------------------------- RR
def test_routing_regularisation_is_zero_for_an_even_spread_and_positive_for_a_collapsed_one() -> None:
    lengths = torch.tensor([4, 2, 6])
    real = torch.arange(6)[None, :] < lengths[:, None]  # padding after each history
    even = real[:, None, :].float().expand(3, 3, 6) / lengths[:, None, None]
    assert torch.equal(routing_regularisation(even, real), torch.zeros(3))  # padding left out
    # every interest on one item (a different one each): each row's variance sum is 1 - 1/n
    collapsed = torch.zeros(3, 3, 6)
    for b, n in enumerate(lengths.tolist()):
        for k in range(3):
            collapsed[b, k, k % n] = 1.0
    d = 64
    expected = torch.tensor([3 * ((1 - 1 / n) / d) ** 2 for n in lengths.tolist()])
    assert torch.allclose(routing_regularisation(collapsed, real, dim=d), expected)
    # it is the squared diagonal of C = (A - mean)(A - mean)^T / d (REMI), for a user without padding
    a = torch.softmax(torch.randn(1, 3, 6), -1)
    centred = a - a.mean(-1, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / d
    full = torch.ones(1, 6, dtype=torch.bool)
    assert routing_regularisation(a, full, dim=d).item() == pytest.approx(cov.diagonal(dim1=1, dim2=2).pow(2).sum().item())
    # inactive interests (MIND) do not count
    mask = torch.tensor([[True, True, False]] * 3)
    assert torch.allclose(routing_regularisation(collapsed, real, mask, dim=d), expected * 2 / 3)


def test_routing_regularisation_gradient_spreads_a_collapsed_attention() -> None:
    torch.manual_seed(0)
    model = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5)
    with torch.no_grad():
        model.w2.weight.mul_(100.0)  # very peaked attention: each interest on about one item
    h, n, _ = batch()
    real = torch.arange(h.shape[1])[None, :] < n[:, None]

    def state() -> tuple[float, float]:
        _, mask, a = model.routing(h, n)
        return routing_regularisation(a, real, mask, model.embedding_dim).mean().item(), a[:, :, :].amax(-1).mean().item()

    rr0, peak0 = state()
    assert peak0 > 0.8
    # (small steps: a step that saturates the softmax lands where no gradient is left)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        _, mask, a = model.routing(h, n)
        loss = routing_regularisation(a, real, mask, model.embedding_dim).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    rr1, peak1 = state()
    assert rr1 < 0.6 * rr0 and peak1 < peak0 - 0.25  # the attention spreads out over the items


def test_the_loss_adds_routing_reg_times_the_mean_penalty() -> None:
    torch.manual_seed(1)
    model = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5)
    h, n, t = batch()
    every = torch.arange(30)
    plain = model.loss(h, n, t, every)
    _, mask, a = model.routing(h, n)
    real = torch.arange(h.shape[1])[None, :] < n[:, None]
    penalty = routing_regularisation(a, real, mask, 8).mean()
    assert penalty.item() > 0
    assert (model.loss(h, n, t, every, routing_reg=1e4) - plain).item() == pytest.approx(1e4 * penalty.item(), rel=1e-4)
    model.routing_reg = 1e4  # the model's attribute (set by the build from the config) is the default
    assert model.loss(h, n, t, every).item() == pytest.approx((plain + 1e4 * penalty).item(), rel=1e-5)
    with pytest.raises(ValueError, match="routing matrix"):
        YouTubeDNN(30, 8, max_length=6).loss(h, n, t, every, routing_reg=1.0)


def test_capsule_coupling_is_returned_with_gradient_and_leaves_the_capsules_unchanged() -> None:
    torch.manual_seed(2)
    h, n, _ = batch()
    width = h.shape[1]
    behaviour = torch.arange(width)[None, :] < n[:, None]
    interests = torch.ones(3, 4, dtype=torch.bool)
    pred = torch.randn(3, 4, width, 8, requires_grad=True)
    logits = torch.zeros(3, 4, width)
    v = capsule_routing(pred, behaviour, interests, logits, 3)
    (grad,) = torch.autograd.grad(v.pow(3).sum(), pred)
    v2, w = capsule_routing(pred, behaviour, interests, logits, 3, coupling=True)
    (grad2,) = torch.autograd.grad(v2.pow(3).sum(), pred, retain_graph=True)
    assert torch.allclose(v, v2) and torch.allclose(grad, grad2, atol=1e-6)  # same capsules, same gradient
    # coupling: each real item's distribution over the interests; item shares: each interest's over the items
    assert torch.allclose(w.sum(1)[behaviour], torch.ones(int(behaviour.sum())), atol=1e-6)
    shares = item_shares(w)
    assert torch.allclose(shares.sum(-1), torch.ones(3, 4), atol=1e-6) and (shares[~behaviour[:, None, :].expand_as(shares)] == 0).all()
    (g,) = torch.autograd.grad(routing_regularisation(shares, behaviour).sum(), pred)
    assert g.abs().sum() > 0  # the penalty reaches the predictions through the routing logits


@pytest.mark.parametrize("cls", [ComiRecDR, MIND])
def test_routing_reg_trains_the_capsule_maps(cls) -> None:
    torch.manual_seed(3)
    model = cls(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5)
    h, n, t = batch()
    torch.manual_seed(4)
    _, mask, a = model.routing(h, n)
    real = torch.arange(h.shape[1])[None, :] < n[:, None]
    penalty = routing_regularisation(a, real, mask, 8).mean()
    weight = model.maps if cls is ComiRecDR else model.bilinear.weight
    (g,) = torch.autograd.grad(penalty, weight)
    assert penalty.item() > 0 and g.abs().sum() > 0


# ---------------------------------------------------------------------------------------- IHN
def test_hard_negative_partition_at_beta_zero_is_the_plain_logsumexp() -> None:
    torch.manual_seed(5)
    s = torch.randn(4, 7)
    valid = torch.rand(4, 7) > 0.3
    plain = torch.logsumexp(s.masked_fill(~valid, float("-inf")), -1)
    assert torch.equal(hard_negative_log_partition(s, valid, 0.0), plain)
    assert torch.allclose(hard_negative_log_partition(s, valid, 1e-7), plain, atol=1e-5)
    # beta > 0: log sum_n w_n e^{s_n}, w_n = e^{beta s_n} / mean_m e^{beta s_m} over the valid ones
    beta = 1.5
    for row in range(4):
        x = s[row, valid[row]]
        w = torch.exp(beta * x) / torch.exp(beta * x).mean()
        assert hard_negative_log_partition(s[row : row + 1], valid[row : row + 1], beta).item() == pytest.approx(
            torch.log((w * torch.exp(x)).sum()).item(), rel=1e-5
        )
    # a row without a valid negative: -inf, and no NaN gradient
    s = torch.randn(2, 3, requires_grad=True)
    out = hard_negative_log_partition(s, torch.tensor([[True, False, True], [False, False, False]]), 2.0)
    assert out[1].item() == float("-inf")
    out[0].backward()
    assert torch.isfinite(s.grad).all()


def test_harder_negatives_get_larger_weights() -> None:
    s = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    valid = torch.ones_like(s, dtype=torch.bool)
    assert torch.equal(hard_negative_weights(s, valid, 0.0), torch.ones_like(s))  # uniform: plain softmax
    for beta in (0.5, 2.0):
        w = hard_negative_weights(s, valid, beta)
        assert w.mean().item() == pytest.approx(1.0) and (w.diff() > 0).all()  # increasing with the score
    assert (hard_negative_weights(s, valid, 2.0)[0, -1] > hard_negative_weights(s, valid, 0.5)[0, -1]).item()
    # in the loss: the gradient share of the hardest negative grows with beta
    shares = []
    for beta in (0.0, 1.0, 3.0):
        x = s.clone().requires_grad_(True)
        z = torch.logaddexp(torch.tensor([0.5]), hard_negative_log_partition(x, valid, beta))
        (g,) = torch.autograd.grad(z.sum(), x)
        shares.append((g[0, -1] / g[0].abs().sum()).item())
    assert shares[0] < shares[1] < shares[2]


@pytest.mark.parametrize(
    "cls, options",
    [(ComiRecSA, {}), (ComiRecSA, {"readout": "max"}), (ComiRecSA, {"readout": "mixture"}), (ComiRecDR, {}),
     (MIND, {}), (YouTubeDNN, {})],
    ids=["sa-hard", "sa-max", "sa-mixture", "dr", "mind", "youtube_dnn"],
)
def test_ihn_at_beta_zero_is_the_plain_sampled_softmax(cls, options) -> None:
    torch.manual_seed(6)
    kwargs = {"num_interests": 3} if cls is not YouTubeDNN else {}
    model = cls(30, embedding_dim=8, max_length=6, temperature=0.5, **kwargs, **options)
    h, n, t = batch()
    negatives = torch.tensor([13, 2, 2, 20, 25, 14, 7, 29])  # duplicates, targets and history items among them
    seen = torch.zeros(3, 30, dtype=torch.bool)
    seen[0, [1, 2, 3, 4]] = True

    def loss(**kw) -> float:
        torch.manual_seed(7)  # MIND draws its routing logits
        return model.loss(h, n, t, negatives, seen=seen, **kw).item()

    plain = loss()
    assert loss(hard_negative_beta=0.0) == plain  # exactly: beta = 0 is today's code path
    # the beta > 0 path at a vanishing beta gives the same loss (same masking of targets / seen items)
    assert loss(hard_negative_beta=1e-7) == pytest.approx(plain, rel=1e-5)
    assert loss(hard_negative_beta=2.0) > plain + 1e-3


def test_ihn_hard_readout_equals_the_importance_weighted_softmax() -> None:
    torch.manual_seed(8)
    model = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5)
    h, n, t = batch()
    negatives = torch.tensor([0, 5, 9, 13, 18, 22, 27])  # 13: row 0's target, left out of its negatives
    beta = 1.2
    v, mask = model.interests(h, n)
    items = model.item_embeddings()
    u = model.readout(v, mask, items[t])
    expected = []
    for b in range(3):
        negs = negatives[negatives != t[b]]
        s_t = (u[b] @ items[t[b]]) / 0.5
        s = (items[negs] @ u[b]) / 0.5
        w = torch.exp(beta * s) / torch.exp(beta * s).mean()
        expected.append(-(s_t - torch.log(torch.exp(s_t) + (w * torch.exp(s)).sum())))
    got = model.loss(h, n, t, negatives, hard_negative_beta=beta)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_ihn_is_not_a_no_op_with_the_exact_softmax() -> None:
    torch.manual_seed(9)
    model = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5)
    h, n, t = batch()
    every = torch.arange(30)
    plain = model.loss(h, n, t, every)
    hard = model.loss(h, n, t, every, hard_negative_beta=1.0)
    # N E_q[e^s] >= sum_n e^s when q favours high scores: a larger loss, other gradients
    assert hard.item() > plain.item()
    g_plain = torch.autograd.grad(plain, model.item_embedding.weight)[0]
    g_hard = torch.autograd.grad(hard, model.item_embedding.weight)[0]
    assert not torch.allclose(g_plain, g_hard)


# ------------------------------------------------------------------------- config and presets
def test_config_fields_are_validated_and_reach_the_model() -> None:
    config = SequentialModelConfig(model="comirec_sa", hard_negative_beta=2.0, routing_reg=100.0)
    model = build_model(config, 50)
    assert (model.hard_negative_beta, model.routing_reg) == (2.0, 100.0)
    plain = build_model(SequentialModelConfig(model="comirec_sa"), 50)
    assert (plain.hard_negative_beta, plain.routing_reg) == (0.0, 0.0)  # off by default: today's loss
    for bad in ({"hard_negative_beta": -1.0}, {"routing_reg": -1.0}, {"hard_negative_beta": 1000.0}):
        with pytest.raises(ValueError):
            SequentialModelConfig(model="comirec_sa", **bad)
    for name in ("youtube_dnn", "mixture"):  # no routing matrix
        with pytest.raises(ValueError, match="routing matrix"):
            SequentialModelConfig(model=name, routing_reg=1.0)
    SequentialModelConfig(model="youtube_dnn", hard_negative_beta=1.0)  # IHN needs no routing
    SequentialModelConfig(model="mind", routing_reg=1.0)


@pytest.mark.parametrize("name", ["comirec_sa_remi", "comirec_dr_remi"])
def test_remi_presets_are_registered_with_remi_defaults(name: str) -> None:
    spec = get_spec(name, "sequential")
    # ComiRec-DR: IHN hurt it on validation, so its preset has RR only
    assert (spec.defaults["hard_negative_beta"] > 0) == (name == "comirec_sa_remi") and spec.defaults["routing_reg"] > 0
    config = SequentialModelConfig.for_model(name, embedding_dim=8, num_interests=3)
    model = build_model(config, 40)
    assert model.has_routing and model.hard_negative_beta == spec.defaults["hard_negative_beta"]
    assert model.routing_reg == spec.defaults["routing_reg"] and model.merge_rule == "max"


@pytest.fixture(scope="module")
def ml100k_seq_split(tmp_path_factory: pytest.TempPathFactory):
    from kgrec.features.ingest import ingest
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import data_dir, load_spec

    try:
        if not (data_dir() / "ml-100k").is_dir():
            pytest.skip("ml-100k data missing")
    except FileNotFoundError:
        pytest.skip("no data directory")
    snapshot = load_snapshot(ingest(load_spec("ml-100k-seq"), tmp_path_factory.mktemp("seq")).snapshot_dir)
    split = sequential_split(snapshot, seed=2020)
    # a few steps: 120 training users (about 12k windows), the validation users as they are
    keep = slice(0, 120)
    return SequenceSplit(
        num_users=split.num_users, num_items=split.num_items, train_users=split.train_users[keep],
        train_sequences=split.train_sequences[keep], valid_users=split.valid_users,
        valid_inputs=split.valid_inputs, valid_targets=split.valid_targets, test_users=split.test_users,
        test_inputs=split.test_inputs, test_targets=split.test_targets, seed=split.seed,
    )


@pytest.mark.parametrize("name", ["comirec_sa_remi", "comirec_dr_remi"])
def test_remi_presets_train_on_ml100k_seq_and_report_interest_similarity(ml100k_seq_split, name: str) -> None:
    split = ml100k_seq_split
    config = SequentialModelConfig.for_model(name, epochs=2, patience=2, batch_size=512, seed=2020)
    torch.manual_seed(2020)
    model = build_model(config, split.num_items)
    with torch_threads(1):
        result = fit_sequential(model, split, config)
    losses = [h.loss for h in result.history]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]
    sim = result.best_valid["interest_similarity"]
    assert -1.0 <= sim <= 1.0 and result.best_valid["recall@50"] > 0.05
