"""When to stop labeling: a stopping signal computed each round.

Two numbers, both on the *unlabeled pool*, need no extra labels:

- **stability** -- agreement between the predictions of this round's model and the
  previous round's (Cohen's kappa and the plain fraction). When new labels stop
  changing the model's answers on the pool, more labels buy little
  (Bloodgood & Vijay-Shanker 2009, "stabilizing predictions").
- **uncertain share** -- the fraction of pool frames whose calibrated top probability
  is below ``threshold`` (default 0.9): how much of the pool the model is still unsure of.

:func:`should_stop` says stop when kappa >= ``min_kappa`` (default 0.99) and the
uncertain share <= ``max_uncertain`` (default 0.05).

Examples
--------
>>> import numpy as np
>>> prev = np.array([0, 1, 1, 0]); cur = np.array([0, 1, 1, 0])
>>> cohen_kappa(prev, cur)
1.0
>>> sig = stopping_signal(np.array([[0.99, 0.01], [0.6, 0.4]]), previous_pred=[0, 0])
>>> sig["uncertain_share"], sig["agreement"]
(0.5, 1.0)
"""
import numpy as np

DEFAULT_THRESHOLD = 0.9
DEFAULT_MIN_KAPPA = 0.99
DEFAULT_MAX_UNCERTAIN = 0.05


def cohen_kappa(a, b, n_classes=None):
    """Cohen's kappa between two label vectors (1.0 = identical; 0 = chance agreement).

    Returns 1.0 when both vectors are constant and equal (no disagreement possible).
    """
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} predictions")
    if len(a) == 0:
        return 1.0
    c = int(n_classes or max(a.max(), b.max()) + 1)
    po = float((a == b).mean())
    pa = np.bincount(a, minlength=c) / len(a)
    pb = np.bincount(b, minlength=c) / len(b)
    pe = float((pa * pb).sum())
    if pe >= 1.0:
        return 1.0 if po == 1.0 else 0.0
    return (po - pe) / (1.0 - pe)


def uncertain_share(probs, threshold=DEFAULT_THRESHOLD):
    """Fraction of frames whose top calibrated probability is below ``threshold``."""
    p = np.asarray(probs, np.float64)
    if len(p) == 0:
        return 0.0
    return float((p.max(axis=1) < threshold).mean())


def stopping_signal(probs, previous_pred=None, threshold=DEFAULT_THRESHOLD,
                    min_kappa=DEFAULT_MIN_KAPPA, max_uncertain=DEFAULT_MAX_UNCERTAIN):
    """The stopping signal of one round on the unlabeled pool.

    Parameters
    ----------
    probs : array (N, C)
        This round's calibrated probabilities on the pool.
    previous_pred : array (N,), optional
        The previous round's predicted classes on the same frames (None in round one).

    Returns
    -------
    dict
        ``pool`` (N), ``uncertain_share``, ``threshold``, ``agreement`` and ``kappa``
        (None without a previous round), ``stop`` (bool) and ``reason`` (one line).
    """
    p = np.asarray(probs, np.float64)
    pred = p.argmax(axis=1) if len(p) else np.zeros(0, np.int64)
    share = uncertain_share(p, threshold)
    sig = {"pool": int(len(p)), "threshold": float(threshold), "uncertain_share": share,
           "agreement": None, "kappa": None, "min_kappa": float(min_kappa),
           "max_uncertain": float(max_uncertain)}
    if previous_pred is not None:
        prev = np.asarray(previous_pred, np.int64)
        if len(prev) == len(pred):
            sig["agreement"] = float((prev == pred).mean()) if len(pred) else 1.0
            sig["kappa"] = float(cohen_kappa(prev, pred, p.shape[1] if p.ndim == 2 else None))
    sig["stop"], sig["reason"] = should_stop(sig)
    return sig


def should_stop(signal, min_kappa=None, max_uncertain=None):
    """Decide from a :func:`stopping_signal` dict -> ``(stop, reason)``."""
    min_kappa = signal.get("min_kappa", DEFAULT_MIN_KAPPA) if min_kappa is None else min_kappa
    max_uncertain = (signal.get("max_uncertain", DEFAULT_MAX_UNCERTAIN)
                     if max_uncertain is None else max_uncertain)
    share = signal["uncertain_share"]
    kappa = signal.get("kappa")
    if signal.get("pool", 1) == 0:
        return True, "no unlabeled frames left"
    if kappa is None:
        return False, (f"{share:.1%} of the pool still uncertain; run another round to "
                       "measure prediction stability")
    if kappa >= min_kappa and share <= max_uncertain:
        return True, (f"predictions stable (kappa {kappa:.3f} >= {min_kappa}) and only "
                      f"{share:.1%} of the pool uncertain: more labels will change little")
    why = []
    if kappa < min_kappa:
        why.append(f"predictions still changing (kappa {kappa:.3f} < {min_kappa})")
    if share > max_uncertain:
        why.append(f"{share:.1%} of the pool uncertain (> {max_uncertain:.0%})")
    return False, "keep labeling: " + "; ".join(why)


def format_signal(signal):
    """One line for a terminal, e.g. ``stopping signal: keep labeling: ...``."""
    verdict = "STOP" if signal["stop"] else "continue"
    return f"stopping signal: {verdict} -- {signal['reason']}"
