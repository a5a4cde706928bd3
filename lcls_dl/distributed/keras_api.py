"""Data-parallel ``model.fit`` over MPI for your own Keras 3 script (Horovod-style).

Four lines make a Keras script data-parallel::

    import keras
    import lcls_dl.distributed as ld

    ld.init()                                      # MPI, rank, threads per rank
    x, y = ld.shard(x, y, labels=y)                # this rank's part, same length on all ranks
    opt = ld.DistributedOptimizer(keras.optimizers.Adam(ld.scale_lr(1e-3)))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=5,
              callbacks=[ld.BroadcastCallback(), ld.MetricAverageCallback()],
              verbose=2 if ld.rank() == 0 else 0)
    if ld.rank() == 0:
        model.save("model.keras")

and ``lcls-dl run --np 4 script.py`` starts it on 4 ranks (or ``mpiexec``/``srun``
directly). Without MPI the same script runs as one process.

How it works: :func:`DistributedOptimizer` replaces the optimizer's ``apply`` so the
gradients are averaged over ranks (one ``tf.numpy_function`` per step calling
:class:`~lcls_dl.distributed.gradient_averager.GradientAverager`: fused float32 buckets,
in-place ``Allreduce``) before the update; every rank then applies the same update to
the same weights, which :class:`BroadcastCallback` made equal at the start. XLA
cannot call MPI, so :class:`BroadcastCallback` turns ``jit_compile`` off for the
train step (Keras already does on CPU-only machines).
"""
import logging

import numpy as np

from .partition import partition

log = logging.getLogger(__name__)

_WORLD = None


def init(threads=True, bucket_bytes=None, compression=None, overlap=False, comm=None):
    """Start (or join) the MPI job; set this rank's TensorFlow threads; return the world.

    Parameters
    ----------
    threads : bool
        Give TensorFlow this rank's share of the node's cores
        (:func:`~lcls_dl.distributed.threads.configure_threads`). Call ``init()``
        before building a model for this to take effect.
    bucket_bytes, compression, overlap
        Gradient averaging settings (see :class:`~lcls_dl.distributed.gradient_averager.GradientAverager`).
    comm : mpi4py.MPI.Comm, optional
        Communicator to use instead of ``COMM_WORLD``.

    Returns
    -------
    MPIWorld or LocalWorld
        ``LocalWorld`` when not started by an MPI launcher.
    """
    global _WORLD
    from .gradient_averager import DEFAULT_BUCKET_BYTES
    from .launcher import in_mpi_job
    from .local_world import LocalWorld

    if comm is not None or in_mpi_job():
        from .mpi_world import MPIWorld

        _WORLD = MPIWorld(comm, bucket_bytes=bucket_bytes or DEFAULT_BUCKET_BYTES,
                          compression=compression, overlap=overlap)
        if comm is None:
            from .launcher import check_world_size

            check_world_size(_WORLD.size)
    else:
        _WORLD = LocalWorld()
    if threads:
        from .threads import configure_threads

        configure_threads(getattr(_WORLD, "comm", None) if _WORLD.size > 1 else None)
    return _WORLD


def world():
    """The world :func:`init` made (calls ``init()`` on first use)."""
    return _WORLD if _WORLD is not None else init()


def rank():
    """This process's rank (0 without MPI)."""
    return world().rank


def size():
    """Number of ranks (1 without MPI)."""
    return world().size


def is_root():
    """True on rank 0: the rank that should print, save models and write logs."""
    return world().is_root


def scale_lr(learning_rate):
    """Learning rate for the global batch: ``learning_rate * size()`` (linear scaling rule)."""
    return float(learning_rate) * size()


def allreduce(value, average=True):
    """Sum (or average) a number or array over ranks."""
    total = world().allreduce_sum(value)
    return total / size() if average else total


def broadcast_object(obj, root=0):
    """Broadcast a small picklable object from ``root`` to all ranks."""
    return world().bcast_object(obj, root=root)


def barrier():
    world().barrier()


def shard(*arrays, labels=None, seed=0, epoch=0):
    """This rank's part of in-memory arrays, or of a ``tf.data.Dataset``.

    Arrays (all with the same first dimension) are split with
    :func:`~lcls_dl.distributed.partition.partition`: disjoint, shuffled with
    ``seed``/``epoch``, stratified by ``labels`` if given, and padded so every rank
    gets the same number of samples (hence the same number of ``fit`` steps). A
    ``tf.data.Dataset`` is split with ``dataset.shard(size, rank)``; then pass the same
    ``steps_per_epoch`` on every rank (and ``.repeat()`` the dataset) so no rank stops
    early.

    Returns
    -------
    ndarray, tuple of ndarrays, or tf.data.Dataset

    Examples
    --------
    >>> x, y = np.arange(10).reshape(5, 2), np.array([0, 0, 1, 1, 1])
    >>> xs, ys = shard(x, y, labels=y)      # one process: everything, shuffled
    >>> len(xs), sorted(ys.tolist())
    (5, [0, 0, 1, 1, 1])
    """
    w = world()
    if len(arrays) == 1 and hasattr(arrays[0], "shard") and hasattr(arrays[0], "element_spec"):
        return arrays[0].shard(w.size, w.rank)
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        from ..errors import InputError

        raise InputError("arrays to shard have different lengths",
                         str([len(a) for a in arrays]))
    key = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
    rows = partition(np.arange(n), key, epoch=epoch, seed=seed, rank=w.rank, size=w.size)
    parts = tuple(a[rows] for a in arrays)
    return parts[0] if len(parts) == 1 else parts


def _average_gradients(grads):
    """Average a list of gradient tensors (None allowed) over ranks, inside a TF graph."""
    import tensorflow as tf

    w = world()
    if w.size == 1:
        return grads
    index = [i for i, g in enumerate(grads) if g is not None]
    dense = [tf.convert_to_tensor(grads[i]) for i in index]
    dtypes = [g.dtype for g in dense]
    np_dtypes = [d.as_numpy_dtype for d in dtypes]

    def _mpi_average(*arrays):
        # own copies: the averager may reduce in place, and its plan must not depend on
        # whether TensorFlow handed this rank writable or read-only memory
        averaged = w.allreduce_mean([np.array(a) for a in arrays])
        # copies: TF may keep the returned memory, and the averager reuses its buffer
        return [np.array(a, dtype=d, copy=True) for a, d in zip(averaged, np_dtypes)]

    reduced = tf.numpy_function(_mpi_average, dense, Tout=dtypes, stateful=True,
                                name="lcls_dl_allreduce")
    if not isinstance(reduced, (list, tuple)):
        reduced = [reduced]
    out = list(grads)
    for i, r, g in zip(index, reduced, dense):
        r.set_shape(g.shape)
        out[i] = r
    return out


def DistributedOptimizer(optimizer):
    """Make a Keras 3 optimizer average gradients over all ranks before each update.

    The optimizer is changed in place (its ``apply``, which ``apply_gradients`` and
    ``model.fit`` call, first averages the gradients) and returned; its class,
    configuration and saved form are unchanged, so a saved model loads without
    lcls-dl.

    Parameters
    ----------
    optimizer : keras.optimizers.Optimizer

    Returns
    -------
    keras.optimizers.Optimizer
        The same object.
    """
    if getattr(optimizer, "_lcls_dl_distributed", False):
        return optimizer
    world()
    inner_apply = optimizer.apply

    def apply(grads, trainable_variables=None):
        return inner_apply(_average_gradients(list(grads)), trainable_variables)

    object.__setattr__(optimizer, "apply", apply)
    object.__setattr__(optimizer, "_lcls_dl_distributed", True)
    return optimizer


def _callback_base():
    import keras

    return keras.callbacks.Callback


def _make_callbacks():
    Callback = _callback_base()

    class BroadcastCallback(Callback):
        """Copy rank ``root``'s weights and optimizer state to all ranks when training starts.

        Put it in ``callbacks=`` of ``model.fit`` on every rank. Also turns off XLA
        (``jit_compile``) for the train step, which cannot call MPI. When only the root
        resumed (its optimizer has state, e.g. from ``keras.models.load_model``), the other
        ranks' optimizers are built first and receive that state, iteration count
        included. Ranks whose models differ get a ``ValueError`` on every rank.

        Non-trainable variables (BatchNormalization's moving statistics) are copied here
        only: each rank then updates them from its own batches, so they drift apart.
        Save or evaluate rank 0's model, or broadcast them again yourself.
        """

        def __init__(self, root=0):
            super().__init__()
            self.root = int(root)
            self.done = False

        def set_model(self, model):
            super().set_model(model)
            if world().size > 1 and getattr(model, "_jit_compile", None):
                log.info("lcls-dl: jit_compile turned off (MPI calls cannot run in XLA)")
                model.jit_compile = False
                model.train_function = None

        def on_train_begin(self, logs=None):
            if self.done or world().size == 1:
                return
            variables = list(self.model.variables)
            optimizer = getattr(self.model, "optimizer", None)
            root_built = world().bcast_object(
                bool(optimizer is not None and getattr(optimizer, "built", False)), root=self.root)
            if root_built:
                # the root resumed (e.g. keras.models.load_model): its optimizer has state
                # that the others, built fresh, must receive, so build theirs first
                if not getattr(optimizer, "built", False):
                    optimizer.build(self.model.trainable_variables)
                variables += list(optimizer.variables)
            layout = [tuple(v.shape) for v in variables]
            layouts = world().allgather_object(layout)
            differ = [r for r, other in enumerate(layouts) if other != layouts[self.root]]
            if differ:
                bad = differ[0]
                raise ValueError(
                    f"BroadcastCallback: rank {bad} has {len(layouts[bad])} model/optimizer "
                    f"variables, rank {self.root} has {len(layouts[self.root])} (or other "
                    "shapes): build the same model and optimizer on every rank")
            values = world().broadcast([np.array(v.numpy()) for v in variables], root=self.root)
            for v, value in zip(variables, values):
                v.assign(value)
            self.done = True

    class MetricAverageCallback(Callback):
        """Average the epoch's metrics (``loss``, ``val_accuracy``, ...) over ranks.

        Place it first in ``callbacks=`` so later callbacks (checkpoints, early
        stopping, logs) see the averages.
        """

        def on_epoch_end(self, epoch, logs=None):
            if logs is None or world().size == 1:
                return
            keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0
                          and isinstance(np.asarray(v).item(), (int, float)))
            keys = world().bcast_object(keys)
            values = np.array([float(logs.get(k, 0.0)) for k in keys], np.float64)
            mean = world().allreduce_sum(values) / world().size
            for k, v in zip(keys, mean):
                logs[k] = float(v)

    class LearningRateWarmupCallback(Callback):
        """Ramp the learning rate linearly from ``initial_lr`` to ``target_lr`` over the first steps.

        Large global batches (many ranks) train better when the scaled learning rate
        (:func:`scale_lr`) is reached gradually (Goyal et al. 2017).

        Parameters
        ----------
        initial_lr : float
            Learning rate of the first step (typically the single-rank rate). The
            optimizer's learning rate must be a number, not a ``LearningRateSchedule``
            (a schedule has its own warmup).
        target_lr : float, optional
            Rate after warmup; ``scale_lr(initial_lr)`` by default.
        warmup_steps : int
            Number of optimizer steps to reach ``target_lr``.
        """

        def __init__(self, initial_lr, target_lr=None, warmup_steps=100):
            super().__init__()
            self.initial_lr = float(initial_lr)
            self.target_lr = scale_lr(initial_lr) if target_lr is None else float(target_lr)
            self.warmup_steps = max(1, int(warmup_steps))

        def on_train_batch_begin(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step > self.warmup_steps:
                return
            frac = min(1.0, step / self.warmup_steps)
            self.model.optimizer.learning_rate.assign(
                self.initial_lr + frac * (self.target_lr - self.initial_lr))

    return BroadcastCallback, MetricAverageCallback, LearningRateWarmupCallback


_CALLBACKS = None


def __getattr__(name):
    global _CALLBACKS
    if name in ("BroadcastCallback", "MetricAverageCallback", "LearningRateWarmupCallback"):
        if _CALLBACKS is None:
            _CALLBACKS = dict(zip(("BroadcastCallback", "MetricAverageCallback",
                                   "LearningRateWarmupCallback"), _make_callbacks()))
        return _CALLBACKS[name]
    raise AttributeError(name)
