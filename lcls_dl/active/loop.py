"""The labeling loop, measured: how many labels does each strategy need?

:func:`run_active_loop` simulates the scientist with a truth file. From one random seed
set it runs, for every strategy (and random sampling) on the same pool and the same
held-out frames::

    train on the labeled frames -> accuracy on the held-out frames
        -> suggest a batch (select_batch) -> reveal its true labels -> train again ...

Label state is kept in memory per strategy (nothing is written to the dataset's label
store), and arrays are read into memory once, so a round costs one small training run
and one pass over the pool. Models are trained in-process with
:func:`lcls_dl.models.training.train` (the same loop ``lcls-dl train`` uses), from the same
seed every round, without a validation split (too few labels): probabilities in the loop
are the raw softmax (temperature 1), which ranks frames like the calibrated ones.

Optional semi-supervised boost (``pseudo_threshold``): pool frames the model gives a top
probability >= threshold get its guess as a *pseudo-label*; a second model trained on
labels + pseudo-labels is scored separately (``accuracy_pseudo``). Pseudo-labels never
count as labels and never enter the next round.

Outputs in ``out_dir``: ``curve.csv`` (one row per strategy and round), ``curve.png``
(held-out accuracy vs number of labels, one curve per strategy), ``summary.json``
(labels needed to reach the target accuracy per strategy, ratio to random, configuration,
provenance).

Examples
--------
>>> cfg = LoopConfig(rounds=4, budget=20, seed_labels=20, holdout=500)   # doctest: +SKIP
>>> res = run_active_loop("data1", "truth.csv", "loop1", cfg)            # doctest: +SKIP
>>> res["labels_to_target"]                                              # doctest: +SKIP
{'margin': 100, 'badge': 120, 'random': None}
"""
import csv
import dataclasses
import io
import logging
import os
import time

import numpy as np

from ..errors import ConfigError, InputError
from . import stopping
from .suggest import STRATEGIES, ModelScorer, pool_outputs, select_batch

log = logging.getLogger(__name__)

SMALL_BLUEPRINT = {"cnn": {"filters": [8, 16], "kernel": 3, "pool": 2, "global_pool": "max+avg"},
                   "dnn": {"units": [32]}, "head": {"embedding": 16, "dropout": 0.2}}


@dataclasses.dataclass
class LoopConfig:
    """Settings of one simulated labeling campaign (all recorded in summary.json).

    Attributes
    ----------
    rounds : int
        Suggest/reveal rounds after the seed set (R); R+1 models are trained per strategy.
    budget : int
        Labels revealed per round (K).
    seed_labels : int
        Random labels to start from (same frames for every strategy).
    holdout : int
        Frames set aside (never labeled, never suggested) to measure accuracy.
    strategies : tuple of str
        Strategies compared; ``random`` is always added as the baseline.
    model, epochs, batch_size, lr, blueprint, augment :
        The model trained every round (see :class:`lcls_dl.models.training.TrainConfig`).
    min_steps : int
        At least this many optimizer steps per training run: with few labels an epoch is
        one or two steps, so the epoch count is raised to reach ``min_steps``.
    mc_passes : int
        Monte-Carlo dropout passes for ``bald``.
    diversity : float
        Top-``diversity*K`` thinning for score strategies (see :func:`select_batch`).
    ensemble_members : int
        Models (different seeds) per round for ``ensemble``.
    pseudo_threshold : float or None
        Top probability for pseudo-labels (None: off).
    target : float
        Held-out accuracy whose label cost is reported.
    max_pool : int or None
        Score at most this many pool frames per round (a random subset; None: all).
    stop_at_target : bool
        Stop a strategy's rounds once it reaches ``target`` (saves time in benchmarks).
    random_budget, random_rounds : int or None
        The random baseline's own schedule (default: ``budget``/``rounds``), so that it can
        be followed to the larger label counts it needs.
    seed : int
    """

    rounds: int = 5
    budget: int = 20
    seed_labels: int = 20
    holdout: int = 500
    strategies: tuple = ("margin", "badge")
    model: str = "cnn+dnn"
    epochs: int = 15
    batch_size: int = 32
    lr: float = 3e-3
    blueprint: dict = None
    augment: bool = False
    min_steps: int = 120
    mc_passes: int = 10
    diversity: float = 2.0
    ensemble_members: int = 3
    pseudo_threshold: float = None
    target: float = 0.97
    max_pool: int = None
    random_budget: int = None
    random_rounds: int = None
    stop_at_target: bool = False
    seed: int = 0

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["strategies"] = list(self.strategies)
        d["blueprint"] = self.blueprint if self.blueprint is not None else SMALL_BLUEPRINT
        return d


# -- data -------------------------------------------------------------------------------------
class MemoryDataset:
    """Selected rows of a :class:`lcls_dl.dataset.Dataset`, held in memory, with own labels.

    Provides what training and scoring read (``read``, ``labels``, ``shapes``, ``classes``,
    ``ids``, ``preprocessing``, ``scalar_names``, ``path``, ``checksum``); rows keep the
    dataset's numbering.
    """

    def __init__(self, dataset, rows, arrays=("image", "profile", "scalars")):
        rows = np.asarray(rows, np.int64)
        self.path = dataset.path
        self.checksum = dataset.checksum
        self.manifest = dataset.manifest
        self.preprocessing = dataset.preprocessing
        self.scalar_names = dataset.scalar_names
        self.classes = list(dataset.classes)
        self.ids = dataset.ids
        self.files = dataset.files
        self.events = dataset.events
        self.labels = np.full(len(dataset), -1, np.int16)
        self._shapes = dataset.shapes()
        self._where = np.full(len(dataset), -1, np.int64)
        self._where[rows] = np.arange(len(rows))
        self._arrays = {}
        for start in range(0, len(rows), 1024):
            block = dataset.read(rows[start:start + 1024], arrays)
            for name, arr in block.items():
                self._arrays.setdefault(name, []).append(arr)
        self._arrays = {k: np.concatenate(v) for k, v in self._arrays.items()}

    def __len__(self):
        return len(self.ids)

    def shapes(self):
        return dict(self._shapes)

    def read(self, rows, arrays=("image", "profile", "scalars")):
        pos = self._where[np.asarray(rows, np.int64).reshape(-1)]
        if (pos < 0).any():
            raise InputError("frame not loaded into the loop's memory", self.path)
        return {name: self._arrays[name][pos] for name in arrays}

    def close(self):
        pass


def load_truth(path, dataset):
    """Truth labels for dataset rows: ``(rows, label indices, classes)``.

    Classes are the dataset's, plus truth classes it does not know (appended). Truth ids
    not in the dataset are ignored (a truth file may cover several runs); none matching
    raises :class:`InputError`.
    """
    from .label_store import read_label_csv

    ids, names = read_label_csv(path)
    pos = dataset.index_of(ids)
    keep = [(p, n) for p, n in zip(pos, names) if p >= 0 and n is not None]
    if not keep:
        raise InputError("no truth label matches a frame of the dataset (ids are FILE:EVENT)",
                         path)
    classes = list(dataset.classes)
    for n in sorted({n for _, n in keep} - set(classes)):
        classes.append(n)
    lookup = {c: i for i, c in enumerate(classes)}
    rows = np.array([p for p, _ in keep], np.int64)
    labels = np.array([lookup[n] for _, n in keep], np.int64)
    order = np.argsort(rows, kind="stable")
    rows, labels = rows[order], labels[order]
    uniq, first = np.unique(rows[::-1], return_index=True)  # last entry per frame wins
    last = len(rows) - 1 - first
    return rows[last], labels[last], classes


def split_pool(n, holdout, seed_labels, labels, seed=0):
    """Shuffle ``n`` truth positions into (holdout, pool, seed set within pool).

    The seed set is random but holds at least two classes (a classifier needs them).
    """
    if holdout + seed_labels >= n:
        raise ConfigError(f"holdout ({holdout}) + seed labels ({seed_labels}) leave no pool "
                          f"out of {n} frames with truth")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    hold, pool = perm[:holdout], perm[holdout:]
    seed_set = list(pool[:seed_labels])
    k = seed_labels
    while len(set(labels[seed_set])) < 2 and k < len(pool):
        seed_set.append(pool[k])  # rare classes: extend the random draw until two classes
        k += 1
    return np.sort(hold), pool, np.asarray(seed_set, np.int64)


# -- one model ----------------------------------------------------------------------------
def train_small(mem, rows, classes, cfg, seed):
    """Train a fresh model on ``mem`` rows (labels from ``mem.labels``) -> keras.Model."""
    import keras

    from ..models.builders import build_model, input_names
    from ..models.data import normalization_stats
    from ..models.training import TrainConfig, train

    keras.utils.set_random_seed(int(seed))
    shapes = mem.shapes()
    n_scalars = shapes["scalars"][0] if shapes["scalars"] else 0
    names = tuple(input_names(cfg.model, n_scalars))
    norm = normalization_stats(mem, rows, seed=seed, arrays=names)
    bp = cfg.blueprint if cfg.blueprint is not None else SMALL_BLUEPRINT
    model = build_model(cfg.model, shapes["image"], shapes["profile"][0], n_scalars,
                        len(classes), blueprint=bp, seed=seed, norm=norm)
    steps_per_epoch = max(1, -(-len(rows) // cfg.batch_size))
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    tcfg = TrainConfig(model=cfg.model, epochs=epochs, batch_size=cfg.batch_size,
                       lr=cfg.lr, patience=0, seed=seed, val_fraction=0.0, augment=cfg.augment,
                       class_weighting=True, calibrate=False, blueprint=bp, progress=False)
    train(model, mem, {"train": np.asarray(rows, np.int64), "val": np.zeros(0, np.int64)},
          classes, tcfg)
    return model


def _accuracy(scorer, mem, rows, truth):
    out = pool_outputs([scorer], mem, rows, batch_size=512)
    return float((out["probs"].argmax(1) == truth).mean()) if len(rows) else float("nan"), out


# -- the loop ---------------------------------------------------------------------------------
def run_active_loop(dataset_dir, truth_csv, out_dir, config=None, progress=None):
    """Simulate labeling campaigns for each strategy; write and return the results.

    Parameters
    ----------
    dataset_dir : str
        An ingested dataset (its own labels are ignored; truth comes from ``truth_csv``).
    truth_csv : str
        ``id,label`` or ``file,event,label`` for (a superset of) the frames.
    out_dir : str
    config : LoopConfig or dict, optional
    progress : callable, optional
        ``progress(message)`` after every round.

    Returns
    -------
    dict
        ``curve`` (list of row dicts), ``labels_to_target`` ({strategy: labels or None}),
        ``ratio_to_random``, ``paths``.
    """
    import tensorflow as tf

    from ..dataset import Dataset
    from ..models.builders import input_names

    cfg = config if isinstance(config, LoopConfig) else LoopConfig(**dict(config or {}))
    strategies = [s for s in cfg.strategies if s != "random"] + ["random"]
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"unknown strategy {s!r} (one of {', '.join(STRATEGIES)})")
    if cfg.rounds < 0 or cfg.budget < 1 or cfg.seed_labels < 2 or cfg.holdout < 1:
        raise ConfigError("need rounds >= 0, budget >= 1, seed labels >= 2, holdout >= 1")
    tf.config.experimental.enable_op_determinism()
    dataset = Dataset(dataset_dir, use_label_store=False)
    rows, truth, classes = load_truth(truth_csv, dataset)
    dataset.classes = classes
    shapes = dataset.shapes()
    names = tuple(input_names(cfg.model, shapes["scalars"][0] if shapes["scalars"] else 0))
    hold_i, pool_i, seed_i = split_pool(len(rows), cfg.holdout, cfg.seed_labels, truth, cfg.seed)
    mem = MemoryDataset(dataset, rows, names)
    mem.classes = classes
    truth_of = np.full(len(dataset), -1, np.int64)
    truth_of[rows] = truth
    hold_rows, pool_rows = rows[hold_i], rows[pool_i]
    log.info("active loop: %d frames with truth, %d held out, pool %d, seed %d labels",
             len(rows), len(hold_rows), len(pool_rows), len(seed_i))
    curve = []
    os.makedirs(out_dir, exist_ok=True)
    t_all = time.perf_counter()
    for strategy in strategies:
        labeled = set(rows[seed_i].tolist())
        prev_pred = None
        n_rounds, budget = cfg.rounds, cfg.budget
        if strategy == "random":
            n_rounds = cfg.rounds if cfg.random_rounds is None else cfg.random_rounds
            budget = cfg.budget if cfg.random_budget is None else cfg.random_budget
        for rnd in range(n_rounds + 1):
            t0 = time.perf_counter()
            lab_rows = np.array(sorted(labeled), np.int64)
            mem.labels[:] = -1
            mem.labels[lab_rows] = truth_of[lab_rows]
            model = train_small(mem, lab_rows, classes, cfg, cfg.seed)
            scorer = ModelScorer(model, {"temperature": 1.0})
            acc, _ = _accuracy(scorer, mem, hold_rows, truth_of[hold_rows])
            unl = np.array([r for r in pool_rows if r not in labeled], np.int64)
            if cfg.max_pool and len(unl) > cfg.max_pool:
                sub = np.random.default_rng(cfg.seed + rnd).choice(len(unl), cfg.max_pool,
                                                                   replace=False)
                unl = unl[np.sort(sub)]
            need_mc = cfg.mc_passes if strategy == "bald" else 0
            scorers = [scorer]
            if strategy == "ensemble":
                scorers += [ModelScorer(train_small(mem, lab_rows, classes, cfg,
                                                    cfg.seed + 1000 * m), {"temperature": 1.0})
                            for m in range(1, max(cfg.ensemble_members, 2))]
            outputs = pool_outputs(scorers, mem, unl, mc_passes=need_mc, batch_size=512,
                                   seed=cfg.seed + rnd)
            pred_all = outputs["probs"].argmax(1)
            sig = stopping.stopping_signal(outputs["probs"], None)
            # stability: same frames as the previous round's pool (labeled ones dropped)
            if prev_pred is not None:
                common = np.array([r in prev_pred for r in unl])
                if common.any():
                    a = np.array([prev_pred[r] for r in unl[common]])
                    b = pred_all[common]
                    sig["agreement"] = float((a == b).mean())
                    sig["kappa"] = float(stopping.cohen_kappa(a, b, len(classes)))
                    sig["stop"], sig["reason"] = stopping.should_stop(sig)
            prev_pred = dict(zip(unl.tolist(), pred_all.tolist()))
            row = {"strategy": strategy, "round": rnd, "labels": len(lab_rows),
                   "accuracy": acc, "pool": int(len(unl)),
                   "uncertain_share": sig["uncertain_share"], "agreement": sig["agreement"],
                   "kappa": sig["kappa"], "stop_signal": bool(sig["stop"])}
            if cfg.pseudo_threshold:
                row.update(_pseudo_round(mem, lab_rows, unl, outputs["probs"], truth_of,
                                         hold_rows, classes, cfg))
            picks = np.zeros(0, np.int64)
            if rnd < n_rounds and len(unl):
                lab_emb = None
                if strategy == "kcenter":
                    lab_emb = pool_outputs([scorer], mem, lab_rows, batch_size=512)["embedding"]
                picks, _ = select_batch(strategy, outputs, budget, labeled_embedding=lab_emb,
                                        diversity=cfg.diversity, seed=cfg.seed + rnd)
                labeled.update(unl[picks].tolist())  # the oracle reveals their truth
            row["suggested_classes"] = ";".join(
                f"{c}={int((truth_of[unl[picks]] == i).sum())}" for i, c in enumerate(classes))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            curve.append(row)
            msg = (f"{strategy:>16s} round {rnd}: {row['labels']:4d} labels  held-out accuracy "
                   f"{acc:.4f}  uncertain {row['uncertain_share']:.1%}  ({row['seconds']:.1f} s)")
            log.info(msg)
            if progress is not None:
                progress(msg)
            del model, scorers, scorer
            if cfg.stop_at_target and acc >= cfg.target:
                break
    result = summarize(curve, cfg.target, strategies)
    result["curve"] = curve
    result["config"] = cfg.to_dict()
    result["frames"] = {"truth": int(len(rows)), "holdout": int(len(hold_rows)),
                        "pool": int(len(pool_rows)), "seed_labels": int(len(seed_i))}
    result["classes"] = classes
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["paths"] = write_loop_outputs(out_dir, result, dataset_dir, truth_csv)
    dataset.close()
    return result


def _pseudo_round(mem, lab_rows, unl, probs, truth_of, hold_rows, classes, cfg):
    """Train on labels + confident pseudo-labels; report its accuracy and the pseudo error."""
    conf = probs.max(1) >= cfg.pseudo_threshold
    ps_rows = unl[conf]
    ps_lab = probs[conf].argmax(1)
    out = {"pseudo_labels": int(conf.sum()),
           "pseudo_error": float((ps_lab != truth_of[ps_rows]).mean()) if conf.any() else None,
           "accuracy_pseudo": None}
    if conf.any():
        saved = mem.labels.copy()
        mem.labels[ps_rows] = ps_lab
        rows = np.sort(np.concatenate([lab_rows, ps_rows]))
        model = train_small(mem, rows, classes, cfg, cfg.seed)
        acc, _ = _accuracy(ModelScorer(model, {"temperature": 1.0}), mem, hold_rows,
                           truth_of[hold_rows])
        out["accuracy_pseudo"] = acc
        mem.labels[:] = saved
    return out


def labels_to_reach(curve, strategy, target):
    """Fewest labels at which ``strategy`` reached held-out accuracy >= ``target`` (or None)."""
    hits = [r["labels"] for r in curve if r["strategy"] == strategy and r["accuracy"] >= target]
    return min(hits) if hits else None


def summarize(curve, target, strategies):
    """Labels needed per strategy, and each one's ratio to random's."""
    need = {s: labels_to_reach(curve, s, target) for s in strategies}
    max_labels = {s: max((r["labels"] for r in curve if r["strategy"] == s), default=0)
                  for s in strategies}
    final = {s: next((r["accuracy"] for r in reversed(curve) if r["strategy"] == s), None)
             for s in strategies}
    rnd = need.get("random")
    ratio = {}
    for s in strategies:
        if s == "random" or need[s] is None:
            ratio[s] = None
        elif rnd is not None:
            ratio[s] = need[s] / rnd
        else:  # random never got there: an upper bound on the ratio
            ratio[s] = f"< {need[s] / max(max_labels['random'], 1):.3f}"
    ladder = {}
    for t in sorted({0.85, 0.88, 0.9, 0.92, 0.95, 0.97, float(target)}):
        ladder[f"{t:g}"] = {s: labels_to_reach(curve, s, t) for s in strategies}
    return {"target": target, "labels_to_target": need, "max_labels": max_labels,
            "final_accuracy": final, "ratio_to_random": ratio, "labels_to_accuracy": ladder}


def curve_csv_text(curve):
    cols = ["strategy", "round", "labels", "accuracy", "pool", "uncertain_share", "agreement",
            "kappa", "stop_signal", "pseudo_labels", "pseudo_error", "accuracy_pseudo",
            "suggested_classes", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in curve:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float)
                                                     else r[k])) for k in cols})
    return buf.getvalue()


def write_loop_outputs(out_dir, result, dataset_dir, truth_csv):
    """curve.csv, curve.png, summary.json in ``out_dir`` (atomically); returns the paths."""
    from ..atomic import atomic_open, write_json
    from ..provenance import software_versions, utc_now

    paths = {"csv": os.path.join(out_dir, "curve.csv"),
             "png": os.path.join(out_dir, "curve.png"),
             "summary": os.path.join(out_dir, "summary.json")}
    with atomic_open(paths["csv"], "w", encoding="utf-8", newline="") as fh:
        fh.write(curve_csv_text(result["curve"]))
    plot_curve(paths["png"], result["curve"], result["target"],
               title=f"label efficiency on {os.path.basename(os.path.abspath(dataset_dir))}")
    summary = {k: v for k, v in result.items() if k not in ("curve", "paths")}
    summary.update({"kind": "lcls-dl active loop", "created": utc_now(),
                    "software": software_versions(),
                    "inputs": {"dataset": os.path.abspath(dataset_dir),
                               "truth": os.path.abspath(truth_csv)},
                    "outputs": dict(paths)})
    write_json(paths["summary"], summary)
    return paths


def plot_curve(path, curve, target=None, title=None):
    """Held-out accuracy vs labels, one line per strategy (pseudo-label runs dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in dict.fromkeys(r["strategy"] for r in curve):
        pts = [r for r in curve if r["strategy"] == s]
        line, = ax.plot([r["labels"] for r in pts], [r["accuracy"] for r in pts],
                        marker="o", ms=3, label=s, ls="--" if s == "random" else "-")
        ps = [r for r in pts if r.get("accuracy_pseudo") is not None]
        if ps:
            ax.plot([r["labels"] for r in ps], [r["accuracy_pseudo"] for r in ps], ":",
                    color=line.get_color(), label=f"{s} + pseudo-labels")
    if target:
        ax.axhline(target, color="gray", lw=0.8)
        ax.text(ax.get_xlim()[0], target, f" target {target:.0%}", va="bottom", fontsize=7,
                color="gray")
    ax.set_xlabel("human labels")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
