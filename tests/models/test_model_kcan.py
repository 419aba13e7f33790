"""KCAN: subgraph distillation, batched pair scoring, re-ranking and training on planted data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kgrec.models.layers.kcan_subgraph import gather_subgraph, topk_neighbour_table
from kgrec.models.rankers.kcan import KCAN, KCANConfig, build_kcan
from kgrec.models.reranking import (
    evaluate_reranking,
    kcan_scores,
    list_metrics,
    rerank,
    retrieval_candidates,
    train_kcan,
)


def _random_graph(num_nodes=12, num_edges=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, num_nodes, (num_edges,), generator=g)
    tail = torch.randint(0, num_nodes, (num_edges,), generator=g)
    score = torch.randperm(num_edges, generator=g).float()  # distinct attention
    rel = torch.randint(0, 5, (num_edges,), generator=g)
    return head, tail, score, rel


def _brute_topk(head, tail, score, rel, node, k):
    edges = [e for e in range(head.numel()) if head[e] == node]
    edges.sort(key=lambda e: (-float(score[e]), e))
    return [(int(tail[e]), int(rel[e]), float(score[e])) for e in edges[:k]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_table_keeps_exactly_the_top_attention_neighbours(k):
    head, tail, score, rel = _random_graph()
    table = topk_neighbour_table(head, tail, score, 12, k, relation=rel)
    assert table.node.shape == (12, k)
    for v in range(12):
        expected = _brute_topk(head, tail, score, rel, v, k)
        n = int(table.mask[v].sum())
        assert n == len(expected) <= k  # per-node cap
        assert table.mask[v, :n].all()
        got = [(int(table.node[v, j]), int(table.relation[v, j]), float(table.weight[v, j])) for j in range(n)]
        assert got == expected


def test_topk_ties_follow_edge_order():
    head = torch.tensor([0, 0, 0, 0])
    tail = torch.tensor([1, 2, 3, 4])
    table = topk_neighbour_table(head, tail, torch.tensor([1.0, 2.0, 2.0, 0.5]), 5, 3)
    assert table.node[0].tolist() == [2, 3, 1]


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_gather_subgraph_matches_brute_force_hops(hops):
    head, tail, score, rel = _random_graph(seed=1)
    k = 3
    table = topk_neighbour_table(head, tail, score, 12, k, relation=rel)
    roots = torch.tensor([0, 5, 7, 11])
    out = gather_subgraph(table, roots, hops)
    assert len(out) == hops  # hop count respected
    for b, root in enumerate(roots.tolist()):
        level = [(root, True)]
        for h in range(hops):
            expected = []
            for parent, alive in level:
                kept = _brute_topk(head, tail, score, rel, parent, k) if alive else []
                kept = kept + [None] * (k - len(kept))
                expected += [(t[0], True) if (t is not None) else (None, False) for t in kept]
            hop = out[h]
            assert hop.node.shape == (4, k ** (h + 1))
            for j, (node, alive) in enumerate(expected):
                assert bool(hop.mask[b, j]) == alive
                if alive:
                    assert int(hop.node[b, j]) == node
            level = [(n if n is not None else 0, a) for n, a in expected]


def test_gather_subgraph_drops_target_edge_and_refills():
    # node 0 -> 1,2,3,4 by decreasing attention; excluding (0, 1) leaves 2, 3 and refills with 4
    head = torch.tensor([0, 0, 0, 0, 1])
    tail = torch.tensor([1, 2, 3, 4, 0])
    table = topk_neighbour_table(head, tail, torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0]), 5, 4)
    out = gather_subgraph(table, torch.tensor([0, 1]), 2, k=3, exclude=(torch.tensor([0, 0]), torch.tensor([1, 1])))
    assert out[0].node[0][out[0].mask[0]].tolist() == [2, 3, 4]
    assert not out[0].mask[1].any()  # node 1's only edge is 1 -> 0, the excluded one
    assert not (out[1].mask[0] & (out[1].node[0] == 1)).any()


@pytest.fixture(scope="module")
def planted_setup(planted_data):
    from kgrec.models.config import TrainConfig
    from kgrec.models.spec import build_model
    from kgrec.models.training.pairwise import fit

    torch.set_num_threads(1)
    config = TrainConfig.for_model("bprmf", device="cpu", epochs=3, embedding_dim=16)
    retriever = build_model(config, planted_data)
    fit(retriever, planted_data, config)
    return planted_data, retriever


def _small_config(**kw):
    base = dict(embedding_dim=16, layer_sizes=(16,), relation_dim=16, neighbours_per_node=4, hops=2,
                local_dim=8, tower_dim=16, num_candidates=30, batch_size=256, epochs=8, patience=8,
                learning_rate=1e-2, dropout=0.0, mess_dropout=0.0)
    base.update(kw)
    return KCANConfig(**base)


def test_batched_forward_equals_single_pair_forwards(planted_data):
    torch.manual_seed(0)
    model = build_kcan(_small_config(), planted_data)
    model.eval()
    users = torch.full((25,), 7)
    items = torch.randperm(planted_data.num_items)[:25]
    with torch.no_grad():
        batched = model.score_pairs(users, items)
        single = torch.stack([model.score_pairs(users[j : j + 1], items[j : j + 1])[0] for j in range(25)])
    assert batched.shape == (25,)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_rerank_output_is_a_permutation_of_the_candidates(planted_setup):
    data, retriever = planted_setup
    model = build_kcan(_small_config(), data)
    users, cands, scores = retrieval_candidates(retriever, data, "valid", 30)
    for arg in (cands, (cands, scores), None):
        if arg is None:  # full scores
            with torch.no_grad():
                full = retriever.score(users)
            out = rerank(model, full, users, n=30, alpha=0.5)
            ref = torch.topk(full, 30, dim=1).indices
        else:
            out = rerank(model, arg, users, alpha=1.0 if isinstance(arg, torch.Tensor) else 0.5)
            ref = cands
        assert out.shape == ref.shape
        assert torch.equal(out.sort(1).values, ref.sort(1).values)


def test_save_load_roundtrip(tmp_path, planted_data):
    model = build_kcan(_small_config(), planted_data)
    model.save(tmp_path / "kcan", extra={"alpha": 0.3})
    loaded = KCAN.load(tmp_path / "kcan")
    users, items = torch.arange(10), torch.arange(10)
    torch.testing.assert_close(kcan_scores(model, users, items.view(10, 1)), kcan_scores(loaded, users, items.view(10, 1)))
    assert loaded.meta["extra"]["alpha"] == 0.3


def test_training_on_planted_data_improves_reranked_ndcg(planted_setup):
    data, retriever = planted_setup
    config = _small_config()
    untrained = build_kcan(config, data)
    torch.manual_seed(config.seed)
    untrained.reset_parameters()
    before = evaluate_reranking(retriever, untrained, data, "valid", N=30, ks=(10,), alpha=1.0)
    model, result = train_kcan(data, retriever, config)
    after = evaluate_reranking(retriever, model, data, "valid", N=30, ks=(10,), alpha=1.0)
    assert result.history and result.best_epoch >= 1
    assert after["kcan"]["ndcg@10"] > before["kcan"]["ndcg@10"] + 0.05
    assert 0.0 <= result.best_valid["alpha"] <= 1.0


def test_list_metrics_match_full_ranking_evaluation(planted_setup):
    from kgrec.models.evaluation import evaluate_split

    data, retriever = planted_setup
    users, cands, _ = retrieval_candidates(retriever, data, "test", 40)
    ours = list_metrics(cands, users, data.test, (20,))
    ref = evaluate_split(retriever, data, "test", ks=(20,))
    assert ours["recall@20"] == pytest.approx(ref["recall@20"], abs=1e-9)
    assert ours["ndcg@20"] == pytest.approx(ref["ndcg@20"], abs=1e-9)
    assert np.isfinite(ours["ndcg@20"])


def test_global_layer_starts_from_a_trained_kgat(planted_data):
    from kgrec.models.retrievers.kgat import KGAT, interaction_ckg

    config = _small_config()
    ckg = interaction_ckg(planted_data)
    kgat = KGAT(planted_data.num_users, planted_data.num_items, ckg, embedding_dim=16, layer_sizes=(16,),
                relation_dim=16)
    torch.nn.init.normal_(kgat.node_embedding.weight)  # unlike KCAN's own initialisation
    kgat.update_attention()
    model = build_kcan(config, planted_data)
    model.init_global(kgat)
    torch.testing.assert_close(model.kgat.node_embedding.weight, kgat.node_embedding.weight)
    torch.testing.assert_close(model.kgat.attention_weights, kgat.attention_weights)
    other = KGAT(planted_data.num_users, planted_data.num_items,
                 interaction_ckg(planted_data.__class__(**{**planted_data.__dict__, "train": planted_data.valid})),
                 embedding_dim=16, layer_sizes=(16,), relation_dim=16)
    with pytest.raises(ValueError, match="another CKG"):
        model.init_global(other)
