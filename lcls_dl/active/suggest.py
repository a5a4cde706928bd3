"""Suggest the frames a human should label next.

:func:`suggest_labels` scores every unlabeled frame of a dataset with a trained model,
picks a batch that is uncertain and diverse, and writes

- ``OUT.csv``: ranked suggestions (rank, id, file, event, score, predicted class,
  one ``p_<class>`` column per class), written atomically;
- ``OUT.png``: a contact sheet of the suggested frames' polar images with id/score/pred;
- ``OUT.stopping.json``: the stopping signal (:mod:`lcls_dl.active.stopping`) with
  provenance;
- ``OUT.pool.npz``: this round's predictions on the pool (ids, predicted class, top
  probability), so the next round measures prediction stability against it.

Strategies (``strategy=``):

================= ============================================================================
least-confidence  1 - max p, top ``diversity*K`` thinned to K by k-center on the embedding
margin            1 - (p1 - p2), same thinning
entropy           -sum p log p, same thinning
bald              BALD from ``mc_passes`` Monte-Carlo dropout passes, same thinning
ensemble          mean KL of several models (``ensemble=[dirs]``) from their consensus
badge             k-means++ seeding on gradient embeddings (Ash et al. 2020)
kcenter           core-set: k-center greedy on the embedding, away from labeled frames
random            uniform (the baseline)
================= ============================================================================

Every probability is calibrated (temperature scaling stored with the model).

Examples
--------
>>> res = suggest_labels("model1", "data1", budget=50, strategy="margin",
...                      out="next.csv")                      # doctest: +SKIP
>>> res.rows[0]["id"], res.signal["stop"]                     # doctest: +SKIP
('run0003.cxi:1711', False)
"""
import csv
import io
import os
from dataclasses import dataclass, field

import numpy as np

from ..atomic import check_writable
from ..dataset import Dataset
from ..errors import ConfigError, InputError
from . import scores as _scores
from . import selection, stopping

STRATEGIES = ("least-confidence", "margin", "entropy", "bald", "ensemble", "badge", "kcenter",
              "random")
SCORE_STRATEGIES = ("least-confidence", "margin", "entropy", "bald", "ensemble")
DEFAULT_MC_PASSES = 20
DEFAULT_DIVERSITY = 2.0


# -- model outputs on the pool --------------------------------------------------------------
def model_temperature(meta):
    """The calibration temperature recorded in a model's metadata (1.0 if none)."""
    for path in (("temperature",), ("calibration", "temperature")):
        node = meta or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and node > 0:
            return float(node)
    return 1.0


class ModelScorer:
    """Calibrated probabilities, embeddings and MC-dropout passes of one Keras model.

    Parameters
    ----------
    model : keras.Model
        A model from :func:`lcls_dl.models.builders.build_model` (layers ``logits`` and
        ``embedding``).
    meta : dict, optional
        Its metadata (``temperature`` is the calibration temperature: probabilities are
        ``softmax(logits / temperature)``).
    """

    def __init__(self, model, meta=None):
        import keras

        self.model = model
        self.meta = dict(meta or {})
        self.temperature = model_temperature(self.meta)
        self.meta["temperature"] = self.temperature
        # one pass gives both heads
        self._heads = keras.Model(model.inputs, [model.get_layer("logits").output,
                                                 model.get_layer("embedding").output])

    def __call__(self, arrays, mc_passes=0, seed=0):
        """``arrays`` (dict image/profile/scalars) -> dict probs, embedding (, mc_probs)."""
        from ..models.builders import select_inputs
        from ..models.calibration import softmax

        x = select_inputs(self.model, arrays)
        logits, emb = self._heads(x, training=False)
        out = {"probs": softmax(np.asarray(logits), self.temperature),
               "embedding": np.asarray(emb, np.float32)}
        if mc_passes:
            from ..models.model_dir import predict_proba

            out["mc_probs"] = predict_proba(self.model, self.meta, x,
                                            mc_dropout_passes=int(mc_passes), seed=int(seed))
        return out


def load_scorer(model_dir):
    """``(ModelScorer, metadata)`` of a model directory."""
    from ..models.model_dir import load_model_dir

    model, meta = load_model_dir(model_dir)
    return ModelScorer(model, meta), meta


def pool_outputs(scorers, dataset, rows, mc_passes=0, batch_size=256, seed=0, progress=None,
                 offset=0):
    """Run models over dataset ``rows`` in batches.

    Parameters
    ----------
    scorers : list of callables (arrays, mc_passes, seed) -> dict
        The first is the main model; others are ensemble members.
    dataset : lcls_dl.dataset.Dataset
    rows : array of int
    mc_passes : int
        Monte-Carlo dropout passes of the main model (0: none).
    offset : int
        Position of ``rows[0]`` in the whole pool: the dropout seed of a batch is
        ``seed + its position``, so results do not depend on how the pool is split.

    Returns
    -------
    dict
        ``probs`` (N, C) calibrated, ``embedding`` (N, D), ``mc_probs`` (T, N, C) or None,
        ``member_probs`` (M, N, C) or None (main model included as member 0).
    """
    rows = np.asarray(rows, np.int64)
    parts = {"probs": [], "embedding": [], "mc_probs": [], "member_probs": []}
    names = _needed_arrays(scorers)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        arrays = dataset.read(chunk, names)
        main = scorers[0](arrays, mc_passes=mc_passes, seed=seed + offset + start)
        parts["probs"].append(main["probs"])
        parts["embedding"].append(main["embedding"])
        if mc_passes:
            parts["mc_probs"].append(main["mc_probs"])
        if len(scorers) > 1:
            parts["member_probs"].append(np.stack(
                [main["probs"]] + [s(arrays)["probs"] for s in scorers[1:]]))
        if progress is not None:
            progress.update(len(chunk))
    return _concat_outputs(parts, n_classes=len(dataset.classes))


def _needed_arrays(scorers):
    names = set()
    for s in scorers:
        model = getattr(s, "model", None)
        if model is None:
            return ("image", "profile", "scalars")
        names.update(t.name.split(":")[0] for t in model.inputs)
    return tuple(n for n in ("image", "profile", "scalars") if n in names)


def _concat_outputs(parts, n_classes):
    out = {}
    out["probs"] = (np.concatenate(parts["probs"]) if parts["probs"]
                    else np.zeros((0, n_classes)))
    out["embedding"] = (np.concatenate(parts["embedding"]) if parts["embedding"]
                        else np.zeros((0, 1), np.float32))
    out["mc_probs"] = np.concatenate(parts["mc_probs"], axis=1) if parts["mc_probs"] else None
    out["member_probs"] = (np.concatenate(parts["member_probs"], axis=1)
                           if parts["member_probs"] else None)
    return out


def merge_outputs(pieces):
    """Concatenate per-rank :func:`pool_outputs` dicts (in rank order)."""
    pieces = [p for p in pieces if p is not None]
    out = {}
    for key, axis in (("probs", 0), ("embedding", 0), ("mc_probs", 1), ("member_probs", 1)):
        arrs = [p[key] for p in pieces if p.get(key) is not None and p[key].size]
        if arrs:
            out[key] = np.concatenate(arrs, axis=axis)
        else:
            out[key] = pieces[0][key] if pieces else None
    return out


# -- choosing the batch ---------------------------------------------------------------------
def select_batch(strategy, outputs, budget, labeled_embedding=None, class_balanced=False,
                 diversity=DEFAULT_DIVERSITY, seed=0):
    """Pick ``budget`` pool positions from model outputs.

    Parameters
    ----------
    strategy : str
        One of :data:`STRATEGIES`.
    outputs : dict
        From :func:`pool_outputs` (``probs`` needed; ``embedding`` for diversity, badge and
        kcenter; ``mc_probs`` for bald; ``member_probs`` for ensemble).
    budget : int
    labeled_embedding : array (M, D), optional
        Embeddings of labeled frames (kcenter spreads away from them).
    class_balanced : bool
        Split the batch evenly over predicted classes.
    diversity : float
        Score strategies take the top ``diversity*budget`` frames and thin them to
        ``budget`` by k-center greedy on the embedding (1: plain top-k).
    seed : int

    Returns
    -------
    positions : ndarray of int64
        In rank order (best first).
    score : ndarray (N,)
        The per-frame score shown to the user (for badge: gradient-embedding norm; for
        kcenter and random: least confidence).
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})",
                         "--strategy")
    probs = np.asarray(outputs["probs"], np.float64)
    n = len(probs)
    budget = int(budget)
    if budget < 1:
        raise InputError(f"budget must be at least 1, got {budget}", "--budget")
    emb = outputs.get("embedding")
    grad = None
    if strategy in SCORE_STRATEGIES:
        score = _scores.score(strategy, probs=probs, mc_probs=outputs.get("mc_probs"),
                              member_probs=outputs.get("member_probs"))
    elif strategy == "badge":
        grad = selection.badge_embeddings(probs, emb)
        score = np.sqrt(np.einsum("ij,ij->i", grad, grad))
    else:
        score = _scores.least_confidence(probs) if n else np.zeros(0)

    def pick(pos, k):
        """Local indices into ``pos`` of the ``k`` frames chosen among ``pos``."""
        if strategy in SCORE_STRATEGIES:
            return selection.top_k_diverse(score[pos], None if emb is None else emb[pos], k,
                                           factor=diversity, seed=seed)
        if strategy == "badge":
            return selection.kmeans_pp(grad[pos], k, seed=seed)
        if strategy == "kcenter":
            return selection.k_center_greedy(emb[pos], k, initial=labeled_embedding, seed=seed)
        return selection.random_batch(len(pos), k, seed=seed)

    if n == 0:
        return np.zeros(0, np.int64), score
    if class_balanced:
        picks = selection.class_balanced(pick, probs.argmax(axis=1), budget, probs.shape[1])
        if strategy in SCORE_STRATEGIES:
            picks = picks[np.lexsort((picks, -score[picks]))]
    else:
        picks = np.arange(n)[pick(np.arange(n), budget)]
    return np.asarray(picks, np.int64), score


# -- the command's library function ---------------------------------------------------------
@dataclass
class SuggestResult:
    """What :func:`suggest_labels` produced."""

    rows: list                      # one dict per suggested frame, in rank order
    signal: dict                    # stopping signal
    classes: list
    paths: dict = field(default_factory=dict)  # csv, png, stopping, pool
    pool_size: int = 0


def check_pool_ranks(dataset, ranks):
    """Raise ``InputError`` when the unlabeled pool has fewer frames than MPI ranks to
    score it (cheap: the launcher of ``suggest-labels --np N`` calls it first)."""
    pool = len(dataset.unlabeled)
    if int(ranks) > max(pool, 1):
        raise InputError(f"{int(ranks)} ranks for {pool} unlabeled frames: use at most one "
                         f"rank per frame (--np)", dataset.path)


def suggest_labels(model_dir, dataset_dir, budget, strategy="margin", out=None,
                   mc_passes=None, ensemble=(), class_balanced=False, diversity=DEFAULT_DIVERSITY,
                   seed=0, world=None, previous=None, contact_sheet=True, batch_size=256,
                   show_progress=False, uncertain_threshold=stopping.DEFAULT_THRESHOLD):
    """Score the unlabeled frames of ``dataset_dir`` with ``model_dir`` and pick ``budget``.

    Parameters
    ----------
    model_dir, dataset_dir : str
    budget : int
        Frames to suggest (K).
    strategy : str
        One of :data:`STRATEGIES`.
    out : str, optional
        Ranked CSV to write (with ``.png``, ``.stopping.json``, ``.pool.npz`` next to it).
    mc_passes : int, optional
        Monte-Carlo dropout passes for ``bald`` (default 20).
    ensemble : sequence of str
        More model directories for ``ensemble`` (the main model is member 0).
    class_balanced, diversity, seed
        See :func:`select_batch`.
    world : World, optional
        With several MPI ranks each scores a disjoint slice of the pool; rank 0 selects and
        writes. Other ranks return None.
    previous : str, optional
        An earlier round's ``.pool.npz`` or suggestions CSV, for the stability signal
        (default: ``OUT.pool.npz`` if it exists, i.e. the last run with the same ``--out``).

    Returns
    -------
    SuggestResult (None on ranks other than 0)
    """
    from .mpi_scoring import score_pool

    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})",
                         "--strategy")
    if strategy == "ensemble" and not ensemble:
        raise InputError("strategy ensemble needs at least one more model (--ensemble DIR)",
                         "--ensemble")
    if mc_passes is None:
        mc_passes = DEFAULT_MC_PASSES if strategy == "bald" else 0
    if strategy == "bald" and mc_passes < 2:
        raise InputError("strategy bald needs --mc-passes of at least 2", "--mc-passes")
    if out is not None:  # before the pool is scored, not after
        check_writable(out, "suggestions")
    dataset = Dataset(dataset_dir)
    check_pool_ranks(dataset, world.size if world is not None else 1)
    scorer, meta = load_scorer(model_dir)
    check_compatible(meta, dataset, model_dir)
    scorers = [scorer]
    for other in ensemble or ():
        s, m = load_scorer(other)
        check_compatible(m, dataset, other)
        scorers.append(s)
    pool = dataset.unlabeled
    bar = None
    if show_progress and (world is None or world.is_root):
        from ..cli.common import progress

        bar = progress(total=len(pool), desc="scoring pool")
    try:
        outputs = score_pool(lambda rows, offset: pool_outputs(
            scorers, dataset, rows, mc_passes, batch_size, seed, progress=bar, offset=offset),
            pool, world, align=batch_size)
    finally:
        if bar is not None:
            bar.close()
    if outputs is None:  # not the root rank
        return None
    labeled_emb = None
    if strategy == "kcenter" and len(dataset.labeled):
        lab = dataset.labeled
        if len(lab) > 5000:
            lab = np.sort(np.random.default_rng(seed).choice(lab, 5000, replace=False))
        labeled_emb = pool_outputs(scorers[:1], dataset, lab, 0, batch_size, seed)["embedding"]
    picks, score = select_batch(strategy, outputs, budget, labeled_embedding=labeled_emb,
                                class_balanced=class_balanced, diversity=diversity, seed=seed)
    classes = list(meta.get("classes") or dataset.classes)
    probs = outputs["probs"]
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    rows = []
    for rank, pos in enumerate(picks, start=1):
        r = int(pool[pos])
        row = {"rank": rank, "id": dataset.ids[r], "file": dataset.files[r],
               "event": int(dataset.events[r]), "score": float(score[pos]),
               "predicted": classes[int(pred[pos])] if int(pred[pos]) < len(classes)
               else str(int(pred[pos]))}
        for c, name in enumerate(classes):
            row[f"p_{name}"] = float(probs[pos, c]) if c < probs.shape[1] else 0.0
        rows.append(row)
    pool_ids = dataset.ids[pool]
    prev_path = previous or (pool_npz_path(out) if out else None)
    prev_pred = aligned_previous(prev_path, pool_ids) if prev_path else None
    signal = stopping.stopping_signal(probs if prev_pred is None else probs[prev_pred[1]],
                                      None if prev_pred is None else prev_pred[0],
                                      threshold=uncertain_threshold)
    if prev_pred is not None:  # uncertain share over the whole pool, not just the overlap
        signal["uncertain_share"] = stopping.uncertain_share(probs, uncertain_threshold)
        signal["pool"] = int(len(probs))
        signal["compared"] = int(len(prev_pred[0]))
        signal["stop"], signal["reason"] = stopping.should_stop(signal)
    signal.update({"strategy": strategy, "budget": int(budget),
                   "labeled": int(len(dataset.labeled)),
                   "previous": prev_path if prev_pred is not None else None})
    result = SuggestResult(rows=rows, signal=signal, classes=classes, pool_size=len(pool))
    if out:
        result.paths = write_outputs(out, result, dataset, picks=pool[picks], pool_ids=pool_ids,
                                     pred=pred, probs=probs, contact_sheet=contact_sheet,
                                     parameters={"model_dir": os.fspath(model_dir),
                                                 "dataset_dir": os.fspath(dataset_dir),
                                                 "strategy": strategy, "budget": int(budget),
                                                 "mc_passes": int(mc_passes),
                                                 "ensemble": [os.fspath(e) for e in ensemble],
                                                 "class_balanced": bool(class_balanced),
                                                 "diversity": float(diversity),
                                                 "seed": int(seed),
                                                 "dataset_checksum": dataset.checksum})
    dataset.close()
    return result


def check_compatible(meta, dataset, model_dir):
    """Raise :class:`ConfigError` if a model's preprocessing does not fit the dataset."""
    from ..models.model_dir import check_preprocessing

    if meta.get("preprocessing") is not None:
        check_preprocessing(meta["preprocessing"], dataset.preprocessing, model_dir)
    if not meta.get("classes"):
        raise ConfigError("model.json lists no classes", model_dir)


# -- files ----------------------------------------------------------------------------------
def _stem(out):
    out = os.fspath(out)
    return out[:-4] if out.lower().endswith(".csv") else out


def pool_npz_path(out):
    """``OUT.pool.npz`` for a suggestions CSV path ``OUT.csv``."""
    return _stem(out) + ".pool.npz"


def aligned_previous(path, pool_ids):
    """Previous round's predictions on this pool: ``(prev_pred, positions)`` or None.

    ``path`` is a ``.pool.npz`` or a suggestions CSV (its ``.pool.npz`` is used).
    Only frames in both pools are compared.
    """
    path = os.fspath(path)
    if path.lower().endswith(".csv"):
        path = pool_npz_path(path)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, pred = z["ids"].astype(str), z["pred"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"unreadable previous-round predictions: {exc}", path) from None
    lookup = {s: i for i, s in enumerate(ids)}
    pos, prev = [], []
    for k, s in enumerate(pool_ids):
        j = lookup.get(s)
        if j is not None:
            pos.append(k)
            prev.append(pred[j])
    if not pos:
        return None
    return np.asarray(prev, np.int64), np.asarray(pos, np.int64)


def rows_to_csv_text(rows, classes):
    """The suggestions CSV as text (header + one line per row)."""
    cols = ["rank", "id", "file", "event", "score", "predicted"] + [f"p_{c}" for c in classes]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_outputs(out, result, dataset, picks, pool_ids, pred, probs, contact_sheet=True,
                  parameters=None):
    """Write CSV, contact sheet, stopping signal and pool predictions; return their paths."""
    from ..atomic import atomic_open, atomic_path, write_json
    from ..provenance import software_versions, utc_now

    out = os.fspath(out)
    stem = _stem(out)
    paths = {"csv": out}
    with atomic_open(out, "w", encoding="utf-8", newline="") as fh:
        fh.write(rows_to_csv_text(result.rows, result.classes))
    if contact_sheet and len(result.rows):
        paths["png"] = stem + ".png"
        images = dataset.read(picks[:MAX_SHEET], ("image",))["image"]
        write_contact_sheet(paths["png"], images, result.rows[:MAX_SHEET])
    paths["stopping"] = stem + ".stopping.json"
    write_json(paths["stopping"], {"kind": "lcls-dl suggestions", "created": utc_now(),
                                   "software": software_versions(),
                                   "parameters": parameters or {}, "signal": result.signal,
                                   "suggested": len(result.rows), "pool": result.pool_size,
                                   "outputs": dict(paths)})
    paths["pool"] = pool_npz_path(out)
    with atomic_path(paths["pool"], suffix=".npz") as tmp:
        top = probs.max(axis=1) if len(probs) else np.zeros(0)
        np.savez_compressed(tmp, ids=np.asarray(pool_ids, dtype=str),
                            pred=np.asarray(pred, np.int16), top=top.astype(np.float32))
    return paths


MAX_SHEET = 64


def sheet_image(img):
    """What the contact sheet shows of one polar image.

    A 2-D image (1 channel) as it is; an ``(H, W, 2)`` image (mean, max SNR) as RGB: channel
    0 in grey (1-99.5 percentile stretch) with the max-SNR channel in red on top (50-99.9
    percentile stretch), so Bragg spots the mean washes out show as red dots.

    Examples
    --------
    >>> sheet_image(np.zeros((4, 8, 2))).shape
    (4, 8, 3)
    """
    img = np.asarray(img, np.float64)

    def stretch(x, lo_p, hi_p):
        if not x.size:
            return x
        lo, hi = np.percentile(x, [lo_p, hi_p])
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)

    if img.ndim == 2:
        return img
    if img.shape[-1] == 1:
        return img[..., 0]
    grey, red = stretch(img[..., 0], 1, 99.5), stretch(img[..., 1], 50, 99.9)
    return np.stack([np.maximum(grey, red), grey * (1 - red), grey * (1 - red)], axis=-1)


def write_contact_sheet(path, images, rows, ncols=8):
    """A PNG grid of polar images (q down, phi across), titled ``rank id / score pred``.

    ``images`` is ``(N, H, W)`` or ``(N, H, W, 2)`` (see :func:`sheet_image`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    n = len(rows)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.0 * nrows + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, row in zip(axes.ravel(), images, rows):
        img = sheet_image(img)
        if img.ndim == 3:
            ax.imshow(img, aspect="auto", interpolation="nearest")
        else:
            lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
            ax.imshow(img, aspect="auto", cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6),
                      interpolation="nearest")
        ax.set_title(f"#{row['rank']} {row['id']}\nscore {row['score']:.3f}  "
                     f"pred {row['predicted']}", fontsize=6)
    fig.suptitle("suggested frames (polar image: q down, phi across)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
