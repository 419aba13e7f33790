"""Multi-interest models: interest counts, planted-interest recovery, metrics, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kgrec.features.sequences import SequenceSplit
from kgrec.models.sequential.comirec_dr import ComiRecDR
from kgrec.models.sequential.comirec_sa import ComiRecSA
from kgrec.models.sequential.config import SequentialModelConfig
from kgrec.models.sequential.interest_mixture import InterestMixture
from kgrec.models.sequential.mind import MIND
from kgrec.models.sequential.multi_interest import (
    dynamic_interest_count,
    load_model,
    pad_histories,
    recommend,
    save_model,
    squash,
)
from kgrec.models.sequential.youtube_dnn import YouTubeDNN
from kgrec.models.sequential_evaluation import (
    Popularity,
    category_matrix,
    diversity,
    evaluate_sequential,
    interest_similarity,
    ranking_metrics,
)
from kgrec.models.training.sequential import (
    fit_sequential,
    seen_mask,
    sliding_windows,
    training_samples,
    window_targets,
)
from kgrec.models.training.trainer import torch_threads


def train_config(**overrides) -> SequentialModelConfig:
    """A sequential training config with the loop defaults these tests were written for."""
    return SequentialModelConfig(**{"learning_rate": 3e-3, "num_negatives": 256, **overrides})


def test_dynamic_interest_count_and_mind_masks() -> None:
    lengths = torch.tensor([1, 2, 3, 4, 7, 8, 15, 16, 20, 100])
    # K' = max(1, min(K, floor(log2 n)))
    assert dynamic_interest_count(lengths, 4).tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert dynamic_interest_count(lengths, 2).tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    torch.manual_seed(0)
    model = MIND(30, 8, num_interests=4, max_length=20).eval()
    histories = [list(range(n)) for n in (1, 2, 4, 8, 16, 25)]
    h, n = pad_histories(histories, model.max_length)
    assert n.tolist() == [1, 2, 4, 8, 16, 20]
    v, mask = model.interests(h, n)
    assert mask.sum(1).tolist() == [1, 1, 2, 3, 4, 4]
    assert torch.all(v[~mask] == 0) and torch.all(v[mask].norm(dim=-1) > 0)
    # deterministic in eval mode
    assert torch.equal(model.interests(h, n)[0], v)
    for cls in (ComiRecDR, ComiRecSA):
        v, mask = cls(30, 8, num_interests=3).interests(h, n)
        assert v.shape == (6, 3, 8) and mask.all()


def test_squash_norm_below_one() -> None:
    x = torch.randn(10, 5) * torch.logspace(-2, 2, 10)[:, None]
    norms = squash(x).norm(dim=-1)
    expected = x.norm(dim=-1) ** 2 / (1 + x.norm(dim=-1) ** 2)
    assert torch.allclose(norms, expected, atol=1e-5)


def test_pad_histories_and_samples() -> None:
    h, n = pad_histories([[5, 6, 7], [], [1, 2, 3, 4, 5]], 4)
    assert h.tolist() == [[5, 6, 7, 0], [0, 0, 0, 0], [2, 3, 4, 5]] and n.tolist() == [3, 0, 4]
    hist, lengths, targets = training_samples([np.array([1, 2, 3, 4]), np.array([9, 8])], max_length=2)
    assert targets.tolist() == [2, 3, 4, 8]
    assert lengths.tolist() == [1, 2, 2, 1]
    assert hist.tolist() == [[1, 0], [1, 2], [2, 3], [9, 0]]


def _planted_split(seed: int = 0) -> tuple[SequenceSplit, list[np.ndarray]]:
    """Four item groups of five items; every user has two random groups and alternates between
    them at random, so the history tells the two groups and one vector cannot sit close to both."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(5 * g, 5 * g + 5) for g in range(4)]

    def seq(n: int) -> np.ndarray:
        mine = rng.choice(4, 2, replace=False)
        return np.array([rng.choice(groups[mine[int(rng.integers(2))]]) for _ in range(n)])

    train = [seq(20) for _ in range(200)]
    held = [seq(20) for _ in range(30)]
    split = SequenceSplit(
        num_users=230, num_items=20, train_users=np.arange(200), train_sequences=train,
        valid_users=np.arange(200, 230), valid_inputs=[s[:16] for s in held], valid_targets=[s[16:] for s in held],
        test_users=np.arange(0), test_inputs=[], test_targets=[], seed=seed,
    )
    return split, groups


@pytest.mark.parametrize(
    "cls, options",
    [
        (ComiRecDR, {}),
        (ComiRecSA, {}),
        (MIND, {}),
        (ComiRecSA, {"readout": "mixture", "normalize_interests": True}),
        (ComiRecDR, {"readout": "mixture"}),
        (ComiRecSA, {"readout": "max"}),
        (ComiRecDR, {"readout": "max"}),
    ],
    ids=["comirec_dr", "comirec_sa", "mind", "comirec_sa-mixture", "comirec_dr-mixture", "comirec_sa-max",
         "comirec_dr-max"],
)
def test_planted_interests_are_recovered(cls, options) -> None:
    split, groups = _planted_split()
    model = cls(20, embedding_dim=8, num_interests=2, max_length=20, temperature=0.1, **options)
    # the mixture readout is trained as it is benchmarked: exact softmax over every item
    negatives = 0 if options.get("readout") == "mixture" else 19
    config = train_config(epochs=10, patience=10, num_negatives=negatives, batch_size=128,
                                   learning_rate=1e-2, ks=(5,), selection_metric="recall@5", seed=1)
    with torch_threads(1):  # tiny tensors: extra threads only add contention on shared CPUs
        fit_sequential(model, split, config)
    items = model.item_embeddings().detach()
    with torch.no_grad():
        for a, b in [(0, 1), (2, 3), (1, 3)]:
            history = np.concatenate([groups[a], groups[b]]).tolist()
            v, mask = model.interests(*pad_histories([history], 20))
            assert mask.all()
            centroids = torch.stack([items[groups[a]].mean(0), items[groups[b]].mean(0)])
            cos = torch.nn.functional.cosine_similarity(v[0][:, None, :], centroids[None], dim=-1)  # [K, 2]
            closest = cos.argmax(0).tolist()  # the interest closest to each planted group
            assert closest[0] != closest[1], f"groups {a} and {b} share interest {closest[0]}: {cos}"


def test_mixture_readout_loss_is_the_mixture_of_softmaxes_and_trains_every_interest() -> None:
    torch.manual_seed(0)
    model = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5, readout="mixture")
    h, n = pad_histories([[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]], 6)
    targets = torch.tensor([13, 14, 15])
    every_item = torch.arange(30)
    loss = model.loss(h, n, targets, every_item)
    v, _ = model.interests(h, n)
    p = torch.softmax(v @ model.item_embeddings().T / 0.5, dim=-1)  # [B, K, I]: one softmax per interest
    expected = -torch.log(p[torch.arange(3), :, targets].mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    # every interest's attention head gets gradient (the hard readout trains only the winner's)
    assert (model.w2.weight.grad.abs().sum(1) > 0).all()
    # the exact-softmax hard readout is the cross-entropy over the catalogue of the best interest
    hard = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5)
    hard.load_state_dict(model.state_dict())
    v, _ = hard.interests(h, n)
    logits = v @ hard.item_embeddings().T / 0.5
    best = logits[torch.arange(3), :, targets].argmax(1)
    expected = torch.nn.functional.cross_entropy(logits[torch.arange(3), best], targets)
    assert hard.loss(h, n, targets, every_item).item() == pytest.approx(expected.item(), rel=1e-5)


def test_max_readout_is_the_softmax_of_the_max_merge_score() -> None:
    torch.manual_seed(4)
    model = ComiRecSA(30, embedding_dim=8, num_interests=3, max_length=6, temperature=0.5, readout="max")
    h, n = pad_histories([[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]], 6)
    targets, every_item = torch.tensor([13, 14, 15]), torch.arange(30)
    loss = model.loss(h, n, targets, every_item)
    v, _ = model.interests(h, n)
    served = (v @ model.item_embeddings().T).amax(1) / 0.5  # [B, I]: what the max merge ranks by
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(served, targets).item(), rel=1e-5)
    loss.backward()
    # every interest that tops some item's score gets gradient, not only the target's winner
    winners = (v @ model.item_embeddings().T).argmax(1).unique()
    assert len(winners) > 1 and (model.w2.weight.grad.abs().sum(1)[winners] > 0).all()


@pytest.mark.parametrize("readout", ["hard", "mixture", "max"])
def test_seen_items_leave_the_softmax(readout: str) -> None:
    torch.manual_seed(5)
    model = ComiRecSA(30, embedding_dim=8, num_interests=2, max_length=6, temperature=0.5, readout=readout)
    h, n = pad_histories([[1, 2, 3], [4, 5, 6, 7]], 6)
    targets, every_item = torch.tensor([8, 9]), torch.arange(30)
    seen = torch.zeros(2, 30, dtype=torch.bool)
    seen[0, [1, 2, 3, 20]] = True  # item 20: seen before the window, still never a candidate
    seen[1, [4, 5, 6, 7]] = True
    # the masked loss equals the loss over a catalogue without each row's seen items
    masked = model.loss(h, n, targets, every_item, seen=seen)
    rows = [model.loss(h[b : b + 1], n[b : b + 1], targets[b : b + 1], every_item[~seen[b]]) for b in range(2)]
    assert masked.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    assert masked.item() < model.loss(h, n, targets, every_item).item()


def test_seen_mask_and_window_targets() -> None:
    sequences = [np.array([5, 6, 7, 8]), np.array([1, 2, 3])]
    hist, lengths, flat, pos, ahead, start = sliding_windows(sequences, max_length=2)
    assert flat[pos].tolist() == [6, 7, 8, 2, 3] and ahead.tolist() == [3, 2, 1, 2, 1]
    mask = seen_mask(torch.from_numpy(flat), torch.from_numpy(start), torch.from_numpy(pos), 10)
    # every item before the target, beyond the 2-item window too (row 2: 5, 6, 7)
    assert [np.flatnonzero(row).tolist() for row in mask.numpy()] == [[5], [5, 6], [5, 6, 7], [1], [1, 2]]
    gen = torch.Generator().manual_seed(0)
    flat_t, pos_t = torch.from_numpy(flat), torch.from_numpy(pos)
    reach = torch.from_numpy(np.minimum(ahead, 2))
    drawn = torch.stack([window_targets(flat_t, pos_t, reach, gen) for _ in range(200)])
    # each sample draws from its next two items, never past the end of its own sequence
    assert [sorted(set(col.tolist())) for col in drawn.T] == [[6, 7], [7, 8], [8], [2, 3], [3]]
    assert window_targets(flat_t, pos_t, torch.ones_like(reach), gen).tolist() == flat[pos].tolist()


def test_fit_with_seen_masking_and_a_target_window_learns() -> None:
    # two of four groups of ten items per user, each item at most once (as in MovieLens): the
    # targets are the user's groups' items not seen yet, 4 of the 8 left in their two groups
    rng = np.random.default_rng(0)
    groups = np.arange(40).reshape(4, 10)
    sequences = [rng.permutation(groups[rng.choice(4, 2, replace=False)].ravel())[:16] for _ in range(230)]
    split = SequenceSplit(
        num_users=230, num_items=40, train_users=np.arange(200), train_sequences=sequences[:200],
        valid_users=np.arange(200, 230), valid_inputs=[q[:12] for q in sequences[200:]],
        valid_targets=[q[12:] for q in sequences[200:]], test_users=np.arange(0), test_inputs=[],
        test_targets=[], seed=0,
    )
    config = train_config(epochs=6, patience=6, num_negatives=0, batch_size=128, learning_rate=1e-2,
                                   ks=(5,), selection_metric="recall@5", seed=1, mask_seen=True, target_window=4)
    torch.manual_seed(1)
    model = ComiRecSA(40, embedding_dim=8, num_interests=2, max_length=20, readout="max")
    before = evaluate_sequential(model, split.valid_inputs, split.valid_targets, ks=(5,))["recall@5"]
    result = fit_sequential(model, split, config)
    # random ranking of the 28 unseen items finds 5/28 of the targets; the groups' 8 hold all 4
    assert before < 0.3 and result.best_valid["recall@5"] > 0.5
    with pytest.raises(ValueError, match="target_window"):
        train_config(target_window=0)  # validated where the config is made


def test_decorrelation_penalty_is_the_mean_squared_cosine_between_interests() -> None:
    torch.manual_seed(2)
    model = MIND(30, embedding_dim=8, num_interests=3, max_length=8, temperature=0.5)
    # lengths 1 / 4 / 8 -> MIND keeps 1 / 2 / 3 interests: the single-interest user has no pair
    h, n = pad_histories([[1], [2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13]], 8)
    targets, every_item = torch.tensor([20, 21, 22]), torch.arange(30)
    torch.manual_seed(3)
    base = model.loss(h, n, targets, every_item)
    torch.manual_seed(3)  # MIND draws its routing logits: same draw for both losses
    penalised = model.loss(h, n, targets, every_item, decorrelation=2.0)
    torch.manual_seed(3)
    with torch.no_grad():
        v, mask = model.interests(h, n)
    unit = torch.nn.functional.normalize(v, dim=-1)
    cos2 = [(unit[b, :k] @ unit[b, :k].T).pow(2) for b, k in ((1, 2), (2, 3))]
    per_user = [(c.sum() - c.diagonal().sum()) / (c.shape[0] * (c.shape[0] - 1)) for c in cos2]
    assert mask.sum(1).tolist() == [1, 2, 3]
    assert (penalised - base).item() == pytest.approx(2.0 * float(sum(per_user)) / 2, rel=1e-4)


def test_mixture_merge_ranks_by_the_models_mixture_probability() -> None:
    torch.manual_seed(1)
    model = ComiRecSA(40, embedding_dim=8, num_interests=3, max_length=10, temperature=0.3, readout="mixture",
                      merge_rule="mixture", normalize_interests=True).eval()
    histories = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    merged = recommend(model, histories, 12)
    with torch.no_grad():
        v, _ = model.interests(*pad_histories(histories, 10))
        assert torch.allclose(v.norm(dim=-1), torch.ones(3, 3), atol=1e-5)
        log_p = torch.logsumexp(torch.log_softmax(v @ model.item_embeddings().T / 0.3, -1), 1) - np.log(3)
    for row, history in enumerate(histories):
        log_p[row, history] = float("-inf")
        top = torch.topk(log_p[row], 12)
        assert merged.items[row].tolist() == top.indices.tolist()
        np.testing.assert_allclose(merged.scores[row], top.values.numpy(), rtol=1e-4)
    # served with "max" instead, the same model ranks by something else
    assert recommend(model, histories, 12, rule="max").items.tolist() != merged.items.tolist()


def test_exact_softmax_training_when_num_negatives_is_zero() -> None:
    split, _ = _planted_split()
    model = YouTubeDNN(20, embedding_dim=8, max_length=20)
    config = train_config(epochs=3, patience=3, num_negatives=0, batch_size=128, learning_rate=1e-2,
                                   ks=(5,), selection_metric="recall@5", seed=1)
    result = fit_sequential(model, split, config)
    losses = [h.loss for h in result.history]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="num_negatives"):
        train_config(num_negatives=-1)


def test_diversity_hand_example() -> None:
    cats, names = category_matrix([["A"], ["A", "B"], ["C"], []])
    assert names == ["A", "B", "C"]
    # pairs of [0, 1, 2]: (0,1) share A; (0,2) and (1,2) disjoint -> 2/3
    assert diversity(np.array([[0, 1, 2]]), cats)[0] == pytest.approx(2 / 3)
    # item 3 has no genre: disjoint from everything; padding (-1) ignored
    assert diversity(np.array([[0, 3, -1]]), cats)[0] == pytest.approx(1.0)
    assert diversity(np.array([[0, 1, -1]]), cats)[0] == pytest.approx(0.0)
    assert np.isnan(diversity(np.array([[0, -1, -1]]), cats)[0])


def test_ranking_metrics_and_interest_similarity() -> None:
    m = ranking_metrics(np.array([[1, 2, 3, 4]]), [[2, 9]], ks=(2, 4))
    assert m["recall@2"][0] == pytest.approx(0.5) and m["hit@2"][0] == 1.0
    assert m["ndcg@2"][0] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    v = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    sim = interest_similarity(v, np.array([[True, True, False]]))
    assert sim[0] == pytest.approx(0.0)
    sim = interest_similarity(v, np.array([[True, False, True]]))
    assert sim[0] == pytest.approx(np.sqrt(0.5))


def test_recommend_masks_history_and_save_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MIND(40, 8, num_interests=3, max_length=5)
    histories = [list(range(i, i + 12)) for i in range(0, 20, 4)]
    out = recommend(model, histories, 10)
    for row, hist in enumerate(histories):
        items = out.row(row)[0]
        assert len(items) == 10 and not set(items.tolist()) & set(hist)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    again = recommend(loaded, histories, 10)
    assert np.array_equal(out.items, again.items) and np.array_equal(out.interest, again.interest)
    v, mask = loaded.interests_for(histories[0])
    assert v.shape == (3, 8) and mask.tolist() == [True, True, False]  # window 5: floor(log2 5) = 2


def test_mixture_and_popularity_through_the_evaluator() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 6)).astype(np.float32)
    mix = InterestMixture(30, 6, num_clusters=4, top_components=2, alpha=0.5, seed=1).fit(vectors)
    h, n = pad_histories([[0, 1, 2, 3, 4]], 20)
    pi = mix.mixture_weights(h, n)
    assert pi.sum().item() == pytest.approx(1.0)
    v, mask = mix.interests(h, n)
    assert mask.sum().item() == 2
    inputs = [np.arange(5), np.arange(10, 18)]
    targets = [np.array([20, 21]), np.array([1])]
    cats, _ = category_matrix([["x"] if i % 2 else ["y"] for i in range(30)])
    res = evaluate_sequential(mix, inputs, targets, cats, ks=(5, 10), diversity_k=10)
    assert res["num_users"] == 2 and 0 <= res["diversity@10"] <= 1
    pop = Popularity.from_sequences([np.array([3, 3, 3, 4, 4, 5])], 30)
    top = recommend(pop, [[4]], 3).items[0].tolist()
    assert top[:2] == [3, 5]  # 4 is in the history
    ydnn = YouTubeDNN(30, 6, hidden_dim=8)
    assert evaluate_sequential(ydnn, inputs, targets, ks=(5,), diversity_k=5)["num_users"] == 2


def test_item_prior_init_and_regularisation() -> None:
    torch.manual_seed(0)
    model = ComiRecSA(10, 4, num_interests=2)
    prior = np.arange(40, dtype=np.float32).reshape(10, 4)
    present = np.array([True] * 5 + [False] * 5)
    before = model.item_embedding.weight.detach().clone()
    assert model.set_item_prior(prior, present, reg_weight=0.5) == 5
    after = model.item_embedding.weight.detach()
    assert torch.equal(after[5:], before[5:])
    cos = torch.nn.functional.cosine_similarity(after[:5], torch.from_numpy(prior[:5]), dim=-1)
    assert torch.allclose(cos, torch.ones(5))
    h, n = pad_histories([[1, 2, 3]], 5)
    loss = model.loss(h, n, torch.tensor([4]), torch.tensor([0, 7]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError):
        model.set_item_prior(prior[:, :2], present)


def test_mixture_locality_interpolates_between_the_global_and_the_local_queries() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((40, 6)).astype(np.float32)
    h, n = pad_histories([[0, 5, 9, 13, 21, 30]], 20)
    mean = torch.from_numpy(vectors[[0, 5, 9, 13, 21, 30]].mean(0))
    queries = {}
    for lam in (0.0, 0.25, 1.0):
        mix = InterestMixture(40, 6, num_clusters=4, top_components=4, seed=1, locality=lam).fit(vectors)
        queries[lam], mask = mix.interests(h, n)
    assert mask.all()
    # lambda = 0: every component asks the single-vector (mean-pooling) question
    torch.testing.assert_close(queries[0.0][0], mean.expand(4, 6))
    # and in between it is the convex combination of the two
    torch.testing.assert_close(queries[0.25], 0.75 * queries[0.0] + 0.25 * queries[1.0])
    assert not torch.allclose(queries[1.0][0, 0], queries[1.0][0, 1])
    with pytest.raises(ValueError, match="locality"):
        InterestMixture(40, 6, locality=1.5)


@pytest.mark.parametrize("readout", ["hard", "max", "mixture"])
def test_log_q_correction_shifts_every_logit(readout) -> None:
    torch.manual_seed(0)
    model = ComiRecSA(30, embedding_dim=8, num_interests=2, max_length=6, readout=readout)
    h, n = pad_histories([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 6)
    targets, negatives = torch.tensor([10, 11, 12]), torch.tensor([3, 10, 20, 21, 22, 25])
    plain = model.loss(h, n, targets, negatives)
    # a uniform proposal shifts every logit by the same constant: the softmax is unchanged
    assert torch.allclose(model.loss(h, n, targets, negatives, log_q=torch.full((30,), -3.4)), plain, atol=1e-5)
    # a popularity proposal: every logit s_j becomes s_j - log Q(j), so the loss moves
    log_q = torch.log_softmax(torch.randn(30), 0)
    corrected = model.loss(h, n, targets, negatives, log_q=log_q)
    assert torch.isfinite(corrected) and not torch.allclose(corrected, plain, atol=1e-4)
    # REMI's hard-negative weights assume uniform draws: no correction there
    with pytest.raises(ValueError, match="uniform negatives"):
        model.loss(h, n, targets, negatives, hard_negative_beta=1.0, log_q=log_q)


def test_the_catalogue_size_chooses_the_softmax_and_the_run_says_so() -> None:
    split, _ = _planted_split()
    config = SequentialModelConfig(learning_rate=1e-2, epochs=6, patience=6, batch_size=128, ks=(5,),
                                   selection_metric="recall@5", seed=1, exact_softmax_max_items=10,
                                   sampled_negatives=8)
    assert config.num_negatives is None and config.softmax(20) == (8, "popularity")
    model = YouTubeDNN(20, embedding_dim=8, max_length=20)
    with torch_threads(1):
        result = fit_sequential(model, split, config)
    assert result.settings == {"softmax": "popularity", "softmax_negatives": 8}
    # with 8 of 20 items per batch it learns as well as the exact softmax on the same data
    exact = config.model_copy(update={"exact_softmax_max_items": 20})
    assert exact.softmax(20) == (0, "exact")
    with torch_threads(1):
        reference = fit_sequential(YouTubeDNN(20, embedding_dim=8, max_length=20), split, exact)
    assert reference.settings == {"softmax": "exact", "softmax_negatives": 0}
    assert result.best_valid["recall@5"] >= 0.9 * reference.best_valid["recall@5"] > 0
    assert result.history[-1].loss < result.history[0].loss
    assert SequentialModelConfig(num_negatives=8).softmax(20) == (8, "uniform")
    with pytest.raises(ValueError, match="assume uniform negatives"):
        SequentialModelConfig(model="comirec_sa_remi", hard_negative_beta=1.0, negative_sampler="popularity")
