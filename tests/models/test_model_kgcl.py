"""KGCL: InfoNCE, knowledge-guided dropout, the LightGCN special case, learning, export, no KG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ckg_helpers import make_ckg  # noqa: E402  (tests/models helper)
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.layers.kgcl_aggregation import RelationAwareAggregation
from kgrec.models.persistence import load_state, save_module
from kgrec.models.retrievers.kgcl import KGCL, KGCLParams, consistency_keep_probability, info_nce
from kgrec.models.retrievers.lightgcn import LightGCN
from kgrec.models.spec import build_model, get_spec, model_names
from kgrec.models.training.pairwise import fit


@pytest.fixture(scope="module")
def planted_ckg(planted_data):
    """Each item -> its community's genre entity (relation 0), plus a random 'noise' relation."""
    rng = np.random.default_rng(1)
    n = planted_data.num_items
    genre = [(i, 0, n + i // 20) for i in range(n)]
    noise = [(i, 1, n + 4 + int(rng.integers(6))) for i in range(n)]
    return make_ckg(planted_data.train, genre + noise, num_entities=10, num_kg_relations=2)


def naive_info_nce(z1, z2, z_all, tau):
    total = 0.0
    for b in range(z1.size(0)):
        cos = lambda a, c: float(torch.dot(a, c) / (a.norm() * c.norm()))  # noqa: E731
        num = math.exp(cos(z1[b], z2[b]) / tau)
        den = sum(math.exp(cos(z1[b], z_all[j]) / tau) for j in range(z_all.size(0)))
        total += -math.log(num / den)
    return total / z1.size(0)


# ---------------------------------------------------------------------------------------- InfoNCE
def test_info_nce_matches_its_definition():
    torch.manual_seed(0)
    view1, view2 = torch.randn(7, 5), torch.randn(7, 5)
    batch = torch.tensor([0, 3, 3, 6])  # a repeated node counts twice
    got = float(info_nce(view1, view2, batch, 0.2))
    assert got == pytest.approx(naive_info_nce(view1[batch], view2[batch], view2, 0.2), rel=1e-5)


def test_info_nce_is_minimal_when_the_views_agree():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1) * 3  # well separated nodes
    batch = torch.arange(10)
    agree = float(info_nce(z, z, batch, 0.2))
    for scale in (0.1, 0.5, 1.0):
        noisy = z + scale * torch.randn_like(z)
        assert float(info_nce(noisy, z, batch, 0.2)) > agree
        assert float(info_nce(z, noisy, batch, 0.2)) > agree


def test_info_nce_gradient_pulls_matching_nodes_together():
    torch.manual_seed(0)
    view2 = torch.randn(12, 6)
    view1 = torch.randn(12, 6, requires_grad=True)
    before = torch.nn.functional.cosine_similarity(view1, view2, dim=-1).detach()
    info_nce(view1, view2, torch.arange(12), 0.2).backward()
    with torch.no_grad():
        after = torch.nn.functional.cosine_similarity(view1 - 0.05 * view1.grad, view2, dim=-1)
    assert bool((after > before).all()), (before, after)


# ---------------------------------------------------------------------- knowledge-guided dropout
def test_keep_probability_favours_consistent_items_and_keeps_the_mean():
    s = torch.tensor([0.95, 0.9, 0.6, 0.5, 0.3, 0.1])
    p = consistency_keep_probability(s, mean_keep=0.6, min_keep=0.3, max_keep=0.95)
    # KGCL: items whose KG representation survives KG dropout (little KG noise) keep more edges
    assert bool((p[:-1] >= p[1:]).all()) and p[0] > p[-1]
    assert float(p.max()) <= 0.95 + 1e-6
    # the floor p_tau: the least consistent item's normalised weight is 0.3, not 0
    assert float(p[-1]) == pytest.approx(0.6 * 0.3 / float(((s.exp() - s.exp().min()) / (s.exp().max() - s.exp().min())).clamp(min=0.3).mean()), rel=1e-5)
    # no KG: every item equally consistent -> uniform keep probability
    flat = consistency_keep_probability(torch.ones(5), mean_keep=0.9)
    assert torch.allclose(flat, torch.full((5,), 0.9))


def test_interaction_views_keep_more_edges_of_consistent_items(planted_data, planted_ckg):
    torch.manual_seed(0)
    model = KGCL(planted_data.num_users, planted_data.num_items, planted_ckg, planted_data.train, embedding_dim=8)
    consistency = torch.zeros(planted_data.num_items)
    consistency[:40] = 0.9  # consistent half
    consistency[40:] = 0.1  # noisy half
    keep = consistency_keep_probability(consistency, mean_keep=0.6)
    items = model._train_items
    kept_consistent = kept_noisy = 0.0
    for _ in range(20):
        kept, adj = model.interaction_view(keep)
        kept_consistent += kept[items < 40].mean()
        kept_noisy += kept[items >= 40].mean()
        assert adj.shape == (planted_data.num_users + planted_data.num_items,) * 2
    assert kept_consistent / 20 == pytest.approx(float(keep[0]), abs=0.03)
    assert kept_noisy / 20 == pytest.approx(float(keep[-1]), abs=0.03)
    assert kept_consistent > kept_noisy + 0.2


def test_kg_views_drop_kg_edges_and_consistency_is_one_without_augmentation(planted_data, planted_ckg):
    torch.manual_seed(0)
    model = KGCL(planted_data.num_users, planted_data.num_items, planted_ckg, planted_data.train,
                 embedding_dim=8, kg_drop=0.5)
    m1, m2 = model.kg_view_masks()
    assert 0.35 < float(m1.float().mean()) < 0.65 and not torch.equal(m1, m2)
    s = model.structure_consistency(m1, m2)
    assert s.shape == (planted_data.num_items,) and float(s.max()) <= 1 + 1e-5 and float(s.min()) < 0.999
    off = KGCL(planted_data.num_users, planted_data.num_items, planted_ckg, planted_data.train,
               embedding_dim=8, kg_augmentation=False)
    assert torch.allclose(off.item_consistency, torch.ones(planted_data.num_items), atol=1e-5)


def test_aggregation_attends_over_each_items_edges():
    torch.manual_seed(0)
    layer = RelationAwareAggregation(4).requires_grad_(False)
    items, nodes, rels = torch.randn(3, 4), torch.randn(6, 4), torch.randn(2, 4)
    head, tail, rel = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([3, 4, 3, 5, 0]), torch.tensor([0, 1, 0, 0, 1])
    alpha = layer.attention(items, nodes, rels, head, tail, rel)
    assert float(alpha[:2].sum()) == pytest.approx(1.0) and float(alpha[2:].sum()) == pytest.approx(1.0)
    out = layer(items, nodes, rels, head, tail, rel)
    assert torch.allclose(out[2], items[2])  # no KG edge: the item's own embedding
    assert torch.allclose(out[0], items[0] + alpha[0] * nodes[3] + alpha[1] * nodes[4], atol=1e-6)
    # the attention depends on the relation: swapping a relation changes it
    alpha2 = layer.attention(items, nodes, rels, head, tail, torch.tensor([1, 1, 0, 0, 1]))
    assert not torch.allclose(alpha[:2], alpha2[:2])


# --------------------------------------------------------------------------- LightGCN special case
def test_without_contrast_augmentation_and_kg_encoder_it_is_lightgcn(planted_data, planted_ckg):
    u, i = planted_data.num_users, planted_data.num_items
    torch.manual_seed(0)
    kgcl = KGCL(u, i, planted_ckg, planted_data.train, embedding_dim=16, num_layers=3, ssl_weight=0.0,
                kg_aggregation=False, kg_augmentation=False, kg_loss=False)
    lgn = LightGCN(u, i, planted_data.train, embedding_dim=16, num_layers=3)
    lgn.user_embedding.weight.data.copy_(kgcl.user_embedding.weight.data)
    lgn.item_embedding.weight.data.copy_(kgcl.item_embedding.weight.data)
    users = torch.arange(u)
    with torch.no_grad():
        assert torch.allclose(kgcl.score(users), lgn.score(users), atol=1e-6)
    batch = torch.tensor([0, 5, 9]), torch.tensor([1, 2, 3]), torch.tensor([70, 71, 72])
    l1, l2 = kgcl.loss(*batch), lgn.loss(*batch)
    assert float(l1.detach()) == pytest.approx(float(l2.detach()), rel=1e-6)
    l1.backward()
    l2.backward()
    assert torch.allclose(kgcl.user_embedding.weight.grad, lgn.user_embedding.weight.grad, atol=1e-7)
    assert kgcl.epoch_hooks()[0].name == "kgcl_views" and len(kgcl.epoch_hooks()) == 1
    # and the KG encoder is what makes the difference: turned on, the scores change
    kgcl.kg_aggregation = True
    with torch.no_grad():
        assert not torch.allclose(kgcl.score(users), lgn.score(users), atol=1e-4)


def test_contrastive_term_adds_to_the_loss_and_gets_gradients(planted_data, planted_ckg):
    torch.manual_seed(0)
    model = KGCL(planted_data.num_users, planted_data.num_items, planted_ckg, planted_data.train, embedding_dim=8)
    batch = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([70, 71, 72])
    with_ssl = model.loss(*batch)
    model.ssl_weight = 0.0
    without = model.loss(*batch)
    model.ssl_weight = 0.1
    assert float(with_ssl) > float(without)
    model.contrastive_loss(batch[0], batch[1]).backward()
    assert float(model.aggregator.lin.weight.grad.abs().sum()) > 0
    assert float(model.entity_embedding.weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------- registry, learning
def test_registered_with_params_and_defaults():
    assert "kgcl" in model_names("retriever")
    spec = get_spec("kgcl")
    assert spec.params is KGCLParams and "params.ssl_weight" in spec.search_space
    config = TrainConfig.for_model("kgcl", params={"ui_drop": 0.2})
    assert config.params["ui_drop"] == 0.2 and config.params["temperature"] == 0.5  # tuned on validation
    assert KGCLParams().temperature == 0.2  # the paper's
    with pytest.raises(ValueError):
        TrainConfig.for_model("kgcl", params={"nope": 1})


def test_learns_planted_communities_far_above_random(planted_data, planted_ckg):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = KGCL(planted_data.num_users, planted_data.num_items, planted_ckg, planted_data.train,
                     embedding_dim=16)
        config = TrainConfig.for_model("kgcl", epochs=30, patience=30, seed=0, batch_size=256,
                                       ks=(10,), selection_metric="recall@10")
        result = fit(model, planted_data, config)
    finally:
        torch.set_num_threads(previous)
    assert "kg_loss" in result.history[-1].extra and "consistency_mean" in result.history[-1].extra
    test = evaluate(model, planted_data.test, planted_data.train + planted_data.valid, ks=(10,))
    assert test["recall@10"] > 0.4, test  # random ~0.14


# ------------------------------------------------------------------------- export and KG removed
@pytest.fixture(scope="module")
def music(tmp_path_factory):
    from kgrec.features.ingest import ingest
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec

    try:
        report = ingest(load_spec("music"), tmp_path_factory.mktemp("snapshots"))
    except (FileNotFoundError, ValueError) as err:  # data not on this machine
        pytest.skip(f"music data unavailable: {err}")
    return load_snapshot(report.snapshot_dir)


@pytest.mark.parametrize("variant", ["kg", "no_kg", "shuffled_kg"])
def test_trains_exports_and_reloads_on_every_kg_variant(music, variant, tmp_path):
    from kgrec.features.ablation import kg_variant
    from kgrec.features.dataset import InteractionData
    from kgrec.features.split import random_split

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = InteractionData.from_snapshot(kg_variant(music, variant, 2020), random_split(music.interactions, seed=2020))
        config = TrainConfig.for_model("kgcl", epochs=1, max_batches_per_epoch=2, seed=1)
        model = build_model(config, data)
        result = fit(model, data, config)
        assert math.isfinite(result.history[0].loss)
        assert 0.0 < result.best_valid["recall@20"] <= 1.0
        with torch.no_grad():
            users, items = model.embeddings()
            scores = model.scorer()(torch.arange(5))
        assert users.shape == (music.n_users, 64) and items.shape == (music.n_items, 64)
        assert bool(torch.isfinite(users).all() and torch.isfinite(items).all())
        assert torch.allclose(scores, users[:5] @ items.t(), atol=1e-5)
        if variant == "no_kg":
            assert model.kg_head.numel() == 0 and "kg_loss" not in result.history[0].extra
        # the weights alone reproduce the scores (the views and the graph are derived, not saved)
        save_module(model, tmp_path, {"model": "kgcl"})
        fresh = build_model(config, data)
        tensors, _spec = load_state(tmp_path, expected_class="KGCL")
        fresh.load_state_dict(tensors["state_dict"])
        fresh.eval()
        with torch.no_grad():
            assert torch.allclose(fresh.embeddings()[1], items, atol=1e-6)
    finally:
        torch.set_num_threads(previous)
