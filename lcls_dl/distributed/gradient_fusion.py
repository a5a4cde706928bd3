"""Zero-copy gradient averaging for a compiled training step.

The numpy path (:class:`~lcls_dl.distributed.gradient_averager.GradientAverager` on a list of
arrays) costs three copies of every gradient per step: TF tensor to numpy, numpy into
the fused buckets, buckets back into TF tensors. On one node, where an ``Allreduce``
runs at memory speed, each copy costs about as much as the reduction itself. This
module removes all three:

1. **Fusion inside the step** (:class:`FusionPlan`): the compiled gradient step returns
   the small gradients (below ``fuse_below`` bytes, 512 KiB by default) concatenated
   into one flat tensor, and each larger gradient as its own tensor. The threshold is
   where the two costs meet: one more ``Allreduce`` call costs ~10-30 us, while a copy
   out of cache runs at ~15 GB/s and so takes about half as long as reducing the same
   bytes (~7 GB/s at np=2 on one node): fusing a 4 MiB gradient costs ~0.25 ms,
   sending it alone one call.
   The ``1 / size`` of the average is folded into the loss, so only a sum remains.
2. **Zero-copy reduction** (:class:`TensorReducer`): each returned tensor's CPU buffer
   is exposed to MPI as a writable numpy view (:func:`host_view`: ``EagerTensor._numpy()``
   where that shares memory, else DLPack; no copy either way) and summed over ranks in
   place (``World.allreduce_sum_inplace``: one ``Allreduce(IN_PLACE)`` per buffer, in
   chunks of at most 16 MiB).
3. **Back in the step**: the same tensors go into the compiled update, which splits the
   flat one again (:meth:`FusionPlan.unfuse`) and applies.

The tensors handed to :class:`TensorReducer` are overwritten: they must be fresh
outputs of the gradient step, which the gradients of our layers always are (products
of MatMul/Conv backprop or of the in-step concatenation). Outputs that share memory
with each other or with a model variable, and tensors not in host memory (GPU), are
reduced through a copy instead, so correctness never depends on that assumption.

Examples
--------
>>> import tensorflow as tf                                      # doctest: +SKIP
>>> plan = FusionPlan([v.shape for v in model.trainable_variables])
>>> @tf.function
... def grad_step(x, y):
...     with tf.GradientTape() as tape:
...         loss = loss_fn(model(x), y) * inv_size   # 1/N folded into the loss
...     return plan.fuse(tape.gradient(loss, model.trainable_variables))
>>> @tf.function
... def apply_step(buffers):
...     optimizer.apply_gradients(zip(plan.unfuse(buffers), model.trainable_variables))
>>> buffers = grad_step(x, y)
>>> reduce = TensorReducer(world, protect=model.variables)
>>> apply_step(reduce(buffers))
"""
import ctypes

import numpy as np

#: gradients smaller than this are concatenated into one flat buffer inside the step
#: (benchmarks/allreduce_bench.py --fuse-below compares thresholds)
DEFAULT_FUSE_BELOW = 512 << 10


class _DLPack:
    """Adapter: numpy.from_dlpack wants an object with ``__dlpack__``, TF gives a capsule."""

    def __init__(self, capsule):
        self._capsule = capsule

    def __dlpack__(self, stream=None, **kwargs):
        return self._capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


_NUMPY_SHARES = []


def _numpy_shares_memory():
    """Whether ``EagerTensor._numpy()`` returns a writable view of the tensor's memory
    (TensorFlow 2.x does; checked once per process, on a small computed tensor)."""
    if not _NUMPY_SHARES:
        import tensorflow as tf

        ok = False
        try:
            t = tf.math.add(tf.zeros(4), 1.0)
            a = t._numpy()
            if isinstance(a, np.ndarray) and a.flags.writeable and not a.flags.owndata:
                a[0] = 7.0
                ok = float(t[0]) == 7.0
        except Exception:  # noqa: BLE001 - a private API: any change, use DLPack
            ok = False
        _NUMPY_SHARES.append(ok)
    return _NUMPY_SHARES[0]


def host_view(tensor):
    """A writable numpy array sharing ``tensor``'s host memory, or None.

    None when the tensor is not a float tensor in host (CPU) memory or cannot be
    exported. Keep a reference to ``tensor`` while the view is in use. Writing through
    the view changes the tensor: use it only on tensors nothing else reads (fresh
    outputs of a compiled step).

    The view comes from ``EagerTensor._numpy()`` (0.5 us) where that shares memory,
    else from DLPack (5 us, and a TensorFlow op: right before an ``Allreduce`` on a
    2-core machine it made the reduction 50-100 us slower, TensorFlow's worker thread
    competing with MPI's polling).
    """
    device = getattr(tensor, "device", "") or ""
    if "CPU" not in device.upper():
        return None
    if _numpy_shares_memory():
        try:
            a = tensor._numpy()
        except Exception:  # noqa: BLE001 - fall back to DLPack below
            a = None
        if isinstance(a, np.ndarray):
            ok = a.dtype.kind == "f" and a.flags.writeable and a.flags.c_contiguous and a.size
            return a if ok else None
    if not tensor.dtype.is_floating:
        return None
    import tensorflow as tf

    try:
        ro = np.from_dlpack(_DLPack(tf.experimental.dlpack.to_dlpack(tensor)))
    except Exception:  # noqa: BLE001 - any failure: use the copying path
        return None
    if ro.size == 0 or not ro.flags.c_contiguous:
        return None
    # numpy marks DLPack imports read-only; the memory is ours to reduce in place
    raw = (ctypes.c_char * ro.nbytes).from_address(ro.ctypes.data)
    return np.frombuffer(raw, dtype=ro.dtype).reshape(ro.shape)


def _span(a):
    start = a.ctypes.data
    return start, start + a.nbytes


def _overlapping(views):
    """Indices of the arrays (None entries skipped) whose address range overlaps
    another's."""
    spans = sorted(_span(v) + (i,) for i, v in enumerate(views) if v is not None)
    return {j for (_, e0, i0), (s1, _, i1) in zip(spans, spans[1:]) if s1 < e0
            for j in (i0, i1)}


def _disjoint(views):
    """Whether no two arrays share memory (their address ranges do not overlap)."""
    if len(views) <= 4:  # a few bounds checks cost less than building the spans
        return not any(np.may_share_memory(a, b) for i, a in enumerate(views)
                       for b in views[i + 1:])
    return not _overlapping(views)


class FusionPlan:
    """Which gradients travel fused (one flat tensor) and which as their own buffers.

    Parameters
    ----------
    shapes : sequence of shapes
        Shapes of the trainable variables, in order.
    dtypes : sequence of dtypes, optional
        Their dtypes (float32 by default). Only float32 gradients are fused.
    fuse_below : int
        Gradients smaller than this many bytes are concatenated; larger ones are kept
        as they are.

    Attributes
    ----------
    fused : list of int
        Indices of the gradients in the flat buffer, in order.
    direct : list of int
        Indices of the gradients returned as their own tensors.
    """

    def __init__(self, shapes, dtypes=None, fuse_below=DEFAULT_FUSE_BELOW):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        dtypes = [np.dtype("float32")] * len(self.shapes) if dtypes is None else \
            [np.dtype(getattr(d, "as_numpy_dtype", d)) for d in dtypes]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        small = [d == np.float32 and n * 4 < fuse_below for n, d in zip(self.sizes, dtypes)]
        if sum(small) < 2:  # a concatenation of one tensor would gain nothing
            small = [False] * len(small)
        self.fused = [i for i, s in enumerate(small) if s]
        self.direct = [i for i, s in enumerate(small) if not s]

    @property
    def n_buffers(self):
        """Tensors per step handed to MPI (the flat one plus the direct ones)."""
        return (1 if self.fused else 0) + len(self.direct)

    def fuse(self, grads):
        """Inside a ``tf.function``: per-variable gradients -> list of buffers."""
        import tensorflow as tf

        out = []
        if self.fused:
            out.append(tf.concat([tf.reshape(grads[i], [-1]) for i in self.fused], 0))
        return out + [grads[i] for i in self.direct]

    def unfuse(self, buffers):
        """Inside a ``tf.function``: list of buffers -> per-variable gradients, in order."""
        import tensorflow as tf

        grads = [None] * len(self.shapes)
        rest = list(buffers)
        if self.fused:
            pieces = tf.split(rest.pop(0), [self.sizes[i] for i in self.fused])
            for i, piece in zip(self.fused, pieces):
                grads[i] = tf.reshape(piece, self.shapes[i])
        for i, g in zip(self.direct, rest):
            grads[i] = g
        return grads


class TensorReducer:
    """Sum the buffers of a compiled step over the ranks of a world, in place.

    Host-memory tensors are reduced in place through zero-copy views and returned as
    they are; any other tensor (device memory, sharing memory with another output, or
    with one of ``protect``) is copied, reduced and returned as a new tensor.

    A reducer serves one compiled step. Where its outputs live (host or device memory),
    their dtypes and whether one aliases a protected variable are fixed by the compiled
    graph, so they are checked on the first call (and whenever the number of tensors
    changes), not on every step; later calls only check that no two outputs share
    memory. Use a new reducer for another step.

    Parameters
    ----------
    world : World
        Needs ``allreduce_sum_inplace(list of writable arrays)``.
    protect : sequence of tf.Variable
        Buffers that must never be written (the model's variables).
    """

    def __init__(self, world, protect=()):
        self.world = world
        self.protect = list(protect)
        self._copy = None  # indices that always travel through a copy
        self._checked = None  # number of outputs found all reducible in place by _numpy()

    def _aliased(self, views):
        import tensorflow as tf

        guarded = []
        for p in self.protect:
            g = host_view(tf.convert_to_tensor(p))  # a variable read shares its buffer
            if g is not None:
                guarded.append(_span(g))
        return {i for i, v in enumerate(views) if v is not None and any(
            s < ge and gs < e for s, e in [_span(v)] for gs, ge in guarded)}

    def __call__(self, tensors):
        """Sum ``tensors`` (fresh outputs of a compiled step, overwritten) over ranks.

        Returns
        -------
        list of tf.Tensor
            The sums, in order: the input tensors themselves where reduced in place.
        """
        n = len(tensors)
        if n == self._checked:
            # the step's outputs were checked on the first call (host memory, float,
            # shared by _numpy(), no protected variable): only what can change from one
            # call to the next, overlap between outputs, is checked again. On a small
            # model the whole Python path costs about as much as the reduction's own
            # overhead, so it is kept this short.
            views = [t._numpy() for t in tensors]
            if n == 1 or _disjoint(views):
                self.world.allreduce_sum_inplace(views)
                return list(tensors)
        views = [host_view(t) for t in tensors]
        if self._copy is None or self._copy[0] != n:
            self._copy = (n, self._aliased(views))
        for i in self._copy[1]:
            views[i] = None
        # two outputs that share memory would be summed twice in place: copy both
        for i in _overlapping(views) if n > 1 else ():
            views[i] = None
        if all(v is not None for v in views):  # the usual step: all reduced where they lie
            self._checked = n if (_numpy_shares_memory() and not self._copy[1]) else None
            self.world.allreduce_sum_inplace(views)
            return list(tensors)
        self._checked = None
        import tensorflow as tf

        copies = {i: np.array(t) for i, (t, v) in enumerate(zip(tensors, views)) if v is None}
        self.world.allreduce_sum_inplace(
            [copies[i] if v is None else v for i, v in enumerate(views)])
        return [tf.convert_to_tensor(copies[i]) if i in copies else t
                for i, t in enumerate(tensors)]
