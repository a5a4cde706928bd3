"""Gradient averaging over MPI on fused, preallocated flat buffers.

:class:`GradientAverager` turns a list of gradient arrays (one per trainable
variable, any shapes) into their average over all ranks of a communicator:

1. small gradients (biases, small kernels) are packed into one flat, preallocated
   buffer (float32, or float64 when any gradient is float64) split into *buckets* of
   ``bucket_bytes`` (one ``np.concatenate`` per bucket), scaled by ``1 / size`` while
   the bucket is hot in cache. Each bucket is summed over ranks with an in-place
   ``Allreduce(MPI.IN_PLACE, bucket)`` as soon as it is packed, while still hot in
   cache (``overlap=True``: a non-blocking ``Iallreduce`` per bucket, all completed by
   one ``Waitall`` at the end, so the next bucket is packed while one is in flight);
2. large gradients (``>= direct_bytes``, contiguous, writable, the buffer's dtype) are
   not copied at all: they are reduced in place in their own memory, chunk by chunk
   (``bucket_bytes`` each: scale the chunk by ``1 / size`` while it enters the cache,
   then ``Allreduce`` it), which keeps the cost close to a raw ``Allreduce`` of the same
   bytes (measured in ``benchmarks/allreduce_bench.py``);
3. the result is returned as a list of arrays of the input shapes: views into the
   flat buffer for the packed ones, the input arrays themselves (overwritten) for the
   others. Pass copies if the inputs must survive (``inplace=False`` packs everything).

The buffers are reused by every call with the same gradient layout, so a training
step allocates nothing. Returned views are overwritten by the next call: use (or
copy) them before averaging the next step's gradients.

Compression (``compression="fp16"`` or ``"bf16"``) sends 2 bytes per value instead
of 4: all gradients are packed, each bucket is cast to float16 / bfloat16 after the
``1 / size`` scaling, summed over ranks by a custom MPI operation (the 16-bit words
travel as ``MPI.UINT16_T``; the operation adds them as 16-bit floats, rounding each
partial sum to nearest), and cast back. Accuracy: float16 keeps 11 significant bits
(relative error <= 2**-11 of the summands' size per rounding, about ``log2(size) + 1``
roundings) but flushes values below ~6e-8 to zero and saturates above 65504 (the
pre-scaling by ``1 / size`` keeps sums of averages in range); bfloat16 keeps float32's
range with 8 significant bits (error <= 2**-8 per rounding). Use it only where the
network, not memory, limits the allreduce (many nodes, slow interconnect): on one
node the casts and the Python-level reduction operation make it slower than the
float32 path, which is the default and the fastest here.

Results are identical, bit for bit, on every rank: MPI's sum reductions deliver one
result to all ranks, and the scaling happens before the reduction.
"""
import numpy as np

from ..errors import InputError

#: bytes per fused bucket / per in-place chunk (best of 256 KiB - 16 MiB on one node)
DEFAULT_BUCKET_BYTES = 1 << 20
#: gradients at least this large are reduced in place instead of packed
DEFAULT_DIRECT_BYTES = 256 << 10
#: largest single Allreduce of :meth:`GradientAverager.sum_in_place` (one node, 2 ranks:
#: 6.2 GB/s at 1 MiB, 8.3 GB/s at 16 MiB, 3.5 GB/s at 32 MiB once buffers leave the cache)
DEFAULT_CHUNK_BYTES = 16 << 20

_COMPRESSIONS = (None, "none", "fp16", "bf16")
_OPS = {}


def _half_dtype(compression):
    if compression == "fp16":
        return np.dtype(np.float16)
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _sum_op(compression):
    """A commutative MPI op summing 16-bit floats carried as MPI.UINT16_T (created once)."""
    if compression in _OPS:
        return _OPS[compression]
    from mpi4py import MPI

    half = _half_dtype(compression)

    def _sum(inbuf, inoutbuf, datatype):
        a = np.frombuffer(inbuf, dtype=half)
        b = np.frombuffer(inoutbuf, dtype=half)
        np.add(a, b, out=b)

    op = MPI.Op.Create(_sum, commute=True)
    _OPS[compression] = op
    return op


class GradientAverager:
    """Average lists of gradient arrays over MPI ranks through fused flat buckets.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Communicator; ``MPI.COMM_WORLD`` by default.
    bucket_bytes : int
        Size of one fused bucket (and of one in-place chunk of a large gradient) handed
        to MPI, in bytes of the float32/float64 buffer. Smaller buckets start
        communicating earlier and stay in cache; bigger ones need fewer MPI calls.
    compression : {None, "fp16", "bf16"}
        Send 16-bit floats instead of full precision (see the module docstring for
        the accuracy this costs).
    overlap : bool
        Start a non-blocking ``Iallreduce`` for each bucket/chunk as soon as it is
        ready and prepare the next one meanwhile; wait for all at the end. Helps when
        the MPI library progresses communication in the background (network offload,
        progress threads); with shared memory and no spare core it is slower.
    average : bool
        Divide by the number of ranks (True) or return the plain sum.
    inplace : bool
        Reduce large gradients in their own memory (overwriting the inputs). False:
        pack every gradient (inputs untouched).
    direct_bytes : int
        Size from which a gradient is reduced in place rather than packed.
    chunk_bytes : int
        Largest single ``Allreduce`` of :meth:`sum_in_place`.

    Examples
    --------
    >>> import numpy as np
    >>> from lcls_dl.distributed.gradient_averager import GradientAverager
    >>> avg = GradientAverager(bucket_bytes=1 << 20)
    >>> grads = [np.ones((3, 3), np.float32), np.arange(4, dtype=np.float32)]
    >>> out = avg(grads)          # the same values on every rank, averaged
    >>> [g.shape for g in out]
    [(3, 3), (4,)]
    """

    def __init__(self, comm=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compression=None,
                 overlap=False, average=True, inplace=True, direct_bytes=DEFAULT_DIRECT_BYTES,
                 chunk_bytes=DEFAULT_CHUNK_BYTES):
        from mpi4py import MPI

        self._MPI = MPI
        if comm is None:
            comm = MPI.COMM_WORLD
        if compression not in _COMPRESSIONS:
            raise InputError(f"unknown gradient compression {compression!r}",
                             "choose none, fp16 or bf16")
        if int(bucket_bytes) < 1024:
            raise InputError(f"bucket size {bucket_bytes} bytes is too small",
                             "use at least 1024 bytes")
        self.comm = comm
        self.size = comm.Get_size()
        self.bucket_bytes = int(bucket_bytes)
        self.compression = None if compression in (None, "none") else compression
        self.overlap = bool(overlap)
        self.average = bool(average)
        self.inplace = bool(inplace) and self.compression is None
        self.direct_bytes = int(direct_bytes)
        self.chunk_bytes = max(1024, int(chunk_bytes))
        self._layout = None

    # -- planning ------------------------------------------------------------------
    def _plan(self, layout):
        """Buffers and schedule for a list of (shape, dtype, may-reduce-in-place)."""
        dtype = np.dtype(np.float64 if any(d == np.float64 for _, d, _ in layout) else np.float32)
        sizes = [int(np.prod(s, dtype=np.int64)) for s, _, _ in layout]
        direct = [ok and d == dtype and n * dtype.itemsize >= self.direct_bytes
                  for (_, d, ok), n in zip(layout, sizes)]
        packed = [i for i in range(len(layout)) if not direct[i]]
        offsets = {}
        total = 0
        for i in packed:
            offsets[i] = total
            total += sizes[i]
        per_bucket = max(1, self.bucket_bytes // dtype.itemsize)
        bounds = list(range(0, total, per_bucket)) + [total]
        buckets = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
        # schedule in gradient order (the order backprop produces them):
        #   ("direct", i, start, stop): reduce this chunk of gradient i in place
        #   ("bucket", b, pieces): fill bucket b from pieces [(i, start, stop), ...], reduce it
        schedule = []
        pieces = [[] for _ in buckets]
        b = 0
        for i, n in enumerate(sizes):
            if direct[i]:
                for start in range(0, n, per_bucket):
                    schedule.append(("direct", i, start, min(n, start + per_bucket)))
                continue
            start = 0
            while start < n:
                dst = offsets[i] + start
                while dst >= buckets[b][1]:
                    b += 1
                bucket_end = buckets[b][1]
                stop = min(n, start + (bucket_end - dst))
                pieces[b].append((i, start, stop))
                if offsets[i] + stop == bucket_end:
                    schedule.append(("bucket", b, pieces[b]))
                start = stop
        self._dtype = dtype
        self._flat = np.empty(total, dtype)
        self._half = np.empty(total, _half_dtype(self.compression)) if self.compression else None
        self._buckets = buckets
        self._schedule = schedule
        self._direct = direct
        self._views = [self._flat[offsets[i]:offsets[i] + sizes[i]].reshape(layout[i][0])
                       if not direct[i] else None for i in range(len(layout))]
        self._layout = layout

    # -- one step ------------------------------------------------------------------
    def _reduce(self, buf, requests, op=None):
        MPI = self._MPI
        op = MPI.SUM if op is None else op
        if self.overlap:
            requests.append(self.comm.Iallreduce(MPI.IN_PLACE, buf, op))
        else:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op)

    def _start_bucket(self, b, requests):
        MPI = self._MPI
        lo, hi = self._buckets[b]
        if self.compression:
            self._half[lo:hi] = self._flat[lo:hi]  # cast (round to nearest)
            self._reduce([self._half[lo:hi].view(np.uint16), MPI.UINT16_T], requests,
                         _sum_op(self.compression))
            if not self.overlap:
                self._flat[lo:hi] = self._half[lo:hi]
        else:
            self._reduce(self._flat[lo:hi], requests)

    def __call__(self, grads):
        """Return the rank-average (or sum) of ``grads``, same shapes and order.

        Parameters
        ----------
        grads : list of array_like
            One array per variable, the same shapes and order on every rank.

        Returns
        -------
        list of ndarray
            Packed gradients: views into a reused buffer (float32, float64 if any input
            is float64), valid until the next call. Large contiguous writable inputs of
            the buffer's dtype: the input arrays, overwritten with the result.
        """
        MPI = self._MPI
        arrays = [np.asarray(g) for g in grads]
        layout = [(a.shape, a.dtype, self.inplace and a.flags.c_contiguous and a.flags.writeable)
                  for a in arrays]
        if layout != self._layout:
            for a in arrays:
                if not np.issubdtype(a.dtype, np.floating):
                    raise InputError(f"cannot average gradients of dtype {a.dtype}",
                                     "gradients must be floating point")
            self._plan(layout)
        scale = 1.0 / self.size if self.average else 1.0
        flat = self._flat
        requests = []
        ravel = [a.reshape(-1) for a in arrays]
        for step in self._schedule:
            if step[0] == "direct":
                _, i, start, stop = step
                src = ravel[i][start:stop]
                if scale != 1.0:
                    np.multiply(src, scale, out=src)
                self._reduce(src, requests)
                continue
            _, b, parts = step
            lo, hi = self._buckets[b]
            out = flat[lo:hi]
            if len(parts) == 1:
                i, start, stop = parts[0]
                np.copyto(out, ravel[i][start:stop], casting="unsafe")
            else:  # one C loop for all the small gradients of this bucket
                np.concatenate([ravel[i][start:stop] for i, start, stop in parts], out=out,
                               casting="unsafe")
            if scale != 1.0:
                np.multiply(out, scale, out=out)  # the bucket is hot in cache
            self._start_bucket(b, requests)
        if requests:
            MPI.Request.Waitall(requests)
            if self.compression:
                flat[...] = self._half
        return [arrays[i] if self._direct[i] else v for i, v in enumerate(self._views)]

    def sum_in_place(self, buffers):
        """Sum contiguous writable arrays over ranks, each in its own memory.

        One ``Allreduce(MPI.IN_PLACE)`` per buffer (in pieces of at most
        ``chunk_bytes``), no packing and no scaling: the zero-copy path of
        :mod:`lcls_dl.distributed.gradient_fusion`, where the step already produced few
        large buffers with ``1 / size`` folded into the loss. Every rank must pass the
        same shapes in the same order.

        Parameters
        ----------
        buffers : list of ndarray
            C-contiguous, writable; overwritten with the sums.
        """
        MPI = self._MPI
        comm = self.comm
        limit = self.chunk_bytes
        for buf in buffers:
            # the usual buffer fits one call: hand it to MPI as it is, no Python-side
            # checks (on a small model those cost more than the reduction's own
            # overhead); mpi4py refuses read-only or non-contiguous memory itself
            if buf.nbytes <= limit:
                try:
                    comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
                except BufferError as exc:
                    raise InputError("in-place allreduce needs contiguous writable arrays",
                                     f"array of shape {buf.shape}: {exc}") from None
                continue
            if not (buf.flags.c_contiguous and buf.flags.writeable):
                raise InputError("in-place allreduce needs contiguous writable arrays",
                                 f"array of shape {buf.shape}")
            flat = buf.reshape(-1)
            step = max(1, limit // flat.itemsize)
            for start in range(0, flat.size, step):
                comm.Allreduce(MPI.IN_PLACE, flat[start:start + step], MPI.SUM)

    @property
    def nbytes(self):
        """Bytes of the current fused buffer (0 before the first call)."""
        return 0 if self._layout is None else self._flat.nbytes

    @property
    def n_buckets(self):
        """Number of fused buckets per step for the current layout."""
        return 0 if self._layout is None else len(self._buckets)

    @property
    def n_calls(self):
        """MPI reductions per step (buckets plus in-place chunks)."""
        if self._layout is None:
            return 0
        return len(self._buckets) + sum(1 for step in self._schedule if step[0] == "direct")
