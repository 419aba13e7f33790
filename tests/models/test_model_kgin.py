"""KGIN: relational aggregation, intents, independence, gradients, config and learning."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from ckg_helpers import make_ckg  # noqa: E402  (tests/models helper)
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.retrievers.kgin import KGIN, KGINParams, independence_loss, relational_aggregation
from kgrec.models.spec import build_model, get_spec, model_names
from kgrec.models.training.pairwise import fit


@pytest.fixture(scope="module")
def tiny_ckg(tiny_data):
    # items 0-4, entities 5-7 (KG node ids), two KG relations
    kg = [(0, 0, 5), (1, 0, 5), (2, 0, 6), (3, 1, 7), (4, 1, 7), (0, 1, 6), (5, 0, 6)]
    return make_ckg(tiny_data.train, kg, num_entities=3, num_kg_relations=2)


@pytest.fixture(scope="module")
def planted_ckg(planted_data):
    """Each item -> its community's genre entity (relation 0), plus a random 'noise' relation."""
    rng = np.random.default_rng(1)
    n = planted_data.num_items
    genre = [(i, 0, n + i // 20) for i in range(n)]
    noise = [(i, 1, n + 4 + int(rng.integers(6))) for i in range(n)]
    return make_ckg(planted_data.train, genre + noise, num_entities=10, num_kg_relations=2)


def _tiny_model(tiny_data, tiny_ckg, **kw) -> KGIN:
    torch.manual_seed(0)
    base = dict(embedding_dim=6, num_layers=2, num_intents=3)
    return KGIN(tiny_data.num_users, tiny_data.num_items, tiny_ckg, tiny_data.train, **{**base, **kw})


def test_relational_aggregation_matches_hand_computation():
    # 3-node KG: item 0 -(r0)- entity 1, item 0 -(r1)- entity 2; both directions (inverse = r + 2)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
    rel = torch.tensor([[2.0, 1.0], [-1.0, 3.0], [1.0, 0.5], [4.0, -2.0]])  # r0, r1, rev r0, rev r1
    head, tail, r = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 0, 0]), torch.tensor([0, 1, 2, 3])
    out = relational_aggregation(x, rel, head, tail, r, num_nodes=3)
    expected = torch.stack(
        [
            (rel[0] * x[1] + rel[1] * x[2]) / 2,  # [(6 - 0.5)/2, (-1 + 12)/2]
            rel[2] * x[0],
            rel[3] * x[0],
        ]
    )
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[0], torch.tensor([2.75, 5.5]))
    # a node without edges aggregates to zero
    assert torch.equal(relational_aggregation(x, rel, head[:2], tail[:2], r[:2], 3)[1:], torch.zeros(2, 2))


def _dense_reference(model: KGIN, tiny_data, tiny_ckg) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7-9 and 13 with dense matrices and explicit per-relation sums (float64)."""
    u, i = tiny_data.num_users, tiny_data.num_items
    n = model.num_kg_nodes
    keep = tiny_ckg.edge_type >= 2
    head, tail = (tiny_ckg.edge_index[:, keep] - u).tolist()
    rel = (tiny_ckg.edge_type[keep] - 2).tolist()
    e_r = model.relation_embedding.detach().double()
    alpha = torch.softmax(model.intent_logits.detach().double(), 1)
    e_p = alpha @ e_r
    r = torch.from_numpy(tiny_data.train.toarray()).double()
    mean_op = r / r.sum(1, keepdim=True).clamp(min=1)
    user_x = model.user_embedding.weight.detach().double()
    ent_x = model.entity_embedding.weight.detach().double()
    user_out, ent_out = user_x.clone(), ent_x.clone()
    for _ in range(model.num_layers):
        agg, deg = torch.zeros_like(ent_x), torch.zeros(n, dtype=torch.float64)
        for h, t, k in zip(head, tail, rel):
            agg[h] += e_r[k] * ent_x[t]
            deg[h] += 1
        ent_next = agg / deg.clamp(min=1)[:, None]
        beta = torch.softmax(user_x @ e_p.t(), 1)
        m = mean_op @ ent_x[:i]
        user_next = (beta @ e_p) * m + m
        ent_x = ent_next / ent_next.norm(dim=1, keepdim=True).clamp(min=1e-12)
        user_x = user_next / user_next.norm(dim=1, keepdim=True).clamp(min=1e-12)
        user_out, ent_out = user_out + user_x, ent_out + ent_x
    return user_out, ent_out[:i]


def test_propagation_matches_dense_reference(tiny_data, tiny_ckg):
    model = _tiny_model(tiny_data, tiny_ckg).eval()
    user_emb, item_emb = model.embeddings()
    ref_u, ref_i = _dense_reference(model, tiny_data, tiny_ckg)
    torch.testing.assert_close(user_emb.double(), ref_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(item_emb.double(), ref_i, rtol=1e-5, atol=1e-6)
    assert user_emb.shape == (4, 6) and item_emb.shape == (5, 6)


def test_intent_weights_and_attention_are_distributions(tiny_data, tiny_ckg):
    model = _tiny_model(tiny_data, tiny_ckg)
    alpha = model.intent_weights()
    assert alpha.shape == (3, 4)  # 3 intents over 2 KG relations and their inverses
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    assert (alpha > 0).all()
    torch.testing.assert_close(model.intents(), alpha @ model.relation_embedding)
    beta = model.intent_attention(torch.randn(7, 6))
    assert beta.shape == (7, 3) and (beta > 0).all()
    torch.testing.assert_close(beta.sum(1), torch.ones(7))


def test_independence_zero_for_independent_positive_for_identical():
    orthogonal = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -3.0]])
    assert independence_loss(orthogonal, "cosine").item() == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[1.0, 2.0, -1.0], [2.0, 4.0, -2.0]])
    assert independence_loss(same, "cosine").item() == pytest.approx(1.0, rel=1e-6)
    # empirical joint of (x, y) is the product of its marginals: distance covariance is zero
    product = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    assert independence_loss(product, "distance").item() < 1e-3
    # identical / affinely related intents: distance correlation one
    x = torch.randn(32)
    assert independence_loss(torch.stack([x, 3 * x + 1]), "distance").item() == pytest.approx(1.0, abs=1e-3)
    # three copies: three pairs
    assert independence_loss(torch.stack([x, x, x]), "distance").item() == pytest.approx(3.0, abs=3e-3)
    assert independence_loss(x[None], "distance").item() == 0.0


def test_distance_correlation_matches_numpy_reference():
    def dcor(a: np.ndarray, b: np.ndarray) -> float:
        def centred(v):
            d = np.abs(v[:, None] - v[None, :])
            return d - d.mean(0) - d.mean(1)[:, None] + d.mean()

        aa, bb = centred(a), centred(b)
        return np.sqrt((aa * bb).mean()) / np.sqrt(np.sqrt((aa * aa).mean() * (bb * bb).mean()))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 20))
    x[2] = x[0] ** 2 + 0.1 * x[1]  # nonlinearly dependent on x[0]
    expected = dcor(x[0], x[1]) + dcor(x[0], x[2]) + dcor(x[1], x[2])
    got = independence_loss(torch.from_numpy(x), "distance").item()
    assert got == pytest.approx(expected, abs=1e-3)


def test_gradient_reaches_every_parameter(tiny_data, tiny_ckg):
    model = _tiny_model(tiny_data, tiny_ckg, independence_weight=1e-2).train()
    loss = model.loss(torch.tensor([0, 1, 3]), torch.tensor([0, 2, 4]), torch.tensor([3, 4, 1]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_loss_is_bpr_plus_ego_l2_plus_independence(tiny_data, tiny_ckg):
    model = _tiny_model(tiny_data, tiny_ckg, reg_weight=0.1, independence_weight=0.5).eval()
    users, pos, neg = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 0])
    user_emb, item_emb = model.embeddings()
    diff = (user_emb[users] * (item_emb[pos] - item_emb[neg])).sum(1)
    ego = (
        model.user_embedding.weight[users].pow(2).sum()
        + model.entity_embedding.weight[pos].pow(2).sum()
        + model.entity_embedding.weight[neg].pow(2).sum()
    ) / 4
    expected = -torch.nn.functional.logsigmoid(diff).mean() + 0.1 * ego + 0.5 * model.independence_loss()
    torch.testing.assert_close(model.loss(users, pos, neg), expected)


def test_dropout_only_in_training_and_graph_not_in_state_dict(tiny_data, tiny_ckg):
    model = _tiny_model(tiny_data, tiny_ckg, node_dropout=0.5, mess_dropout=0.3)
    model.eval()
    a, b = model.embeddings()[0], model.embeddings()[0]
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model.embeddings()[0], a)
    assert set(model.state_dict()) == {
        "user_embedding.weight",
        "entity_embedding.weight",
        "relation_embedding",
        "intent_logits",
    }
    assert model.kg_head.numel() == 2 * 7 and model.ui_user.numel() == tiny_data.train.nnz


def test_registry_and_config_validation(tiny_data):
    assert "kgin" in model_names("retriever")
    assert get_spec("kgin").params is KGINParams
    config = TrainConfig.for_model("kgin", params={"num_intents": 2, "independence": "cosine"})
    assert config.params["num_intents"] == 2 and config.params["independence"] == "cosine"
    assert set(config.params) == set(KGINParams.model_fields)
    assert config.to_dict()["params.independence"] == "cosine"
    for bad in ({"bogus": 1}, {"independence": "mi"}, {"node_dropout": 1.0}, {"num_intents": 0}):
        with pytest.raises((pydantic.ValidationError, ValueError)):
            TrainConfig.for_model("kgin", params=bad)
    # without a snapshot there is no KG: interaction-only CKG, zero intents, still a valid model
    model = build_model(TrainConfig.for_model("kgin", embedding_dim=8, params={"num_intents": 2}), tiny_data)
    assert isinstance(model, KGIN) and model.num_kg_relations == 0
    loss = model.loss(torch.tensor([0, 2]), torch.tensor([0, 3]), torch.tensor([4, 1]))
    assert torch.isfinite(loss)
    loss.backward()


def test_training_improves_validation_recall(planted_data, planted_ckg):
    config = TrainConfig.for_model(
        "kgin", embedding_dim=16, learning_rate=0.02, batch_size=256, epochs=8, patience=50, device="cpu"
    )
    params = KGINParams.model_validate(config.params)

    def make() -> KGIN:
        return KGIN(
            planted_data.num_users,
            planted_data.num_items,
            planted_ckg,
            planted_data.train,
            embedding_dim=16,
            num_layers=config.num_layers,
            num_intents=params.num_intents,
            node_dropout=params.node_dropout,
            mess_dropout=params.mess_dropout,
            reg_weight=config.reg_weight,
        )

    torch.manual_seed(config.seed)
    untrained = make().eval()
    # the planted genre entities already cluster the untrained items (recall@10 ~ 0.5, chance 0.14)
    before = evaluate(untrained, planted_data.valid, planted_data.train, ks=(10,))["recall@10"]
    model = make()
    result = fit(model, planted_data, config)
    after = result.best_valid["recall@10"]
    assert after > before + 0.25 and after > 0.8, (before, after)
    assert result.best_valid == evaluate(model.eval(), planted_data.valid, planted_data.train, ks=config.ks)
