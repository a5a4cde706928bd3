"""Uncertainty scores of unlabeled frames: higher = more worth a human's look.

All functions are pure numpy on *calibrated* class probabilities (the model's softmax
after the temperature scaling stored in model.json; see :func:`lcls_dl.active.suggest.
pool_probabilities`). Raw, over-confident softmax outputs rank frames in much the same
order but make the stopping signal's "share still uncertain" meaningless.

================== ========================= ===============================================
score              input                     meaning
================== ========================= ===============================================
least_confidence   probs (N, C)              1 - max_c p_c
margin             probs (N, C)              1 - (p_top1 - p_top2)
entropy            probs (N, C)              -sum_c p_c log p_c (nats)
bald               mc_probs (T, N, C)        mutual information between the prediction and
                                             the weights, from T Monte-Carlo dropout passes
ensemble_*         probs (M, N, C)           disagreement between M models/checkpoints
================== ========================= ===============================================

Examples
--------
>>> import numpy as np
>>> p = np.array([[0.5, 0.5], [0.99, 0.01]])
>>> least_confidence(p).round(2)
array([0.5 , 0.01])
>>> bool(entropy(p)[0] > entropy(p)[1])
True
"""
import numpy as np

from ..errors import InputError

_EPS = 1e-12


def _check(probs, ndim, name):
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != ndim:
        raise InputError(f"{name} needs an array of {ndim} dimensions, got shape {p.shape}",
                         "scores")
    if p.size and (not np.isfinite(p).all() or (p < -1e-6).any()):
        raise InputError(f"{name}: probabilities must be finite and non-negative", "scores")
    return np.clip(p, 0.0, 1.0)


def least_confidence(probs):
    """``1 - max_c p_c`` for probs (N, C); 0 for a certain frame, 1 - 1/C at most."""
    p = _check(probs, 2, "least_confidence")
    return 1.0 - p.max(axis=1)


def margin(probs):
    """``1 - (p_best - p_second)`` for probs (N, C): 1 when the top two classes tie."""
    p = _check(probs, 2, "margin")
    if p.shape[1] < 2:
        return np.zeros(len(p))
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy(probs):
    """Shannon entropy ``-sum_c p_c log p_c`` (nats) of probs (..., C) along the last axis."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    return -(p * np.log(p + _EPS)).sum(axis=-1)


def bald(mc_probs):
    """BALD score (Houlsby et al. 2011) from Monte-Carlo dropout passes.

    Parameters
    ----------
    mc_probs : array (T, N, C)
        Class probabilities of T stochastic forward passes (dropout on).

    Returns
    -------
    ndarray (N,)
        ``H[mean_t p_t] - mean_t H[p_t]``: high when the passes are each confident but
        disagree with each other (the model's weights, not the frame, are uncertain).
    """
    p = _check(mc_probs, 3, "bald")
    return np.maximum(entropy(p.mean(axis=0)) - entropy(p).mean(axis=0), 0.0)


def vote_entropy(member_probs):
    """Entropy of the members' hard votes, for probs (M, N, C) -> (N,)."""
    p = _check(member_probs, 3, "vote_entropy")
    m, n, c = p.shape
    votes = p.argmax(axis=2)  # (M, N)
    counts = np.zeros((n, c))
    for k in range(m):
        counts[np.arange(n), votes[k]] += 1
    return entropy(counts / max(m, 1))


def mean_kl(member_probs):
    """Mean KL divergence of each member from the consensus, for probs (M, N, C) -> (N,)."""
    p = _check(member_probs, 3, "mean_kl")
    mean = p.mean(axis=0)
    kl = (p * (np.log(p + _EPS) - np.log(mean + _EPS)[None])).sum(axis=2)
    return np.maximum(kl.mean(axis=0), 0.0)


def ensemble_disagreement(member_probs, kind="kl"):
    """Disagreement of an ensemble of M models, probs (M, N, C) -> (N,).

    ``kind="kl"`` (mean KL from the consensus; equals BALD with the members as the
    samples) or ``"vote"`` (vote entropy). Ties in vote entropy are broken by the KL
    score so that ranking stays informative with few members.
    """
    if kind == "kl":
        return mean_kl(member_probs)
    if kind == "vote":
        return vote_entropy(member_probs) + 1e-3 * np.tanh(mean_kl(member_probs))
    raise InputError(f"unknown ensemble disagreement {kind!r} (kl or vote)", "scores")


SCORES = {"least-confidence": least_confidence, "margin": margin, "entropy": entropy}


def score(strategy, probs=None, mc_probs=None, member_probs=None):
    """Score frames with a named strategy.

    ``least-confidence``, ``margin``, ``entropy`` use ``probs`` (N, C); ``bald`` uses
    ``mc_probs`` (T, N, C); ``ensemble`` uses ``member_probs`` (M, N, C). Returns (N,).
    """
    if strategy in SCORES:
        if probs is None:
            raise InputError(f"strategy {strategy} needs class probabilities", "scores")
        return SCORES[strategy](probs)
    if strategy == "bald":
        if mc_probs is None:
            raise InputError("strategy bald needs Monte-Carlo dropout passes (--mc-passes T)",
                             "scores")
        return bald(mc_probs)
    if strategy == "ensemble":
        if member_probs is None or len(member_probs) < 2:
            raise InputError("strategy ensemble needs at least two models (--ensemble DIR)",
                             "scores")
        return ensemble_disagreement(member_probs)
    raise InputError(f"unknown uncertainty score {strategy!r}", "scores")
