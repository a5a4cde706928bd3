"""Classification metrics on arrays: accuracy, per-class P/R/F1, ROC AUC, confusion, ECE.

All functions take integer labels ``y`` (N,) and probabilities ``p`` (N, K) as numpy
arrays and return plain numbers / arrays (no scikit-learn needed).

Examples
--------
>>> y = np.array([0, 1, 1, 0]); p = np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]])
>>> accuracy(y, p), confusion_matrix(y, p.argmax(1), 2).tolist()
(0.75, [[2, 0], [1, 1]])
>>> round(roc_auc(y == 1, p[:, 1]), 3)
1.0
"""
import numpy as np


def accuracy(y, p):
    """Fraction of frames whose arg-max class is the label."""
    y = np.asarray(y)
    return float((np.asarray(p).argmax(1) == y).mean()) if len(y) else float("nan")


def confusion_matrix(y, pred, n_classes):
    """``cm[i, j]`` = frames of true class i predicted as j."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def per_class(cm):
    """Per-class precision, recall, F1 and support from a confusion matrix (dict of arrays)."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1,
            "support": cm.sum(1).astype(np.int64)}


def roc_curve(positive, score):
    """False/true positive rates over all thresholds (descending score)."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    s, pos = score[order], positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.zeros(0, int)
    tps = np.cumsum(pos)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = pos.sum(), (~pos).sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.r_[0.0, np.zeros(len(tps))]
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.r_[0.0, np.zeros(len(fps))]
    return fpr, tpr


def roc_auc(positive, score):
    """Area under the ROC curve (NaN when one of the two groups is empty)."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    fpr, tpr = roc_curve(positive, score)
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def expected_calibration_error(y, p, n_bins=15):
    """ECE: bin frames by confidence (max probability); weighted mean |accuracy - confidence|."""
    y = np.asarray(y)
    p = np.asarray(p, np.float64)
    if not len(y):
        return float("nan")
    conf = p.max(1)
    correct = p.argmax(1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def log_loss(y, p, eps=1e-7):
    """Mean negative log-likelihood of the labels."""
    p = np.clip(np.asarray(p, np.float64), eps, 1.0)
    return float(-np.log(p[np.arange(len(y)), np.asarray(y)]).mean()) if len(y) else float("nan")


def classification_report(y, p, classes):
    """All metrics as a JSON-able dict.

    Returns
    -------
    dict
        ``accuracy, log_loss, ece, confusion (list of lists), classes, per_class
        {name: {precision, recall, f1, support, roc_auc}}, macro_f1, macro_roc_auc, n``.
    """
    y = np.asarray(y, np.int64)
    p = np.asarray(p, np.float64)
    k = len(classes)
    cm = confusion_matrix(y, p.argmax(1), k)
    pc = per_class(cm)
    aucs = [roc_auc(y == c, p[:, c]) for c in range(k)]
    out = {"n": int(len(y)), "classes": list(classes), "accuracy": accuracy(y, p),
           "log_loss": log_loss(y, p), "ece": expected_calibration_error(y, p),
           "confusion": cm.tolist(), "per_class": {}}
    for c, name in enumerate(classes):
        out["per_class"][name] = {"precision": float(pc["precision"][c]),
                                  "recall": float(pc["recall"][c]), "f1": float(pc["f1"][c]),
                                  "support": int(pc["support"][c]), "roc_auc": aucs[c]}
    present = pc["support"] > 0
    out["macro_f1"] = float(pc["f1"][present].mean()) if present.any() else float("nan")
    finite = [a for a in aucs if np.isfinite(a)]
    out["macro_roc_auc"] = float(np.mean(finite)) if finite else float("nan")
    return out
