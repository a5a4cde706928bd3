"""Pick a batch of frames to label: uncertain *and* diverse.

Labeling the K most uncertain frames wastes labels when they are near-duplicates
(consecutive shots of one droplet regime look alike). These selectors spread a batch
over the model's embedding space:

- :func:`k_center_greedy` -- core-set selection (Sener & Savarese 2018): repeatedly take
  the frame farthest from everything labeled or already picked.
- :func:`kmeans_pp` -- k-means++ seeding: sample frames with probability proportional to
  (weight x squared distance to the nearest pick); with :func:`badge_embeddings`
  (gradient embeddings, Ash et al. 2020) this is BADGE: large-gradient (uncertain) and
  mutually distant frames.
- :func:`top_k_diverse` -- the top ``factor*K`` frames by an uncertainty score, thinned to K
  by k-center greedy.
- :func:`class_balanced` -- split the batch evenly over predicted classes (rare classes,
  e.g. ice at 270 K, still get labels).
- :func:`random_batch` -- the baseline.

All are deterministic given ``seed`` and return row positions (into the given arrays)
in pick order.

Examples
--------
>>> import numpy as np
>>> emb = np.array([[0, 0], [0, 0.1], [5, 5], [5, 5.1], [-5, 5]], float)
>>> cluster = np.array([0, 0, 1, 1, 2])
>>> sorted(cluster[k_center_greedy(emb, 3, seed=0)].tolist())   # one per cluster
[0, 1, 2]
"""
import numpy as np

from ..errors import InputError


def _as2d(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise InputError(f"{name} must be (N, D), got shape {x.shape}", "selection")
    return x


def _sqdist_to(x, c):
    """Squared Euclidean distance of every row of x to the point c."""
    d = x - c[None, :]
    return np.einsum("ij,ij->i", d, d)


def random_batch(n, k, seed=0):
    """``k`` distinct positions out of ``n``, uniformly at random (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(n)[:min(k, n)].astype(np.int64)


def top_k(scores, k):
    """Positions of the ``k`` highest scores, highest first (ties: lower position first)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return order[:min(k, len(s))].astype(np.int64)


def k_center_greedy(embeddings, k, initial=None, seed=0, first=None):
    """Greedy k-center (core-set) selection on embeddings (N, D).

    Parameters
    ----------
    embeddings : array (N, D)
        Candidate frames.
    k : int
        Batch size.
    initial : array (M, D), optional
        Embeddings of frames already labeled: the batch is spread away from them too.
    seed : int
        Picks the first frame when there is no ``initial`` and ``first`` is None.
    first : int, optional
        Position of the first pick (e.g. the most uncertain frame).

    Returns
    -------
    ndarray of int64
        ``min(k, N)`` distinct positions, in pick order.
    """
    x = _as2d(embeddings, "embeddings")
    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64)
    mind = np.full(n, np.inf)
    if initial is not None and len(initial):
        c = _as2d(initial, "initial")
        for start in range(0, len(c), 1024):  # nearest labeled frame, in blocks
            block = c[start:start + 1024]
            d = (x * x).sum(1)[:, None] - 2 * x @ block.T + (block * block).sum(1)[None, :]
            mind = np.minimum(mind, np.maximum(d, 0).min(axis=1))
    picks = []
    for _ in range(k):
        if picks or np.isfinite(mind).any():
            j = int(np.argmax(mind))  # ties: first position
        elif first is not None:
            j = int(first)
        else:
            j = int(np.random.default_rng(seed).integers(n))
        picks.append(j)
        mind = np.minimum(mind, _sqdist_to(x, x[j]))
        mind[j] = -1.0  # never again
    return np.asarray(picks, np.int64)


def kmeans_pp(embeddings, k, weights=None, seed=0):
    """k-means++ seeding: pick ``k`` frames, each with probability ~ weight x D^2.

    The first pick is the frame with the largest ``weight x norm^2`` (BADGE's choice,
    deterministic); each next one is sampled with probability proportional to
    ``weight * (squared distance to the nearest pick)``.

    Parameters
    ----------
    embeddings : array (N, D)
    k : int
    weights : array (N,), optional
        Non-negative, e.g. an uncertainty score (uncertainty-weighted k-means++).
    seed : int

    Returns
    -------
    ndarray of int64, pick order.
    """
    x = _as2d(embeddings, "embeddings")
    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64)
    w = np.ones(n) if weights is None else np.clip(np.asarray(weights, float), 0, None)
    if len(w) != n:
        raise InputError(f"{len(w)} weights for {n} embeddings", "selection")
    rng = np.random.default_rng(seed)
    norms = np.einsum("ij,ij->i", x, x)
    j = int(np.argmax(w * norms)) if (w * norms).max() > 0 else int(rng.integers(n))
    picks = [j]
    taken = np.zeros(n, bool)
    taken[j] = True
    mind = _sqdist_to(x, x[j])
    while len(picks) < k:
        p = np.where(taken, 0.0, w * mind)
        total = p.sum()
        if total <= 0 or not np.isfinite(total):  # all remaining duplicates: fall back
            rest = np.flatnonzero(~taken)
            j = int(rest[np.argmax(w[rest])]) if w[rest].max() > 0 else int(rng.choice(rest))
        else:
            j = int(rng.choice(n, p=p / total))
        picks.append(j)
        taken[j] = True
        mind = np.minimum(mind, _sqdist_to(x, x[j]))
    return np.asarray(picks, np.int64)


def badge_embeddings(probs, embeddings):
    """BADGE gradient embeddings: ``(p - onehot(argmax p)) outer embedding``, (N, C*D).

    The gradient of the cross-entropy loss w.r.t. the last layer's weights if the
    predicted class were the truth: its norm grows with uncertainty, its direction
    encodes what the frame looks like.
    """
    p = np.asarray(probs, np.float64)
    e = _as2d(embeddings, "embeddings")
    if len(p) != len(e):
        raise InputError(f"{len(p)} probability rows for {len(e)} embeddings", "selection")
    g = p.copy()
    g[np.arange(len(p)), p.argmax(axis=1)] -= 1.0
    return (g[:, :, None] * e[:, None, :]).reshape(len(p), -1)


def top_k_diverse(scores, embeddings, k, factor=2.0, initial=None, seed=0):
    """The ``factor*k`` highest-scoring frames, thinned to ``k`` by k-center greedy.

    With ``embeddings=None`` or ``factor <= 1`` this is plain top-k. The most uncertain
    frame is always picked first; the result is re-ordered by score (highest first).
    """
    scores = np.asarray(scores, np.float64)
    if embeddings is None or factor <= 1 or k >= len(scores):
        return top_k(scores, k)
    cand = top_k(scores, int(np.ceil(factor * k)))
    x = _as2d(embeddings, "embeddings")[cand]
    picked = cand[k_center_greedy(x, k, initial=None, seed=seed, first=0)]
    return picked[np.lexsort((picked, -scores[picked]))]


def class_balanced(select, predicted, k, n_classes=None):
    """Split a batch of ``k`` evenly over predicted classes.

    Parameters
    ----------
    select : callable (positions, k_c) -> local indices
        The per-class selector: given the pool positions of one predicted class, it
        returns indices *into that array* of the ``k_c`` frames to take.
    predicted : array (N,) of int
        Predicted class of every pool frame.
    k : int
    n_classes : int, optional

    Returns
    -------
    ndarray of int64
        Up to ``k`` positions. A class with too few frames gives its share to the others.
    """
    predicted = np.asarray(predicted)
    c = int(n_classes or (predicted.max() + 1 if len(predicted) else 0))
    members = [np.flatnonzero(predicted == j) for j in range(c)]
    quota = np.zeros(c, int)
    remaining = min(k, len(predicted))
    open_ = [j for j in range(c) if len(members[j])]
    while remaining > 0 and open_:  # water-filling: equal shares capped by class size
        share = max(remaining // len(open_), 1)
        for j in list(open_):
            add = min(share, len(members[j]) - quota[j], remaining)
            quota[j] += add
            remaining -= add
            if quota[j] >= len(members[j]):
                open_.remove(j)
            if remaining == 0:
                break
    out = []
    for j in range(c):
        if quota[j]:
            out.extend(members[j][np.asarray(select(members[j], int(quota[j])), int)])
    return np.asarray(out, np.int64)
