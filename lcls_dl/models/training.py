"""The training loop: data-parallel ready, resumable, deterministic for a fixed seed.

:func:`train` is a custom loop (not ``model.fit``) written around a World
(:mod:`lcls_dl.distributed.local_world`), so the same code runs as one process or as N MPI ranks:

1. initial weights and optimizer state are broadcast from the root (``world.broadcast``);
2. each step computes gradients in a ``tf.function`` (forward + backward on this rank's
   batch), sums them over ranks and applies them in a second ``tf.function``. By default
   (an MPI world without gradient compression) the step folds ``1 / size`` into the loss
   and returns its gradients as a few fused buffers that are summed in place, zero-copy
   (:mod:`lcls_dl.distributed.gradient_fusion`); with a ``grad_reducer``, or with
   compression, they go as numpy arrays to ``grad_reducer`` (default
   ``world.allreduce_mean``) and the averages are applied;
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

Stops and failures (docs/fault_tolerance.md): with a ``StopRequest`` (SIGTERM/SIGUSR1)
all ranks stop after the same step and the root writes ``epoch-NNNN-step-SSSSSS.npz``;
``resume=True`` continues mid-epoch with the same weights, bitwise, as an uninterrupted
run. Under a :class:`lcls_dl.distributed.ulfm.FaultTolerantWorld` dead ranks raise
``WorldShrunk`` in a collective; the survivors re-sync from the new root, re-partition and
redo the step.
"""
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import signal
import time

import numpy as np

from ..atomic import atomic_open
from ..checkpoints import (CHECKPOINT_DIR, checkpoint_path, latest_checkpoint,  # noqa: F401
                           load_checkpoint, prepare_out_dir, prune_checkpoints, save_checkpoint)
from ..distributed.gradient_fusion import FusionPlan, TensorReducer
from ..errors import ConfigError, InputError, LclsError

log = logging.getLogger(__name__)

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
    lr_scaling : {"linear", "none"}
        ``"linear"``: the peak learning rate is ``lr * global_batch / lr_reference_batch``
        (Goyal et al.'s linear scaling rule, with the warmup above), where the global batch
        is ``batch_size * world.size``; ``"none"``: ``lr`` whatever the number of ranks.
    lr_reference_batch : int or None
        Batch size ``lr`` was chosen for (None: ``batch_size``, so one process trains
        with ``lr`` and N ranks with ``N * lr``).
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
    lr_scaling: str = "linear"
    lr_reference_batch: int = None
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

    def peak_lr(self, world_size):
        """Peak learning rate for ``world_size`` ranks (see ``lr_scaling``).

        Examples
        --------
        >>> TrainConfig(lr=1e-3, batch_size=16).peak_lr(4)
        0.004
        >>> TrainConfig(lr=1e-3, batch_size=16, lr_reference_batch=32).peak_lr(1)
        0.0005
        """
        if self.lr_scaling == "none":
            return float(self.lr)
        if self.lr_scaling != "linear":
            raise ConfigError(f"unknown lr_scaling {self.lr_scaling!r} (linear or none)")
        ref = self.lr_reference_batch or self.batch_size
        return float(self.lr) * self.batch_size * int(world_size) / float(ref)

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


def _broadcast_variables(world, variables):
    """Give every rank the root's values of ``variables`` (Keras variables), in place."""
    values = world.broadcast([np.array(v.numpy()) for v in variables])
    for v, a in zip(variables, values):
        v.assign(a)


def _differing_key(a, b):
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


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


class TooFewRanks(LclsError):
    """Fewer ranks survive than the run accepts (``min_ranks``): restart from a checkpoint.

    Exit code 75 (``EX_TEMPFAIL``): the launcher's ``--max-restarts`` restarts the job.
    """

    exit_code = 75


class _TestHooks:
    """Fault injection for the fault-tolerance tests, read from the environment.

    - ``LCLS_DL_TEST_KILL="R:S[,R:S...]"``: the rank whose ``COMM_WORLD`` rank is R
      SIGKILLs itself before global step S (the optimizer's iteration count);
    - ``LCLS_DL_TEST_SIGNAL="R:S:SIGTERM"``: rank R sends itself that signal before step S;
    - ``LCLS_DL_TEST_KILL_AFTER_REDUCE="R:S[,R:S...]"``: rank R SIGKILLs itself right
      after the gradient reduction of step S, before the step's update is applied (the
      others then see the loss in the next collective, with that update pending);
    - ``LCLS_DL_TEST_KILL_IN_EVAL="R:E"``: rank R SIGKILLs itself when the evaluation at
      the end of epoch E starts;
    - ``LCLS_DL_TEST_KILL_ONCE=PREFIX``: fire each kill only once (marker file
      ``PREFIX.R.S``), so a restarted job gets past it;
    - ``LCLS_DL_TEST_STEP_SLEEP=SECONDS``: sleep before every step (slow a tiny run down
      so a test can signal it mid-epoch).
    """

    def __init__(self, me, environ=None):
        env = os.environ if environ is None else environ
        self.me = int(me)
        self.kills = self._steps(env.get("LCLS_DL_TEST_KILL", ""))
        self.late_kills = self._steps(env.get("LCLS_DL_TEST_KILL_AFTER_REDUCE", ""))
        self.eval_kills = self._steps(env.get("LCLS_DL_TEST_KILL_IN_EVAL", ""))
        self.signals = {}
        for item in filter(None, env.get("LCLS_DL_TEST_SIGNAL", "").split(",")):
            r, s, name = item.split(":")
            if int(r) == self.me:
                self.signals[int(s)] = getattr(signal, name)
        self.once = env.get("LCLS_DL_TEST_KILL_ONCE")
        self.sleep = float(env.get("LCLS_DL_TEST_STEP_SLEEP", 0) or 0)
        self.active = bool(self.kills or self.late_kills or self.signals or self.sleep)

    def _steps(self, spec):
        """Steps ``S`` of the items ``R:S`` of ``spec`` with ``R`` this rank."""
        return {int(s) for r, s in (item.split(":") for item in filter(None, spec.split(",")))
                if int(r) == self.me}

    def before_eval(self, epoch):
        if epoch in self.eval_kills:
            log.warning("test hook: rank %d kills itself in the evaluation of epoch %d",
                        self.me, epoch)
            os.kill(os.getpid(), signal.SIGKILL)

    def after_reduce(self, step):
        if step in self.late_kills:
            log.warning("test hook: rank %d kills itself after reducing step %d", self.me, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def before_step(self, step):
        if self.sleep:
            time.sleep(self.sleep)
        if step in self.signals:
            os.kill(os.getpid(), self.signals.pop(step))
        if step in self.kills:
            if self.once:
                mark = f"{self.once}.{self.me}.{step}"
                if os.path.exists(mark):
                    return
                with open(mark, "w") as fh:
                    fh.write(str(os.getpid()))
            log.warning("test hook: rank %d kills itself before step %d", self.me, step)
            os.kill(os.getpid(), signal.SIGKILL)


def _world_rank(world):
    """This process's rank in the original ``COMM_WORLD`` (stable across shrinks)."""
    ranks = getattr(world, "world_ranks", None)
    return int(ranks[world.rank]) if ranks else int(world.rank)


def weights_digest(model):
    """SHA-256 of every model variable's bytes (ranks that agree bitwise give equal digests)."""
    h = hashlib.sha256()
    for v in model.variables:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()


def train(model, dataset, splits, classes, config, out_dir=None, world=None, partition=None,
          grad_reducer=None, resume=False, callbacks=(), context=None, stop=None,
          min_ranks=1):
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
        Default :class:`lcls_dl.distributed.local_world.LocalWorld`. A
        :class:`lcls_dl.distributed.ulfm.FaultTolerantWorld` makes the loop survive dead
        ranks: on :class:`~lcls_dl.distributed.ulfm.WorldShrunk` the survivors take the
        new root's weights, optimizer state and position, re-partition the epoch among
        themselves, rescale the learning rate to the new global batch and redo the step.
    partition : callable, optional
        ``partition(rows, labels, epoch, seed, rank, size) -> rows`` (default
        :func:`lcls_dl.models.data.default_partition`).
    grad_reducer : callable, optional
        ``grad_reducer(list of ndarray) -> list of ndarray`` returning rank averages.
        Default: the zero-copy fused path (``world.allreduce_sum_inplace``), or
        ``world.allreduce_mean`` when the world compresses gradients.
    resume : bool
        Continue from the newest checkpoint in ``out_dir`` (epoch boundary or mid-epoch).
    callbacks : sequence of callables
        ``cb(epoch, logs, model)`` after every epoch on every rank (epoch counts from 1);
        return True to stop training.
    context : dict, optional
        Extra JSON-able facts that must match on resume (dataset checksum, split counts).
    stop : lcls_dl.distributed.signals.StopRequest, optional
        Checked (a collective) after every step: once any rank got SIGTERM/SIGUSR1 all
        ranks stop after the same step and the root writes a mid-epoch checkpoint.
    min_ranks : int
        Raise :class:`TooFewRanks` when a shrink leaves fewer ranks.

    Returns
    -------
    dict
        ``{"history", "best_epoch", "best_val_loss", "epochs_run", "stopped_early",
        "train_seconds", "images_per_second", "interrupted", "checkpoint", "world_size",
        "lost_ranks", "recoveries", "peak_lr"}``; ``model`` holds the best weights
        (the current ones when ``interrupted``). ``images_per_second`` counts the
        training frames of all ranks (not one rank's) over this run's wall time,
        evaluation included; each history row has the same for its epoch's training.
    """
    import tensorflow as tf

    from ..distributed.local_world import LocalWorld
    from .builders import sub_model
    from .data import Augmenter, class_weights, default_partition, make_tf_dataset

    try:
        from ..distributed.ulfm import WorldShrunk
    except ImportError:  # pragma: no cover - ulfm imports nothing heavy
        WorldShrunk = ()

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
    me = _world_rank(world)
    start_size = world.size

    global_batch = cfg.batch_size * world.size
    steps_per_epoch = max(1, math.ceil(len(train_rows) / global_batch))
    # the schedule's shape is fixed at the start; its peak follows the global batch
    schedule = WarmupCosine(1.0, round(cfg.warmup_epochs * steps_per_epoch),
                            steps_per_epoch * cfg.epochs, cfg.min_lr_fraction)
    peak = tf.Variable(cfg.peak_lr(world.size), trainable=False, dtype=tf.float32)
    import keras

    # a zero-argument callable: evaluated at every update from the optimizer's own counter
    optimizer = keras.optimizers.Adam(
        learning_rate=lambda: schedule(optimizer.iterations) * peak)
    trainable = model.trainable_variables
    optimizer.build(trainable)
    logits_model = sub_model(model, "logits")
    cw_t = tf.constant(cw)
    local = world.size == 1 and grad_reducer is None and not hasattr(world, "ft")
    averager = getattr(world, "averager", None)
    # the default MPI path: fused buffers reduced in place, 1/N folded into the loss
    zero_copy = (not local and grad_reducer is None and hasattr(world, "allreduce_sum_inplace")
                 and getattr(averager, "compression", None) is None)
    inv_size = tf.Variable(1.0 / world.size if zero_copy else 1.0, trainable=False,
                           dtype=tf.float32)

    def forward_backward(inputs, y):
        with tf.GradientTape() as tape:
            logits = logits_model(inputs, training=True)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            n = tf.cast(tf.shape(y)[0], tf.float32)
            loss = tf.reduce_sum(tf.gather(cw_t, y) * ce) / n * inv_size
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

    reducer = grad_reducer or (lambda arrays: world.allreduce_mean(arrays))
    if zero_copy:
        plan = FusionPlan([v.shape for v in trainable], [v.dtype for v in trainable])
        sum_buffers = TensorReducer(world, protect=model.variables)

        @tf.function(reduce_retracing=True)
        def fused_grad_step(inputs, y):
            ce_sum, correct, grads = forward_backward(inputs, y)
            return ce_sum, correct, plan.fuse(grads)

        @tf.function(reduce_retracing=True)
        def apply_fused(buffers):
            optimizer.apply_gradients(zip(plan.unfuse(buffers), trainable))

        @tf.function(reduce_retracing=True)
        def apply_then_grad(buffers, inputs, y):
            # the last step's update and this step's gradients in one call: a second
            # call per step cost ~0.3 ms of an ~8 ms step (CNN+DNN, batch 32, one thread).
            # Automatic control dependencies order the update before the forward pass.
            optimizer.apply_gradients(zip(plan.unfuse(buffers), trainable))
            ce_sum, correct, grads = forward_backward(inputs, y)
            return ce_sum, correct, plan.fuse(grads)

        # its outputs come from another graph: checked on its own first call
        sum_pipelined = TensorReducer(world, protect=model.variables)

    # -- initial state: broadcast from root, or restore a checkpoint --------------------------
    context = dict(context or {})
    # epoch: complete epochs; step: steps done in epoch + 1; sums: (ce, correct, frames) so far
    # updates: optimizer steps the loop has counted (== optimizer.iterations once applied)
    state = {"epoch": 0, "step": 0, "updates": 0, "sums": [0.0, 0.0, 0.0], "history": [],
             "best_val_loss": None, "best_epoch": 0, "wait": 0, "stopped": False}
    resumed_frames = 0.0  # frames the resumed epoch had trained before this run
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
        resumed_frames = float(state["sums"][2])
        if not world.is_root:  # the saved partial sums are the job's; count them once
            state["sums"] = [0.0, 0.0, 0.0]
        if state["step"] and ck.get("world_size", world.size) != world.size:
            log.warning("resuming mid-epoch with %d ranks instead of %d: the rest of epoch %d "
                        "is re-partitioned (frame coverage of that epoch is approximate)",
                        world.size, ck.get("world_size"), state["epoch"] + 1)
        if world.is_root:
            log.info("resuming after epoch %d%s from %s", state["epoch"],
                     f" + {state['step']} steps" if state["step"] else "", path)
    else:
        _broadcast_variables(world, model.variables)
        _broadcast_variables(world, optimizer.variables)

    best_vars = None
    if state["best_epoch"] and out_dir:
        best_path = os.path.join(out_dir, CHECKPOINT_DIR, "best.npz")
        best_error = None
        if world.is_root:
            try:
                best_vars = load_checkpoint(best_path)[0]
            except LclsError as exc:  # the others must not wait for weights that never come
                best_error = exc
        if world.size > 1:
            best_vars, message = world.bcast_object(
                (best_vars, None if best_error is None else str(best_error)))
            if message is not None and best_error is None:
                raise InputError(f"rank 0 cannot read the best checkpoint: {message}", best_path)
        if best_error is not None:
            raise best_error

    from ..cli.common import progress

    writer = None
    hooks = _TestHooks(me)
    t_start = time.perf_counter()
    images = -resumed_frames  # frames trained by all ranks in this run
    sums = np.asarray(state.pop("sums"), np.float64)
    phase = "train" if state["epoch"] < cfg.epochs and not state["stopped"] else "done"
    stopped_early = bool(state["stopped"]) and state["epoch"] < cfg.epochs
    data_iter, bar, n_steps, pending_stop = None, None, 0, False
    need_sync, interrupted, ck_path = False, None, None
    write_error = None  # the root's failure to write checkpoints/logs this epoch
    recovering, recoveries = None, []
    # zero-copy path: the last step's summed gradients, applied by the next step's call
    # (or right away at the end of an epoch, at a stop, and after a lost rank)
    unapplied = None

    def checkpoint_state():
        return dict(state, sums=sums.tolist(), world_size=world.size, config=cfg.hashed(),
                    config_hash=cfg.hash(), context=context, classes=list(classes))

    def sync_from_root():
        """After a shrink: every survivor takes the new root's weights, optimizer and place."""
        nonlocal phase, pending_stop
        _broadcast_variables(world, model.variables)
        _broadcast_variables(world, optimizer.variables)
        shared = world.bcast_object((state, phase, pending_stop))
        state.clear()
        state.update(shared[0])
        phase, pending_stop = shared[1], shared[2]
        peak.assign(cfg.peak_lr(world.size))
        if zero_copy:
            inv_size.assign(1.0 / world.size)

    def finish_recovery(after_step):
        """Record the pending recovery: time to the first step after the shrink, or (no
        step came after it) to the end of training."""
        elapsed = time.perf_counter() - recovering.pop("_t")
        rec = dict(recovering, first_step_s=elapsed if after_step else None, size=world.size)
        if not after_step:
            rec["done_s"] = elapsed
        recoveries.append(rec)
        log.warning("recovered from lost rank(s) %s%s: world size now %d; %.3f s from "
                    "detection to %s", rec["lost"], "" if after_step else
                    " after the last training step", world.size, elapsed,
                    "the first step after the shrink" if after_step else "the end of training")

    while phase != "done":
        try:
            if need_sync:
                sync_from_root()
                need_sync = False
            if phase == "train":
                epoch = state["epoch"] + 1
                if data_iter is None:
                    if state["step"] == 0:  # no step of this epoch applied yet
                        _reset_rng(model, cfg.seed, epoch)
                    part = np.asarray(partition(train_rows, train_labels, epoch, cfg.seed,
                                                world.rank, world.size), np.int64)
                    length = max(world.allgather_object(int(len(part))))
                    n_steps = math.ceil(length / cfg.batch_size)
                    data = make_tf_dataset(dataset, part, labels_all[part].astype(np.int32),
                                           cfg.batch_size, shapes, seed=cfg.seed, epoch=epoch,
                                           rank=world.rank, shuffle=True, augment=augment,
                                           block=cfg.block, length=length)
                    if state["step"]:
                        data = data.skip(min(state["step"], n_steps))
                    data_iter = iter(data)
                    if bar is not None:
                        bar.close()
                    bar = progress(total=n_steps, initial=min(state["step"], n_steps),
                                   desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                                   disable=not (cfg.progress and world.is_root) or None)
                    t_epoch = time.perf_counter()
                if state["step"] < n_steps:
                    inputs, y = next(data_iter)
                    if hooks.active:  # the step number as if every update were applied
                        hooks.before_step(int(optimizer.iterations.numpy())
                                          + (unapplied is not None))
                    if local:
                        ce_sum, correct = fused_step(inputs, y)
                    elif zero_copy:
                        if unapplied is None:
                            ce_sum, correct, buffers = fused_grad_step(inputs, y)
                            summed = sum_buffers(buffers)
                        else:
                            ce_sum, correct, buffers = apply_then_grad(unapplied, inputs, y)
                            unapplied = None
                            summed = sum_pipelined(buffers)
                        if hooks.active:
                            hooks.after_reduce(int(optimizer.iterations.numpy()))
                        if state["step"] + 1 < n_steps:
                            unapplied = summed
                        else:  # the epoch's last step: evaluation reads the weights next
                            apply_fused(summed)
                    else:
                        ce_sum, correct, grads = grad_step(inputs, y)
                        # fresh arrays every try: the averager reduces in place
                        reduced = reducer([np.array(g) for g in grads])
                        apply_step([tf.convert_to_tensor(g) for g in reduced])
                    n = int(y.shape[0])
                    sums += (float(ce_sum), float(correct), n)
                    state["step"] += 1
                    state["updates"] += 1
                    bar.update(1)
                    if recovering is not None:
                        finish_recovery(after_step=True)
                        recovering = None
                    if stop is not None and stop.should_stop(world):
                        if unapplied is not None:
                            apply_fused(unapplied)
                            unapplied = None
                        sums = np.asarray(world.allreduce_sum(sums), np.float64)
                        images += sums[2]
                        if not world.is_root:
                            sums[:] = 0.0
                        interrupted = stop.signal_name or "stop request"
                        if out_dir and world.is_root:
                            ck_path = checkpoint_path(out_dir, state["epoch"], state["step"])
                            save_checkpoint(ck_path, [np.array(v.numpy()) for v in model.variables],
                                            [np.array(v.numpy()) for v in optimizer.variables],
                                            checkpoint_state())
                            log.warning("stop requested (%s): checkpoint after epoch %d + %d "
                                        "steps written to %s", interrupted, state["epoch"],
                                        state["step"], ck_path)
                        ck_path = world.bcast_object(ck_path)
                        phase = "done"
                    continue
                phase = "eval"
            if phase == "eval":
                if unapplied is not None:  # not reached: the last step applies its own
                    apply_fused(unapplied)
                    unapplied = None
                epoch = state["epoch"] + 1
                if bar is not None:
                    bar.close()
                    bar = None
                total = np.asarray(world.allreduce_sum(sums), np.float64)
                images += total[2]
                train_s = time.perf_counter() - t_epoch
                hooks.before_eval(epoch)
                val = evaluate_rows(model, dataset, val_rows, labels_all, world,
                                    cfg.batch_size * 4, logits_model=logits_model)
                lr_now = float((schedule(optimizer.iterations) * peak).numpy())
                row = {"epoch": epoch, "loss": total[0] / max(total[2], 1),
                       "accuracy": total[1] / max(total[2], 1),
                       "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                       "lr": lr_now, "seconds": train_s,
                       "images_per_second": total[2] / max(train_s, 1e-9)}
                # -- commit (no collectives from here to the agreement) -------------------
                state["history"] = list(state["history"]) + [row]
                monitor = row["val_loss"] if len(val_rows) else row["loss"]
                improved = (state["best_val_loss"] is None
                            or monitor < state["best_val_loss"] - cfg.min_delta)
                if improved:
                    state["best_val_loss"], state["best_epoch"], state["wait"] = \
                        float(monitor), epoch, 0
                    best_vars = [np.array(v.numpy()) for v in model.variables]
                else:
                    state["wait"] += 1
                stop_now = cfg.patience > 0 and state["wait"] >= cfg.patience
                state.update(epoch=epoch, step=0, stopped=bool(stop_now))
                sums = np.zeros(3)
                data_iter = None
                if out_dir and world.is_root:
                    try:
                        ck_state = checkpoint_state()
                        opt_vars = [np.array(v.numpy()) for v in optimizer.variables]
                        if improved:
                            save_checkpoint(os.path.join(out_dir, CHECKPOINT_DIR, "best.npz"),
                                            best_vars, opt_vars, ck_state)
                        save_checkpoint(checkpoint_path(out_dir, epoch),
                                        [np.array(v.numpy()) for v in model.variables],
                                        opt_vars, ck_state)
                        prune_checkpoints(out_dir, cfg.keep)
                        write_metrics_csv(os.path.join(out_dir, "metrics.csv"),
                                          state["history"])
                        if writer is None:
                            writer = tf.summary.create_file_writer(os.path.join(out_dir, "logs"))
                        with writer.as_default():
                            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
                                if row[key] is not None and np.isfinite(row[key]):
                                    _tb_scalar(tf, key, row[key], epoch)
                            writer.flush()
                    except Exception as exc:  # disk full, permissions: every rank must stop
                        write_error = f"cannot write the epoch {epoch} checkpoint: " \
                                      f"{type(exc).__name__}: {exc}"
                if world.is_root and cfg.progress:
                    log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  "
                             "%.0f img/s", epoch, cfg.epochs, row["loss"], row["accuracy"],
                             row["val_loss"], row["val_accuracy"], row["images_per_second"])
                # callbacks run after the checkpoint: an exception here (an interruption)
                # loses nothing
                for cb in callbacks:
                    stop_now = bool(cb(epoch, dict(row), model)) or stop_now
                pending_stop = stop_now
                phase = "agree"
            if phase == "agree":
                if world.size > 1:  # only the root writes: tell the others if it failed
                    write_error = world.bcast_object(write_error)
                if write_error is not None:
                    raise LclsError(write_error, os.path.join(out_dir, CHECKPOINT_DIR))
                agreed = world.agree(pending_stop) if world.size > 1 else pending_stop
                pending_stop = False
                if agreed:
                    stopped_early = state["epoch"] < cfg.epochs
                    phase = "done"
                else:
                    phase = "train" if state["epoch"] < cfg.epochs else "done"
        except WorldShrunk as shrunk:
            if unapplied is not None:
                # this rank's reduction completed before a later collective saw the
                # loss: apply it now, as an unpipelined loop would have, so that what
                # the root broadcasts next is what every survivor goes on from (a
                # survivor whose reduction failed holds none; keeping it for the next
                # step would apply it after the broadcast, on some ranks only)
                apply_fused(unapplied)
                unapplied = None
            now = time.perf_counter()
            recs = getattr(world, "recoveries", None) or [{}]
            if recovering is None:
                recovering = {"lost": [], "detect_to_shrunk_s": 0.0,
                              "_t": now - float(recs[-1].get("recover_s", 0.0))}
            recovering["lost"] = sorted(set(recovering["lost"]) | set(shrunk.lost_world_ranks))
            recovering["detect_to_shrunk_s"] = now - recovering["_t"]
            log.warning("lost rank(s) %s (original COMM_WORLD ranks); world size now %d; "
                        "re-partitioning and redoing the step", shrunk.lost_world_ranks,
                        world.size)
            if world.size < max(int(min_ranks), 1):
                raise TooFewRanks(f"only {world.size} rank(s) left, fewer than the minimum "
                                  f"{min_ranks}; restart from the last checkpoint",
                                  f"rank {world.rank}") from None
            need_sync = True
            data_iter = None
    if bar is not None:
        bar.close()
    if recovering is not None:  # lost in the last evaluation: no training step came after
        finish_recovery(after_step=False)
    wall = time.perf_counter() - t_start
    if best_vars is not None and not interrupted:
        for v, a in zip(model.variables, best_vars):
            v.assign(a)
    if writer is not None:
        writer.close()
    debug_dir = os.environ.get("LCLS_DL_DEBUG_WEIGHTS")
    if debug_dir:  # tests: every rank reports a digest of its final weights
        from ..atomic import write_json

        write_json(os.path.join(debug_dir, f"weights-rank{me}.json"),
                   {"rank": me, "size": world.size, "sha256": weights_digest(model),
                    "iterations": int(optimizer.iterations.numpy()),
                    "updates_counted": int(state["updates"])})
    lost = sorted(set(getattr(world, "lost_world_ranks", []) or []))
    return {"history": state["history"], "best_epoch": int(state["best_epoch"]),
            "best_val_loss": state["best_val_loss"], "epochs_run": int(state["epoch"]),
            "stopped_early": bool(stopped_early), "train_seconds": wall,
            "images_per_second": images / max(wall, 1e-9) if images > 0 else None,
            "interrupted": interrupted, "checkpoint": ck_path,
            "step_in_epoch": int(state["step"]), "world_size": start_size,
            "final_world_size": world.size, "lost_ranks": lost, "recoveries": recoveries,
            "peak_lr": cfg.peak_lr(start_size)}


def evaluate_rows(model, dataset, rows, labels_all, world=None, batch_size=128,
                  logits_model=None):
    """Mean loss and accuracy of ``model`` on dataset ``rows``, split over the world's ranks.

    Returns ``{"loss", "accuracy", "n"}`` (NaN loss/accuracy for no rows).
    """
    from ..distributed.local_world import LocalWorld
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
                 resume=False, overwrite=False, callbacks=(), command=None, stop=None,
                 min_ranks=1):
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
    stop : lcls_dl.distributed.signals.StopRequest, optional
        Stop cleanly (mid-epoch checkpoint) once any rank receives SIGTERM/SIGUSR1.
    min_ranks : int
        Fewest ranks the run goes on with after losing ranks (:class:`TooFewRanks`).

    Returns
    -------
    dict
        The metadata written to ``model.json`` (on every rank; None on other ranks when the
        root was lost at the very end). When a stop was requested nothing but the
        checkpoint is written and the result is ``{"interrupted": signal name,
        "checkpoint": path, "epoch": complete epochs, "step": steps into the next}``.

    Raises
    ------
    InputError
        No labeled frames, a single class, an existing MODEL_DIR without ``overwrite``, a
        corrupted checkpoint on ``resume``.
    """
    from ..dataset import Dataset, labeled_splits
    from ..distributed.local_world import LocalWorld
    from ..provenance import software_versions, utc_now
    from .builders import build_model, input_names
    from .calibration import calibrate, softmax
    from .data import normalization_stats
    from .metrics import classification_report
    from .model_dir import dataset_logits, save_model_dir

    world = world or LocalWorld()
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("epochs and batch size must be at least 1")
    dataset = Dataset(dataset_dir)
    classes = list(dataset.classes)
    splits = labeled_splits(dataset, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                            ranks=world.size)
    err = None
    if world.is_root:
        try:
            prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
        except InputError as exc:
            err = (exc.what, exc.where)
        except OSError as exc:  # permissions, full disk: one line, and no rank left waiting
            err = (f"cannot prepare the model directory: {exc.strerror or exc}", out_dir)
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
                   callbacks=callbacks, context=context, stop=stop, min_ranks=min_ranks)
    if result["interrupted"]:
        dataset.close()
        return {"interrupted": result["interrupted"], "checkpoint": result["checkpoint"],
                "epoch": result["epochs_run"], "step": result["step_in_epoch"]}

    meta, root_error = None, None
    if world.is_root:
        try:
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
                             "world_size": result["world_size"],
                             "global_batch_size": cfg.batch_size * result["world_size"],
                             "lr_scaling": {"rule": cfg.lr_scaling, "base_lr": cfg.lr,
                                            "reference_batch": cfg.lr_reference_batch
                                            or cfg.batch_size,
                                            "peak_lr": result["peak_lr"],
                                            "warmup_epochs": cfg.warmup_epochs},
                             "final_world_size": result["final_world_size"],
                             "lost_ranks": result["lost_ranks"],
                             "recoveries": result["recoveries"],
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
        except Exception as exc:  # other ranks must not wait forever for the metadata
            root_error = exc
    try:
        meta, failed = world.bcast_object((meta, None if root_error is None else str(root_error)))
    except Exception as exc:  # a rank died after training: the root has written the model
        from ..distributed.ulfm import WorldShrunk

        if not isinstance(exc, WorldShrunk):
            raise
        log.warning("%s after training; the model directory is complete", exc)
        failed = None
    dataset.close()
    if root_error is not None:
        raise root_error
    if failed is not None:
        raise LclsError(f"rank 0 failed to write the model directory: {failed}", out_dir)
    return meta
