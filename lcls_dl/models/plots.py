"""PNG plots of training and evaluation (matplotlib, Agg backend; no display needed)."""
import numpy as np

from ..atomic import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_curves(history, path, title=None):
    """Loss and accuracy (train and validation) vs epoch, side by side, to ``path``."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((a, "loss", "loss"), (b, "accuracy", "accuracy")):
        ax.plot(epochs, [h[key] for h in history], "o-", label="train")
        val = [h.get("val_" + key) for h in history]
        if any(v is not None and np.isfinite(v) for v in val):
            ax.plot(epochs, val, "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_confusion(cm, classes, path, title="confusion matrix"):
    """Confusion matrix (rows true, columns predicted) with counts in the cells."""
    plt = _plt()
    cm = np.asarray(cm)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.1 * k + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black")
    ax.set_title(title)
    _save(fig, path)


def plot_roc(y, p, classes, path):
    """One-vs-rest ROC curve per class, AUC in the legend."""
    from .metrics import roc_auc, roc_curve

    plt = _plt()
    y = np.asarray(y)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for c, name in enumerate(classes):
        pos = y == c
        if not pos.any() or pos.all():
            continue
        fpr, tpr = roc_curve(pos, p[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(pos, p[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)
