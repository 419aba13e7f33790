"""The cold-start protocol: both figures, the baselines, and the inductive KGAT item embedding."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
from kgrec.features.cold_start import cold_start_split
from kgrec.features.dataset import InteractionData, interaction_matrix
from kgrec.features.graph import CollaborativeKG, ckg_relation_names
from kgrec.models.cold_start import (
    InductiveKGAT,
    choose_ego,
    cold_top_k,
    evaluate_cold,
    facts_from_triples,
    inductive_item_embedding,
    kg_item_knn_scores,
    popularity_scores,
    random_scores,
    tie_broken,
)
from kgrec.models.config import TrainConfig
from kgrec.models.retrievers.kgat import KGAT
from kgrec.models.training.pairwise import fit

U, I, E, GROUPS = 120, 60, 10, 4  # users, items, entities (4 genres + 6 noise), communities


def ckg_of(train: sp.spmatrix, kg: np.ndarray) -> CollaborativeKG:
    """The CKG as ``build_ckg`` lays it out (kg rows: head, relation, tail in KG node space)."""
    coo = sp.csr_matrix(train).tocoo()
    users, items = coo.row.astype(np.int64), coo.col.astype(np.int64) + U
    head, rel, tail = kg[:, 0] + U, kg[:, 1], kg[:, 2] + U
    return CollaborativeKG(
        edge_index=torch.from_numpy(
            np.stack([np.r_[users, items, head, tail], np.r_[items, users, tail, head]])
        ),
        edge_type=torch.from_numpy(
            np.r_[np.zeros_like(users), np.ones_like(users), 2 + 2 * rel, 3 + 2 * rel]
        ),
        num_users=U, num_items=I, num_entities=E,
        relation_names=ckg_relation_names(["genre", "noise"]),
    )


@pytest.fixture(scope="module")
def world():
    """Planted communities: user u likes 8 of the 15 items of community u % 4; every item has a
    genre entity (its community) and a noise entity; one item-item triple."""
    rng = np.random.default_rng(0)
    per = I // GROUPS
    rows = []
    for u in range(U):
        g = u % GROUPS
        rows += [(u, g * per + int(i)) for i in rng.choice(per, size=8, replace=False)]
    log = pl.DataFrame({"user_idx": [r[0] for r in rows], "item_idx": [r[1] for r in rows]},
                       schema={"user_idx": pl.Int32, "item_idx": pl.Int32})
    genre = [(i, 0, I + i // per) for i in range(I)]
    noise = [(i, 1, I + 4 + int(rng.integers(6))) for i in range(I)]
    kg = np.array(genre + noise + [(3, 1, 40)], dtype=np.int64)
    split = cold_start_split(log, np.arange(I), fraction=0.2, seed=2020)
    shape = (U, I)
    data = InteractionData(
        U, I, *(interaction_matrix(p, *shape) for p in (split.train, split.valid, split.test)),
        snapshot=None, split=split.retrieval,
    )
    kg_frame = pl.DataFrame(kg, schema=["head", "relation", "tail"], orient="row")
    return split, data, kg, kg_frame


@pytest.fixture(scope="module")
def trained(world):
    split, data, kg, _ = world
    torch.manual_seed(0)
    model = KGAT(U, I, ckg_of(data.train, kg), embedding_dim=16, layer_sizes=(16, 8), relation_dim=8)
    config = TrainConfig.for_model(
        "kgat", embedding_dim=16, learning_rate=0.02, batch_size=256, epochs=6, patience=50, device="cpu",
        params={"layer_sizes": (16, 8), "kg_batch_size": 64, "kg_learning_rate": 0.02, "mess_dropout": 0.0},
    )
    fit(model, data, config)
    return model


def own_facts(model: KGAT, node: int) -> list[tuple[int, int]]:
    """A node's outgoing KG edges in the model's graph, as facts."""
    h, t = model.edge_index
    keep = (h == node) & (model.edge_type >= 2)
    return list(zip(model.edge_type[keep].tolist(), t[keep].tolist()))


# ------------------------------------------------------------------ evaluation
def test_cold_only_never_ranks_a_warm_item(world) -> None:
    split, data, _, _ = world
    cold = split.cold_mask(I)
    truth = split.cold_truth(U, I).toarray()
    # warm items far above every cold item, cold truth above the other cold items
    oracle = torch.from_numpy(truth + 10.0 * (~cold)).float()
    users, top = cold_top_k(lambda u: oracle[u], data, split, k=20)
    assert len(users) == len(np.flatnonzero(truth.sum(1)))
    assert np.isin(top[top >= 0], split.cold_items).all()
    # 12 cold items, fewer than 20: each list holds all of them (none is a seen item), then -1
    assert ((top >= 0).sum(1) == 12).all() and (top[:, 12:] == -1).all()
    result = evaluate_cold(lambda u: oracle[u], data, split, ks=(5, 20))
    assert result["num_users"] == len(users) and result["num_cold_items"] == 12
    assert result["all"]["recall@5"] == 0.0  # the warm items take every slot
    assert result["cold"]["recall@20"] == pytest.approx(1.0)
    assert result["cold"]["ndcg@20"] == pytest.approx(1.0)
    # anti-oracle: the cold truth at the bottom of the cold items
    anti = torch.from_numpy(-truth + 10.0 * (~cold)).float()
    assert evaluate_cold(lambda u: anti[u], data, split, ks=(5,))["cold"]["recall@5"] == 0.0


def test_training_and_validation_items_are_masked(world) -> None:
    split, data, _, _ = world
    seen = (data.train + data.valid).toarray() > 0
    # seen items score highest; with the mask they are skipped, so the order below them decides
    scores = torch.from_numpy(seen * 100.0 + split.cold_truth(U, I).toarray()).float()
    assert evaluate_cold(lambda u: scores[u], data, split, ks=(1,))["all"]["hit@1"] == pytest.approx(1.0)
    unmasked = evaluate_cold(lambda u: scores[u], data, split, ks=(1,), mask_valid=False)["all"]["hit@1"]
    assert unmasked < 1.0  # a validation item takes the first slot


def test_data_with_cold_interactions_is_rejected(world) -> None:
    split, data, _, _ = world
    leaky = InteractionData(U, I, data.train + split.cold_truth(U, I), data.valid, data.test)
    with pytest.raises(ValueError, match="cold items"):
        evaluate_cold(random_scores(U, I), leaky, split)


# ------------------------------------------------------------------ baselines
def test_tie_break_keeps_order_and_breaks_ties() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 0.0]])
    noise = torch.tensor([[0.5, 0.9, 0.1, 0.3, 0.2]])
    ranks = tie_broken(scores, noise)
    assert ranks[0, 1] > ranks[0, 2] > ranks[0, 0] > ranks[0, 4]
    assert ranks[0, 3] == float("-inf")


def test_baselines_give_valid_rankings(world) -> None:
    split, data, kg, kg_frame = world
    users = torch.arange(U)
    pop = popularity_scores(data.train, seed=1)(users)
    counts = np.asarray(data.train.sum(0)).ravel()
    assert all(len(torch.unique(row)) == I for row in pop)  # a strict order, no ties
    hi, lo = int(np.argmax(counts)), int(split.cold_items[0])
    assert (pop[:, hi] > pop[:, lo]).all()  # cold items (count 0) below the most popular
    rnd = random_scores(U, I, seed=1)
    assert torch.equal(rnd(torch.tensor([5, 7]))[1], rnd(torch.tensor([7]))[0])  # batch-independent
    assert not torch.equal(rnd(users), random_scores(U, I, seed=2)(users))
    knn = kg_item_knn_scores(kg_frame, data.train, I + E, seed=1)(users)
    # a cold item of the user's community shares the genre entity with the user's items
    per = I // GROUPS
    for u in range(0, U, 7):
        g = u % GROUPS
        same = [c for c in split.cold_items if c // per == g]
        other = [c for c in split.cold_items if c // per != g]
        if same and other:
            assert knn[u, same].mean() > knn[u, other].mean()
    for fn in (popularity_scores(data.train), random_scores(U, I),
               kg_item_knn_scores(kg_frame, data.train, I + E),
               kg_item_knn_scores(kg_frame, data.train, I + E, aggregate="max")):
        result = evaluate_cold(fn, data, split)
        for part in ("all", "cold"):
            assert 0.0 <= result[part]["recall@20"] <= 1.0 and 0.0 <= result[part]["ndcg@20"] <= 1.0
    planted = evaluate_cold(kg_item_knn_scores(kg_frame, data.train, I + E), data, split)
    chance = evaluate_cold(random_scores(U, I), data, split)
    assert planted["cold"]["ndcg@20"] > chance["cold"]["ndcg@20"]


# ------------------------------------------------------------------ inductive KGAT
def test_inductive_vector_equals_the_models_for_a_kg_only_node(world, trained) -> None:
    split, _, kg, _ = world
    model = trained
    users, items = model.embeddings()
    inductive = InductiveKGAT(model)
    cold = split.cold_items
    facts = [own_facts(model, U + int(c)) for c in cold]
    assert all(facts)
    # the facts are what facts_from_triples derives from the KG triples
    assert sorted(facts[0]) == sorted(facts_from_triples(kg, int(cold[0]), U))
    ego = model.node_embedding.weight[U + torch.from_numpy(cold)].detach()
    torch.testing.assert_close(inductive.embed(facts, ego), items[torch.from_numpy(cold)].detach())
    one = inductive_item_embedding(model, facts[0], ego[0])
    torch.testing.assert_close(one, items[int(cold[0])].detach())
    # a warm item's vector uses its interactions too: its KG facts alone do not give it
    warm = int(np.setdiff1d(np.arange(I), cold)[0])
    warm_ego = model.node_embedding.weight[U + warm].detach().view(1, -1)
    from_facts = inductive.embed([own_facts(model, U + warm)], warm_ego)[0]
    assert not torch.allclose(from_facts, items[warm].detach())
    # the scores are KGAT's: user vectors dotted with the item vectors
    torch.testing.assert_close(model.score(torch.tensor([0, 1]))[:, cold], users[:2] @ items[cold].T)


@pytest.mark.parametrize(("aggregator", "attention"), [("bi", True), ("gcn", True), ("graphsage", False)])
def test_inductive_follows_each_aggregator(world, aggregator, attention) -> None:
    split, data, kg, _ = world
    torch.manual_seed(1)
    model = KGAT(U, I, ckg_of(data.train, kg), embedding_dim=8, layer_sizes=(6, 4, 4), aggregator=aggregator,
                 relation_dim=5, use_attention=attention)
    model.update_attention()
    nodes = [U + int(c) for c in split.cold_items[:4]]
    ego = model.node_embedding.weight[nodes].detach()
    got = InductiveKGAT(model).embed([own_facts(model, n) for n in nodes], ego)
    torch.testing.assert_close(got, model.embeddings()[1][torch.tensor(nodes) - U].detach())


def test_one_layer_model_embeds_an_item_absent_from_the_graph(world) -> None:
    """With one layer a node's vector depends on its neighbours' egos only, so a model whose graph
    lacks the item entirely gives, from the item's facts, the vector of the graph that has it."""
    split, data, kg, _ = world
    cold = split.cold_items
    without = kg[~(np.isin(kg[:, 0], cold) | np.isin(kg[:, 2], cold))]
    torch.manual_seed(2)
    full = KGAT(U, I, ckg_of(data.train, kg), embedding_dim=8, layer_sizes=(6,), relation_dim=5)
    full.update_attention()
    absent = KGAT(U, I, ckg_of(data.train, without), embedding_dim=8, layer_sizes=(6,), relation_dim=5)
    params = {k: v for k, v in full.state_dict().items() if k != "attention_weights"}
    absent.load_state_dict(params, strict=False)
    absent.update_attention()
    c = int(next(c for c in cold if c not in (3, 40)))  # not the item-item triple
    assert not own_facts(absent, U + c)
    facts = facts_from_triples(kg, c, U, skip_nodes=np.setdiff1d(cold, [c]))
    ego = full.node_embedding.weight[U + c].detach()
    expected = full.embeddings()[1][c].detach()
    torch.testing.assert_close(inductive_item_embedding(absent, facts, ego), expected)


def test_transr_ego_minimises_the_trained_energies(trained) -> None:
    model = trained
    inductive = InductiveKGAT(model, ridge=0.1)
    facts = own_facts(model, U + 0) + own_facts(model, U + 3)  # several relations, both directions
    got = inductive.ego_estimate([facts], "transr")[0].double()
    # reference: least squares of the stacked TransR residuals + the ridge towards the prior mean
    w = model.relation_weight.detach().double()
    e_r = model.relation_embedding.weight.detach().double()
    ego = model.node_embedding.weight.detach().double()
    blocks, targets = [], []
    for r, t in facts:
        rb = r ^ 1
        blocks += [w[r].T, w[rb].T]
        targets += [ego[t] @ w[r] - e_r[r], ego[t] @ w[rb] + e_r[rb]]
    a = torch.cat(blocks)
    d = a.shape[1]
    lam = 0.1 * torch.trace(a.T @ a) / d
    mu = inductive._item_mean().double()
    a = torch.cat([a, lam.sqrt() * torch.eye(d, dtype=torch.float64)])
    y = torch.cat([*targets, lam.sqrt() * mu])
    reference = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    for name in ("mean", "regress", "zero"):
        estimate = inductive.ego_estimate([facts, []], name)
        assert estimate.shape == (2, model.embedding_dim) and torch.isfinite(estimate).all()
    vectors = inductive.embed([facts, []])  # an item without facts still gets a finite vector
    assert vectors.shape == (2, model.embedding_dim + 16 + 8) and torch.isfinite(vectors).all()
    with pytest.raises(ValueError):
        inductive.embed([[(0, U + 1)]])  # interact is not a KG relation


def test_inductive_kgat_scores_cold_items_above_chance(world, trained) -> None:
    split, data, kg, kg_frame = world
    inductive = InductiveKGAT(trained)
    facts = [facts_from_triples(kg, int(c), U) for c in split.cold_items]
    best, figures = choose_ego(inductive, data, kg=kg_frame)
    assert best in figures and set(figures) == {"transr", "mean", "regress", "zero"}
    matrix = inductive.item_matrix(split.cold_items, facts, best)
    result = evaluate_cold((inductive.user_vectors, matrix), data, split)
    chance = evaluate_cold(random_scores(U, I), data, split)
    assert result["cold"]["ndcg@20"] > chance["cold"]["ndcg@20"]


@pytest.mark.parametrize(("aggregator", "attention"), [("bi", True), ("graphsage", False)])
def test_inductive_parts_embed_without_the_model(world, trained, aggregator, attention) -> None:
    """state_dict() -> from_state_dict(): the item and entity rows, the layers and the estimates'
    parameters are enough; the vectors are the model-built instance's, for every estimate."""
    split, data, kg, _ = world
    if aggregator == "bi":
        model = trained
    else:
        torch.manual_seed(3)
        model = KGAT(U, I, ckg_of(data.train, kg), embedding_dim=8, layer_sizes=(6, 4), aggregator=aggregator,
                     relation_dim=5, use_attention=attention)
        model.update_attention()
    full = InductiveKGAT(model)
    tensors, config = full.state_dict()
    assert tensors["layer_input.0"].shape[0] == I + E  # users are never a fact's node: not stored
    assert all(t.device.type == "cpu" for t in tensors.values())
    parts = InductiveKGAT.from_state_dict(tensors, config)
    assert parts.model is None and parts.dim == full.dim
    cold = split.cold_items
    facts = [own_facts(model, U + int(c)) for c in cold] + [[]]
    for name in ("transr", "mean", "regress", "zero"):
        torch.testing.assert_close(parts.embed(facts, name), full.embed(facts, name))
    ego = model.node_embedding.weight[U + torch.from_numpy(cold)].detach()
    torch.testing.assert_close(parts.embed(facts[:-1], ego), model.embeddings()[1][torch.from_numpy(cold)].detach())
    with pytest.raises(ValueError, match="needs the model"):
        parts.item_matrix(cold, facts[:-1])
