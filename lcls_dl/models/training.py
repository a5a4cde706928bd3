"""The training loop: data-parallel ready, resumable, deterministic for a fixed seed.

:func:`train` is a custom loop (not ``model.fit``) written around a World
(:mod:`lcls_dl.distributed.world`), so the same code runs as one process or as N MPI ranks:

1. initial weights and optimizer state are broadcast from the root (``world.broadcast``);
2. each step computes gradients in a ``tf.function`` (forward + backward on this rank's
   batch), hands them as numpy arrays to ``grad_reducer`` (default ``world.allreduce_mean``;
   replaceable by a bucketed reducer) and applies the averaged gradients;
3. every epoch each rank takes its rows from ``partition(rows, labels, epoch, seed, rank,
   size)`` (default :func:`lcls_dl.models.data.default_partition`); shorter partitions wrap so
   every rank runs the same number of steps;
4. loss/accuracy sums are reduced with ``world.allreduce_sum``;
5. only ``world.is_root`` writes checkpoints, ``metrics.csv``, TensorBoard logs and plots.

Single-process runs (``world.size == 1`` and no ``grad_reducer``) fuse gradient and update
into one ``tf.function`` (no numpy round trip); the numbers are the same.

Reproducibility: initializers and dropout are seeded, batch order and augmentation are
pure functions of ``(seed, epoch, rank)``, the dropout RNG state is reset from
``(seed, epoch)`` at every epoch start and TensorFlow op determinism is on, so a run
interrupted after epoch k and resumed with ``resume=True`` ends with the same weights as an
uninterrupted run.

Checkpoints (``MODEL_DIR/checkpoints/epoch-NNNN.npz`` + ``best.npz``, written atomically;
the last ``keep`` epochs are kept) hold every model variable (weights, normalization
constants, RNG state), every optimizer variable (iteration count, moments), the epoch,
history, early-stopping state and the configuration hash; a resume with a different
configuration is refused naming the key that differs.
"""
import csv
import dataclasses
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time

import numpy as np

from ..atomic import atomic_open
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"epoch-(\d{4,})\.npz$")
# options that change nothing in the trained weights (not part of the configuration hash)
_NOT_HASHED = ("keep", "calibrate", "block", "progress")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in model.json and checkpoints).

    Attributes
    ----------
    model : {"cnn+dnn", "cnn", "dnn"}
    epochs, batch_size : int
        ``batch_size`` is per rank; the global batch is ``batch_size * world.size``.
    lr : float
        Peak learning rate of Adam (linear warmup over ``warmup_epochs``, then cosine decay
        to ``lr * min_lr_fraction`` at the last epoch).
    patience : int
        Early stopping: stop after this many epochs without a val-loss improvement of
        ``min_delta`` (0 disables).
    seed : int
    val_fraction, test_fraction : float
        Split of the labeled frames by hashed sample id (:func:`lcls_dl.models.data.split_rows`).
    augment : bool
    class_weighting : bool
        Balanced class weights in the loss (for imbalanced data).
    calibrate : bool
        Fit temperature scaling on the validation split after training.
    keep : int
        Epoch checkpoints kept (plus ``best.npz``).
    blueprint : dict or None
    """

    model: str = "cnn+dnn"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    warmup_epochs: float = 1.0
    min_lr_fraction: float = 0.05
    patience: int = 6
    min_delta: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    augment: bool = True
    class_weighting: bool = True
    calibrate: bool = True
    keep: int = 3
    blueprint: dict = None
    block: int = 1024
    progress: bool = True

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def hashed(self):
        """The options that determine the weights (everything but ``keep``, ``calibrate``, ...)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}

    def hash(self):
        blob = json.dumps(self.hashed(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class WarmupCosine:
    """Learning rate at optimizer iteration ``step``: linear warmup, then cosine decay.

    A plain callable of the step (Keras optimizers accept any callable schedule); the same
    formula is evaluated inside the ``tf.function``.
    """

    def __init__(self, peak, warmup_steps, total_steps, min_fraction=0.05):
        self.peak = float(peak)
        self.warmup = max(int(warmup_steps), 0)
        self.total = max(int(total_steps), 1)
        self.floor = float(min_fraction) * self.peak

    def __call__(self, step):
        import tensorflow as tf

        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / float(max(self.warmup, 1))
        span = float(max(self.total - self.warmup, 1))
        frac = tf.clip_by_value((step - self.warmup) / span, 0.0, 1.0)
        cos = self.floor + 0.5 * (self.peak - self.floor) * (1.0 + tf.cos(math.pi * frac))
        return tf.where(step < self.warmup, warm, cos)


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_path(out_dir, epoch):
    return os.path.join(out_dir, CHECKPOINT_DIR, f"epoch-{epoch:04d}.npz")


def save_checkpoint(path, model_vars, opt_vars, state):
    """Write one checkpoint atomically (``.npz``: ``m/NNN``, ``o/NNN``, ``state`` JSON)."""
    arrays = {f"m/{i:04d}": np.asarray(v) for i, v in enumerate(model_vars)}
    arrays.update({f"o/{i:04d}": np.asarray(v) for i, v in enumerate(opt_vars)})
    state = dict(state, checkpoint_version=CHECKPOINT_VERSION,
                 n_model_vars=len(model_vars), n_opt_vars=len(opt_vars))
    arrays["state"] = np.frombuffer(json.dumps(state, default=_json_num).encode(), np.uint8)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _json_num(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def load_checkpoint(path):
    """Read a checkpoint -> ``(model_vars, opt_vars, state)``.

    Raises
    ------
    InputError
        The file is missing, truncated or corrupted (one line naming the file).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            state = json.loads(bytes(z["state"]).decode())
            model_vars = [z[f"m/{i:04d}"] for i in range(state["n_model_vars"])]
            opt_vars = [z[f"o/{i:04d}"] for i in range(state["n_opt_vars"])]
    except FileNotFoundError:
        raise InputError("checkpoint not found", path) from None
    except Exception as exc:  # zipfile.BadZipFile, EOFError, KeyError, ValueError, zlib.error
        raise InputError(f"corrupted or truncated checkpoint ({type(exc).__name__}); delete it "
                         f"or train again with --overwrite", path) from None
    return model_vars, opt_vars, state


def latest_checkpoint(out_dir):
    """Path of the newest epoch checkpoint in ``out_dir`` (None if there is none)."""
    found = []
    for p in glob.glob(os.path.join(out_dir, CHECKPOINT_DIR, "epoch-*.npz")):
        m = _CKPT_RE.search(p)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _prune(out_dir, keep):
    paths = sorted(glob.glob(os.path.join(out_dir, CHECKPOINT_DIR, "epoch-*.npz")))
    for p in paths[:-max(int(keep), 1)]:
        try:
            os.unlink(p)
        except OSError:
            pass


def _differing_key(a, b):
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


# -- output directory -------------------------------------------------------------------------
def prepare_out_dir(out_dir, resume=False, overwrite=False):
    """Check/create MODEL_DIR: refuse an existing one unless ``resume`` or ``overwrite``.

    ``overwrite`` deletes only a directory that looks like a model directory (has
    ``model.json``, ``checkpoints/``, ``logs/`` or ``metrics.csv``) or is empty.
    """
    out_dir = os.fspath(out_dir)
    exists = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError("output path exists and is not a directory", out_dir)
    if resume:
        if latest_checkpoint(out_dir) is None:
            raise InputError("nothing to resume: no checkpoints in the model directory", out_dir)
        return out_dir
    if exists:
        if not overwrite:
            raise InputError("model directory exists (use --overwrite to replace it or "
                             "--resume to continue training)", out_dir)
        looks = any(os.path.exists(os.path.join(out_dir, name))
                    for name in ("model.json", CHECKPOINT_DIR, "logs", "metrics.csv"))
        if not looks:
            raise InputError("refusing to overwrite a directory that is not an lcls-dl model "
                             "directory", out_dir)
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def write_metrics_csv(path, history):
    """Write the per-epoch history (list of dicts) as CSV, atomically."""
    if not history:
        return
    keys = list(history[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(buf.getvalue())


# -- the loop ---------------------------------------------------------------------------------
def _tb_scalar(tf, tag, value, step):
    """A TensorBoard scalar event without needing the tensorboard package installed."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=int(step),
                     metadata=meta.SerializeToString())


def _reset_rng(model, seed, epoch):
    """Put every seed generator (dropout) in a state that depends only on (seed, epoch)."""
    i = 0
    for v in model.variables:
        if "seed_generator_state" in v.path:
            dtype = np.asarray(v.numpy()).dtype
            v.assign(np.array([int(seed) * 7919 + i, int(epoch) << 20], dtype=dtype))
            i += 1


def train(model, dataset, splits, classes, config, out_dir=None, world=None, partition=None,
          grad_reducer=None, resume=False, callbacks=(), context=None):
    """Train ``model`` in place on ``dataset`` rows ``splits["train"]``.

    Parameters
    ----------
    model : keras.Model
        From :func:`lcls_dl.models.builders.build_model` (must have a ``logits`` layer).
    dataset : lcls_dl.dataset.Dataset
    splits : dict
        ``{"train": rows, "val": rows, ...}``.
    classes : list of str
    config : TrainConfig
    out_dir : str, optional
        Model directory for checkpoints/logs (None: keep nothing on disk).
    world : World, optional
        Default :class:`lcls_dl.distributed.world.LocalWorld`.
    partition : callable, optional
        ``partition(rows, labels, epoch, seed, rank, size) -> rows`` (default
        :func:`lcls_dl.models.data.default_partition`).
    grad_reducer : callable, optional
        ``grad_reducer(list of ndarray) -> list of ndarray`` (default ``world.allreduce_mean``).
    resume : bool
        Continue from the newest checkpoint in ``out_dir``.
    callbacks : sequence of callables
        ``cb(epoch, logs, model)`` after every epoch on every rank (epoch counts from 1);
        return True to stop training.
    context : dict, optional
        Extra JSON-able facts that must match on resume (dataset checksum, split counts).

    Returns
    -------
    dict
        ``{"history", "best_epoch", "best_val_loss", "epochs_run", "stopped_early",
        "train_seconds", "images_per_second"}``; ``model`` holds the best weights.
    """
    import tensorflow as tf

    from ..distributed.world import LocalWorld
    from .builders import sub_model
    from .data import Augmenter, class_weights, default_partition, make_tf_dataset

    world = world or LocalWorld()
    partition = partition or default_partition
    cfg = config
    labels_all = dataset.labels
    train_rows = np.asarray(splits["train"], np.int64)
    val_rows = np.asarray(splits.get("val", []), np.int64)
    train_labels = labels_all[train_rows].astype(np.int32)
    n_classes = len(classes)
    cw = (class_weights(train_labels, n_classes) if cfg.class_weighting
          else np.ones(n_classes, np.float32))
    shapes_all = dataset.shapes()
    names = [t.name.split(":")[0] for t in model.inputs]
    shapes = {n: shapes_all[n] for n in names}
    augment = Augmenter(dataset.preprocessing) if cfg.augment else None

    global_batch = cfg.batch_size * world.size
    steps_per_epoch = max(1, math.ceil(len(train_rows) / global_batch))
    schedule = WarmupCosine(cfg.lr, round(cfg.warmup_epochs * steps_per_epoch),
                            steps_per_epoch * cfg.epochs, cfg.min_lr_fraction)
    import keras

    # a zero-argument callable: evaluated at every update from the optimizer's own counter
    optimizer = keras.optimizers.Adam(learning_rate=lambda: schedule(optimizer.iterations))
    trainable = model.trainable_variables
    optimizer.build(trainable)
    logits_model = sub_model(model, "logits")
    cw_t = tf.constant(cw)

    def forward_backward(inputs, y):
        with tf.GradientTape() as tape:
            logits = logits_model(inputs, training=True)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            n = tf.cast(tf.shape(y)[0], tf.float32)
            loss = tf.reduce_sum(tf.gather(cw_t, y) * ce) / n
        grads = tape.gradient(loss, trainable)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(logits, 1, output_type=tf.int32), y), tf.float32))
        return tf.reduce_sum(ce), correct, grads

    grad_step = tf.function(forward_backward, reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def apply_step(grads):
        optimizer.apply_gradients(zip(grads, trainable))

    @tf.function(reduce_retracing=True)
    def fused_step(inputs, y):
        ce_sum, correct, grads = forward_backward(inputs, y)
        optimizer.apply_gradients(zip(grads, trainable))
        return ce_sum, correct

    local = world.size == 1 and grad_reducer is None
    reducer = grad_reducer or world.allreduce_mean

    # -- initial state: broadcast from root, or restore a checkpoint --------------------------
    context = dict(context or {})
    state = {"epoch": 0, "history": [], "best_val_loss": None, "best_epoch": 0, "wait": 0,
             "stopped": False}
    if resume:
        path = latest_checkpoint(out_dir) if (out_dir and world.is_root) else None
        path = world.bcast_object(path)
        if path is None:
            raise InputError("nothing to resume: no checkpoints", out_dir)
        mvars, ovars, ck = load_checkpoint(path)
        diff = _differing_key(ck.get("config", {}), cfg.hashed())
        if diff is None:
            diff = _differing_key(ck.get("context", {}), context)
        if diff is not None:
            key, old, new = diff
            raise ConfigError(f"cannot resume: option {key} was {old!r} in the checkpoint, "
                              f"now {new!r} (use the same options, or --overwrite)", path)
        if len(mvars) != len(model.variables) or len(ovars) != len(optimizer.variables) or any(
                tuple(a.shape) != tuple(v.shape) for a, v in zip(mvars, model.variables)):
            raise InputError("checkpoint does not match the model (different topology)", path)
        for v, a in zip(model.variables, mvars):
            v.assign(a)
        for v, a in zip(optimizer.variables, ovars):
            v.assign(a)
        state = {k: ck.get(k, state[k]) for k in state}
        if world.is_root:
            log.info("resuming after epoch %d from %s", state["epoch"], path)
    else:
        mvars = world.broadcast([np.array(v.numpy()) for v in model.variables])
        for v, a in zip(model.variables, mvars):
            v.assign(a)
        ovars = world.broadcast([np.array(v.numpy()) for v in optimizer.variables])
        for v, a in zip(optimizer.variables, ovars):
            v.assign(a)

    best_vars = None
    if state["best_epoch"] and out_dir:
        best_path = os.path.join(out_dir, CHECKPOINT_DIR, "best.npz")
        if world.is_root:
            best_vars = load_checkpoint(best_path)[0]
        best_vars = world.bcast_object(best_vars) if world.size > 1 else best_vars

    writer = None
    if out_dir and world.is_root:
        writer = tf.summary.create_file_writer(os.path.join(out_dir, "logs"))

    from ..cli.common import progress

    history = list(state["history"])
    t_start = time.perf_counter()
    images = 0
    epoch = state["epoch"]
    stopped_early = bool(state["stopped"]) and epoch < cfg.epochs  # early-stopped before
    while epoch < cfg.epochs and not state["stopped"]:
        epoch += 1
        t0 = time.perf_counter()
        _reset_rng(model, cfg.seed, epoch)
        part = np.asarray(partition(train_rows, train_labels, epoch, cfg.seed, world.rank,
                                    world.size), np.int64)
        length = max(world.allgather_object(int(len(part))))
        part_labels = labels_all[part].astype(np.int32)
        data = make_tf_dataset(dataset, part, part_labels, cfg.batch_size, shapes,
                               seed=cfg.seed, epoch=epoch, rank=world.rank, shuffle=True,
                               augment=augment, block=cfg.block, length=length)
        sums = np.zeros(3)  # ce sum, correct, frames
        bar = progress(total=math.ceil(length / cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="batch", disable=not (cfg.progress and world.is_root) or None)
        for inputs, y in data:
            if local:
                ce_sum, correct = fused_step(inputs, y)
            else:
                ce_sum, correct, grads = grad_step(inputs, y)
                reduced = reducer([g.numpy() for g in grads])
                apply_step([tf.convert_to_tensor(g) for g in reduced])
            n = int(y.shape[0])
            sums += (float(ce_sum), float(correct), n)
            images += n
            bar.update(1)
        bar.close()
        sums = np.asarray(world.allreduce_sum(sums), np.float64)
        train_s = time.perf_counter() - t0
        val = evaluate_rows(model, dataset, val_rows, labels_all, world, cfg.batch_size * 4,
                            logits_model=logits_model)
        row = {"epoch": epoch, "loss": sums[0] / max(sums[2], 1),
               "accuracy": sums[1] / max(sums[2], 1),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "lr": float(schedule(optimizer.iterations).numpy()),
               "seconds": train_s, "images_per_second": sums[2] / max(train_s, 1e-9)}
        history.append(row)
        monitor = row["val_loss"] if len(val_rows) else row["loss"]
        improved = state["best_val_loss"] is None or monitor < state["best_val_loss"] - cfg.min_delta
        if improved:
            state["best_val_loss"], state["best_epoch"], state["wait"] = float(monitor), epoch, 0
            best_vars = [np.array(v.numpy()) for v in model.variables]
        else:
            state["wait"] += 1
        stop = cfg.patience > 0 and state["wait"] >= cfg.patience
        state.update(epoch=epoch, history=history, stopped=bool(stop))
        if out_dir and world.is_root:
            ck_state = dict(state, config=cfg.hashed(), config_hash=cfg.hash(), context=context,
                            classes=list(classes))
            opt_vars = [np.array(v.numpy()) for v in optimizer.variables]
            if improved:
                save_checkpoint(os.path.join(out_dir, CHECKPOINT_DIR, "best.npz"), best_vars,
                                opt_vars, ck_state)
            save_checkpoint(checkpoint_path(out_dir, epoch),
                            [np.array(v.numpy()) for v in model.variables], opt_vars, ck_state)
            _prune(out_dir, cfg.keep)
            write_metrics_csv(os.path.join(out_dir, "metrics.csv"), history)
            with writer.as_default():
                for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
                    if row[key] is not None and np.isfinite(row[key]):
                        _tb_scalar(tf, key, row[key], epoch)
                writer.flush()
        if world.is_root and cfg.progress:
            log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  "
                     "%.0f img/s", epoch, cfg.epochs, row["loss"], row["accuracy"],
                     row["val_loss"], row["val_accuracy"], row["images_per_second"])
        # callbacks run after the checkpoint: an exception here (an interruption) loses nothing
        for cb in callbacks:
            stop = bool(cb(epoch, dict(row), model)) or stop
        stop = world.agree(stop) if world.size > 1 else stop
        if stop:
            stopped_early = epoch < cfg.epochs
            break
    wall = time.perf_counter() - t_start
    if best_vars is not None:
        for v, a in zip(model.variables, best_vars):
            v.assign(a)
    if writer is not None:
        writer.close()
    return {"history": history, "best_epoch": int(state["best_epoch"]),
            "best_val_loss": state["best_val_loss"], "epochs_run": int(epoch),
            "stopped_early": bool(stopped_early), "train_seconds": wall,
            "images_per_second": images / max(wall, 1e-9) if images else None}


def evaluate_rows(model, dataset, rows, labels_all, world=None, batch_size=128,
                  logits_model=None):
    """Mean loss and accuracy of ``model`` on dataset ``rows``, split over the world's ranks.

    Returns ``{"loss", "accuracy", "n"}`` (NaN loss/accuracy for no rows).
    """
    from ..distributed.world import LocalWorld
    from .model_dir import dataset_logits

    world = world or LocalWorld()
    rows = np.asarray(rows, np.int64)
    mine = rows[world.rank::world.size]
    sums = np.zeros(3)
    if len(mine):
        logits = dataset_logits(model, dataset, mine, batch_size, logits_model=logits_model)
        y = labels_all[mine].astype(np.int64)
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        sums += (-logp[np.arange(len(y)), y].sum(), (logits.argmax(1) == y).sum(), len(y))
    sums = np.asarray(world.allreduce_sum(sums), np.float64)
    if sums[2] == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}
    return {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2]),
            "n": int(sums[2])}


# -- the whole job: dataset dir -> model dir ------------------------------------------------
def run_training(dataset_dir, out_dir, config, world=None, partition=None, grad_reducer=None,
                 resume=False, overwrite=False, callbacks=(), command=None):
    """Train a model on an ingested dataset and write a complete MODEL_DIR.

    Does all the work of ``lcls-dl train`` (the CLI only parses options), so an MPI
    launcher can call it on every rank with an ``MPIWorld``.

    Parameters
    ----------
    dataset_dir, out_dir : str
    config : TrainConfig or dict
    world : World, optional
    partition, grad_reducer, callbacks : see :func:`train`
    resume, overwrite : bool
        Continue from the newest checkpoint / replace an existing model directory.
    command : str, optional
        Command line recorded in model.json.

    Returns
    -------
    dict
        The metadata written to ``model.json`` (on every rank).

    Raises
    ------
    InputError
        No labeled frames, a single class, an existing MODEL_DIR without ``overwrite``, a
        corrupted checkpoint on ``resume``.
    """
    from ..dataset import Dataset
    from ..distributed.world import LocalWorld
    from ..provenance import software_versions, utc_now
    from .builders import build_model, input_names
    from .calibration import calibrate, softmax
    from .data import normalization_stats, split_rows
    from .metrics import classification_report
    from .model_dir import dataset_logits, save_model_dir

    world = world or LocalWorld()
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("epochs and batch size must be at least 1")
    dataset = Dataset(dataset_dir)
    labeled = dataset.labeled
    if len(labeled) == 0:
        raise InputError("no labeled frames (add labels with ingest --labels or lcls-dl label)",
                         dataset_dir)
    present = sorted(set(dataset.labels[labeled].tolist()))
    if len(present) < 2:
        name = dataset.classes[present[0]] if present else "?"
        raise InputError(f"only one class among the labeled frames ({name!r}); a classifier "
                         f"needs at least two", dataset_dir)
    classes = list(dataset.classes)
    splits = split_rows(dataset.ids, dataset.labels, cfg.seed, cfg.val_fraction,
                        cfg.test_fraction)
    if len(splits["train"]) == 0:
        raise InputError("no labeled frames left for training after the validation/test split",
                         dataset_dir)
    err = None
    if world.is_root:
        try:
            prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
        except InputError as exc:
            err = (exc.what, exc.where)
    err = world.bcast_object(err)
    if err is not None:
        raise InputError(*err)
    world.barrier()

    if cfg.seed is not None:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(int(cfg.seed))
        tf.config.experimental.enable_op_determinism()
    shapes = dataset.shapes()
    n_scalars = shapes["scalars"][0] if shapes["scalars"] else 0
    names = input_names(cfg.model, n_scalars)
    norm = normalization_stats(dataset, splits["train"], seed=cfg.seed, arrays=tuple(names))
    model = build_model(cfg.model, shapes["image"], shapes["profile"][0], n_scalars,
                        len(classes), blueprint=cfg.blueprint, seed=cfg.seed, norm=norm)
    split_counts = {k: int(len(v)) for k, v in splits.items()}
    context = {"dataset_checksum": dataset.checksum, "classes": classes,
               "split_counts": split_counts}
    result = train(model, dataset, splits, classes, cfg, out_dir=out_dir, world=world,
                   partition=partition, grad_reducer=grad_reducer, resume=resume,
                   callbacks=callbacks, context=context)

    meta = None
    if world.is_root:
        reports, calib, temperature = {}, None, 1.0
        if len(splits["val"]):
            y_val = dataset.labels[splits["val"]].astype(np.int64)
            logits = dataset_logits(model, dataset, splits["val"])
            if cfg.calibrate:
                calib = calibrate(logits, y_val)
                temperature = calib["temperature"]
            reports["val"] = classification_report(y_val, softmax(logits, temperature), classes)
        if len(splits["test"]):
            y_test = dataset.labels[splits["test"]].astype(np.int64)
            logits = dataset_logits(model, dataset, splits["test"])
            reports["test"] = classification_report(y_test, softmax(logits, temperature),
                                                    classes)
        from .blueprint import validate_blueprint

        meta = {
            "schema_version": 1, "kind": "lcls-dl model", "created": utc_now(),
            "software": software_versions(), "command": command,
            "model_kind": cfg.model, "classes": classes,
            "inputs": {n: list(shapes[n]) for n in names},
            "preprocessing": dataset.preprocessing,
            "q_edges": dataset.preprocessing.get("q_edges"),
            "scalar_names": dataset.scalar_names,
            "geometry": dataset.manifest.get("geometry"),
            "dataset": {"path": os.path.abspath(dataset.path),
                        "manifest_checksum": dataset.checksum, "n_frames": len(dataset),
                        "class_counts": dataset.class_counts()},
            "seed": cfg.seed, "temperature": temperature, "calibration": calib,
            "split": {"method": "sha256('<seed>:<id>') -> [0,1): test < test_fraction <= val "
                                "< test_fraction + val_fraction <= train",
                      "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                      "test_fraction": cfg.test_fraction, "counts": split_counts,
                      "class_counts": {k: dataset.class_counts(v) for k, v in splits.items()}},
            "training": {"options": cfg.to_dict(), "config_hash": cfg.hash(),
                         "world_size": world.size,
                         "global_batch_size": cfg.batch_size * world.size,
                         "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
                         "best_val_loss": result["best_val_loss"],
                         "stopped_early": result["stopped_early"],
                         "train_seconds": result["train_seconds"],
                         "images_per_second": result["images_per_second"],
                         "resumed": bool(resume), "params": int(model.count_params())},
            "blueprint": validate_blueprint(cfg.blueprint),
            "metrics": reports,
        }
        save_model_dir(out_dir, model, meta)
        from .plots import plot_curves

        plot_curves(result["history"], os.path.join(out_dir, "curves.png"),
                    title=f"{cfg.model} on {os.path.basename(os.path.abspath(dataset.path))}")
    meta = world.bcast_object(meta)
    dataset.close()
    return meta
