"""Temperature scaling (Guo et al. 2017): one scalar T so that softmax(logits / T) is calibrated.

T is fitted on the validation split's logits by minimizing the negative log-likelihood
(a 1-D bounded search over log T), so accuracy never changes (arg-max is invariant).

Examples
--------
>>> rng = np.random.default_rng(0)
>>> y = rng.integers(0, 2, 500)
>>> logits = np.stack([-(2 * y - 1) * 4.0, (2 * y - 1) * 4.0], 1) + rng.normal(0, 4, (500, 2))
>>> t = fit_temperature(logits, y)
>>> t > 1.0      # over-confident logits are cooled
True
"""
import numpy as np


def softmax(logits, temperature=1.0):
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits, y, temperature=1.0):
    """Mean negative log-likelihood of labels ``y`` under ``softmax(logits / T)``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), np.asarray(y, np.int64)].mean())


def fit_temperature(logits, y, bounds=(0.25, 20.0)):
    """Temperature minimizing the validation NLL within ``bounds`` (1.0 for empty input).

    The lower bound keeps a perfectly separated (small) validation split from driving T to 0,
    which would make every probability 0 or 1.
    """
    if len(y) == 0:
        return 1.0
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: nll(logits, y, np.exp(lt)),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def calibrate(logits, y, n_bins=15):
    """Fit T and report ECE/NLL before and after.

    Returns
    -------
    dict
        ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "n"}``.
    """
    from .metrics import expected_calibration_error

    t = fit_temperature(logits, y)
    return {"temperature": t, "n": int(len(y)),
            "ece_before": expected_calibration_error(y, softmax(logits), n_bins),
            "ece_after": expected_calibration_error(y, softmax(logits, t), n_bins),
            "nll_before": nll(logits, y) if len(y) else float("nan"),
            "nll_after": nll(logits, y, t) if len(y) else float("nan")}
