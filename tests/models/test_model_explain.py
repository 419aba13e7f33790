"""Path explanations: every returned path exists in the graph and the ranking matches brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from kgrec.models.explain import AttentionGraph

U, I, E = 6, 8, 5
NAMES = ["interact", "rev_interact", "genre", "rev_genre", "similar", "rev_similar"]


def _random_graph(seed: int) -> AttentionGraph:
    rng = np.random.default_rng(seed)
    edges = set()
    for u in range(U):  # interactions, both directions
        for j in rng.choice(I, size=3, replace=False):
            edges |= {(u, U + j, 0), (U + j, u, 1)}
    for j in range(I):  # item -> entity and back
        for e in rng.choice(E, size=2, replace=False):
            edges |= {(U + j, U + I + e, 2), (U + I + e, U + j, 3)}
    for j, k in rng.choice(I, size=(6, 2)):  # item -> item
        if j != k:
            edges |= {(U + j, U + k, 4), (U + k, U + j, 5)}
    heads, tails, types = map(np.array, zip(*sorted(edges)))
    # attention: softmax over each head's out-edges
    logits = rng.normal(size=len(heads))
    att = np.exp(logits)
    att /= np.bincount(heads, weights=att, minlength=U + I + E)[heads]
    return AttentionGraph(heads, tails, types, att.astype(np.float32), U, I, E, NAMES,
                          [f"e{k}" for k in range(E)])


def _brute_force(g: AttentionGraph, user: int, item: int) -> list[float]:
    out = {}
    for h, t, a in zip(g.heads, g.tails, g.attention):
        out.setdefault(int(h), []).append((int(t), float(a)))
    target = U + item
    scores = []
    for j, a1 in out.get(user, []):
        for x, a2 in out.get(j, []):
            if x == target:
                scores.append(a1 * a2)
            elif x != user:
                scores += [a1 * a2 * a3 for y, a3 in out.get(x, []) if y == target]
    return sorted(scores, reverse=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_paths_match_brute_force_and_exist_in_the_graph(seed):
    g = _random_graph(seed)
    edges = {(int(h), NAMES[int(r)], int(t)) for h, t, r in zip(g.heads, g.tails, g.edge_type)}
    offset = {"user": 0, "item": U, "entity": U + I}
    checked = 0
    for user, item in itertools.product(range(U), range(I)):
        paths = g.explain(user, item, max_paths=4)
        expected = _brute_force(g, user, item)[:4]
        assert [p.score for p in paths] == pytest.approx(expected, rel=1e-5)
        for path in paths:
            node, score = user, 1.0
            for step in path.steps:
                nxt = offset[step.node_type] + step.node
                assert (node, step.relation, nxt) in edges
                node, score = nxt, score * step.attention
            assert node == U + item
            assert score == pytest.approx(path.score, rel=1e-5)
            checked += 1
    assert checked > 20


def test_save_and_load_round_trip(tmp_path):
    g = _random_graph(3)
    g.save(tmp_path / "explain")
    h = AttentionGraph.load(tmp_path / "explain")
    assert h.explain(1, 2) == g.explain(1, 2)
    assert h.relation_names == NAMES and h.entity_ids == g.entity_ids


def test_out_of_range_ids_are_rejected():
    with pytest.raises(IndexError):
        _random_graph(0).explain(U, 0)
