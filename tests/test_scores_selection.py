"""Uncertainty scores, batch selection and the stopping signal (pure numpy)."""
import numpy as np
import pytest

from lcls_dl.active import scores, selection, stopping
from lcls_dl.errors import InputError


def _pool(seed=0, n=50):
    """n confident 2-class frames plus one ambiguous frame at position 17."""
    rng = np.random.default_rng(seed)
    p1 = rng.uniform(0.9, 0.999, n)
    cls = rng.integers(0, 2, n)
    probs = np.where(cls[:, None] == 0, np.c_[p1, 1 - p1], np.c_[1 - p1, p1])
    probs[17] = [0.5, 0.5]
    return probs


@pytest.mark.parametrize("name", ["least-confidence", "margin", "entropy"])
def test_ambiguous_frame_ranks_first(name):
    probs = _pool()
    s = scores.score(name, probs=probs)
    assert s.shape == (len(probs),)
    assert int(np.argmax(s)) == 17
    assert (s[17] > np.delete(s, 17)).all()
    # monotone: a more confident frame scores lower
    s2 = scores.score(name, probs=np.array([[0.6, 0.4], [0.8, 0.2], [0.95, 0.05]]))
    assert s2[0] > s2[1] > s2[2]


def test_three_class_margin_and_entropy_differ_sensibly():
    p = np.array([[0.45, 0.45, 0.10], [0.40, 0.30, 0.30], [0.98, 0.01, 0.01]])
    m = scores.margin(p)
    e = scores.entropy(p)
    assert m[0] == pytest.approx(1.0) and m[0] > m[1] > m[2]  # tie of top two = max margin
    assert e[1] > e[0] > e[2]  # entropy prefers the flatter distribution
    assert scores.least_confidence(p)[1] == pytest.approx(0.6)


def test_bald_high_when_mc_passes_disagree():
    agree = np.tile(np.array([[0.5, 0.5]]), (10, 1, 1))  # ambiguous but consistent
    flip = np.array([[[0.99, 0.01]], [[0.01, 0.99]]] * 5).reshape(10, 1, 2)
    confident = np.tile(np.array([[0.99, 0.01]]), (10, 1, 1))
    mc = np.concatenate([agree, flip, confident], axis=1)  # (T=10, N=3, C=2)
    b = scores.bald(mc)
    assert b[1] > 0.5 and b[1] > 10 * b[0] and b[1] > 10 * b[2]
    assert b[0] == pytest.approx(0, abs=1e-9)
    # entropy of the mean cannot tell 'ambiguous frame' from 'uncertain weights'
    assert scores.entropy(mc.mean(0))[0] >= scores.entropy(mc.mean(0))[1] - 1e-6


def test_ensemble_disagreement():
    agree = np.array([[[0.9, 0.1], [0.8, 0.2]]] * 3)  # (M=3, N=2, C=2)
    members = agree.copy()
    members[1, 1] = [0.1, 0.9]
    for kind in ("kl", "vote"):
        d = scores.ensemble_disagreement(members, kind=kind)
        assert d[1] > d[0] and d[0] == pytest.approx(0, abs=1e-2)
    with pytest.raises(InputError):
        scores.score("ensemble", member_probs=members[:1])
    with pytest.raises(InputError, match="mc-passes"):
        scores.score("bald", probs=_pool())


def test_scores_reject_bad_input():
    with pytest.raises(InputError):
        scores.least_confidence(np.array([0.5, 0.5]))
    with pytest.raises(InputError):
        scores.margin(np.array([[np.nan, 0.5]]))


def _clusters(seed=0, per=30):
    """Three tight, well separated clusters; cluster 0 holds the most frames (duplicates)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0], [10, 0], [0, 10]], float)
    sizes = [per * 3, per, per]
    emb = np.concatenate([c + 0.1 * rng.standard_normal((s, 2)) for c, s in zip(centers, sizes)])
    which = np.repeat([0, 1, 2], sizes)
    return emb, which


def test_k_center_picks_from_separate_clusters():
    emb, which = _clusters()
    picks = selection.k_center_greedy(emb, 3, seed=1)
    assert len(set(picks.tolist())) == 3
    assert sorted(which[picks].tolist()) == [0, 1, 2]
    # with labeled frames in clusters 0 and 1, the single next pick comes from cluster 2
    one = selection.k_center_greedy(emb, 1, initial=emb[[0, 95]])
    assert which[one[0]] == 2


def test_top_k_diverse_avoids_duplicates():
    emb, which = _clusters()
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 0.1, len(emb))
    s[which == 0] += 0.5  # the duplicates of cluster 0 are the most uncertain ...
    s[which == 1] += 0.45
    s[which == 2] += 0.44
    plain = selection.top_k(s, 3)
    assert set(which[plain].tolist()) == {0}  # ... so plain top-k wastes the batch
    diverse = selection.top_k_diverse(s, emb, 3, factor=200)
    assert sorted(which[diverse].tolist()) == [0, 1, 2]
    assert diverse[0] == plain[0]  # most uncertain frame still first


def test_badge_and_kmeans_pp_spread_and_prefer_uncertain():
    emb, which = _clusters()
    n = len(emb)
    probs = np.tile([0.99, 0.01], (n, 1))
    probs[which == 2] = [0.55, 0.45]  # uncertain cluster
    g = selection.badge_embeddings(probs, emb + 1.0)
    assert g.shape == (n, 4)
    picks = selection.kmeans_pp(g, 3, seed=0)
    assert len(set(picks.tolist())) == 3
    assert which[picks[0]] == 2  # largest gradient norm first
    w = scores.least_confidence(probs)
    wp = selection.kmeans_pp(emb, 3, weights=w, seed=3)
    assert which[wp[0]] == 2


def test_selection_is_deterministic_given_seed():
    emb, _ = _clusters(per=40)
    w = np.random.default_rng(5).random(len(emb))
    for fn in (lambda s: selection.kmeans_pp(emb, 10, weights=w, seed=s),
               lambda s: selection.random_batch(len(emb), 10, seed=s),
               lambda s: selection.k_center_greedy(emb, 10, seed=s)):
        assert (fn(7) == fn(7)).all()
    r7, r8 = (selection.random_batch(len(emb), 10, s) for s in (7, 8))
    assert not (r7 == r8).all()


def test_class_balanced_split():
    pred = np.array([0] * 90 + [1] * 8 + [2] * 2)
    s = np.random.default_rng(0).random(100)
    picks = selection.class_balanced(lambda pos, k: selection.top_k(s[pos], k), pred, 12, 3)
    counts = np.bincount(pred[picks], minlength=3)
    assert counts.sum() == 12 and len(set(picks.tolist())) == 12
    assert counts[2] == 2 and counts[1] == 5 and counts[0] == 5
    # within a class, the highest scores are taken
    cls1 = np.flatnonzero(pred == 1)
    assert set(picks[pred[picks] == 1]) == set(cls1[np.argsort(-s[cls1])[:5]])


def test_stopping_signal():
    p = np.array([[0.99, 0.01]] * 95 + [[0.6, 0.4]] * 5)
    first = stopping.stopping_signal(p)
    assert first["kappa"] is None and not first["stop"]
    assert first["uncertain_share"] == pytest.approx(0.05)
    same = stopping.stopping_signal(p, previous_pred=p.argmax(1))
    assert same["kappa"] == pytest.approx(1.0) and same["stop"]
    prev = p.argmax(1).copy()
    prev[:20] = 1
    changed = stopping.stopping_signal(p, previous_pred=prev)
    assert changed["agreement"] == pytest.approx(0.8) and not changed["stop"]
    assert "kappa" in changed["reason"]
    assert stopping.cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) < 0
    many = stopping.stopping_signal(np.array([[0.7, 0.3]] * 10), previous_pred=[0] * 10)
    assert not many["stop"] and "uncertain" in many["reason"]
