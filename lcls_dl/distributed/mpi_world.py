"""``MPIWorld``: the :class:`~lcls_dl.distributed.local_world.LocalWorld` interface over mpi4py.

Arrays move with mpi4py's buffer-protocol collectives (``Allreduce`` with
``MPI.IN_PLACE``, ``Bcast``: no pickling, no copies beyond what MPI does); only small
metadata (configurations, lists of names, stop flags) goes through the pickle-based
``bcast`` / ``allgather``.
"""
import numpy as np

from ..errors import InputError
from .gradient_averager import DEFAULT_BUCKET_BYTES, GradientAverager


class MPIWorld:
    """The ranks of an MPI communicator, with the methods training code uses.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        ``MPI.COMM_WORLD`` by default.
    bucket_bytes, compression, overlap
        Passed to the :class:`~lcls_dl.distributed.gradient_averager.GradientAverager` that
        :meth:`allreduce_mean` uses.

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``:

    >>> from lcls_dl.distributed.mpi_world import MPIWorld
    >>> world = MPIWorld()
    >>> grads = world.allreduce_mean([np.full(3, world.rank, np.float32)])  # doctest: +SKIP
    >>> world.allreduce_sum(1) == world.size
    True
    """

    def __init__(self, comm=None, bucket_bytes=DEFAULT_BUCKET_BYTES, compression=None,
                 overlap=False):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self.averager = GradientAverager(self.comm, bucket_bytes=bucket_bytes,
                                         compression=compression, overlap=overlap)

    def __repr__(self):
        return f"MPIWorld(rank={self.rank}, size={self.size})"

    def allreduce_mean(self, arrays):
        """Average a list of float arrays over ranks; return the list of averages.

        The result arrays are views into the averager's reused buffer (see
        :class:`~lcls_dl.distributed.gradient_averager.GradientAverager`): consume them
        before the next call.
        """
        if self.size == 1:
            return list(arrays)
        return self.averager(arrays)

    def allreduce_sum_inplace(self, buffers):
        """Sum contiguous writable float arrays over ranks, in their own memory
        (:meth:`~lcls_dl.distributed.gradient_averager.GradientAverager.sum_in_place`)."""
        if self.size > 1:
            self.averager.sum_in_place(buffers)

    def allreduce_sum(self, value):
        """Sum a Python/NumPy scalar or an array over ranks.

        Scalars come back as Python ``int``/``float``; arrays as a new array of the same
        dtype (summed in place in a copy with ``MPI.IN_PLACE``).
        """
        MPI = self._MPI
        if np.ndim(value) == 0:
            arr = np.array([value])
            if arr.dtype == bool:
                arr = arr.astype(np.int64)
            self.comm.Allreduce(MPI.IN_PLACE, arr, MPI.SUM)
            return arr[0].item()
        arr = np.ascontiguousarray(value).copy()
        self.comm.Allreduce(MPI.IN_PLACE, arr, MPI.SUM)
        return arr

    def broadcast(self, arrays, root=0):
        """Overwrite ``arrays`` (list of ndarrays) with root's values; return the list.

        Contiguous writable arrays are overwritten in place; others are replaced in the
        returned list by broadcast copies. Shapes and dtypes must agree on all ranks.
        """
        out = []
        for i, a in enumerate(arrays):
            a = np.asarray(a)
            buf = a if (a.flags.c_contiguous and a.flags.writeable) else np.ascontiguousarray(a).copy()
            if buf.size:
                self.comm.Bcast(buf, root=root)
            out.append(buf)
        if isinstance(arrays, list):
            arrays[:] = out
            return arrays
        return out

    def bcast_object(self, obj, root=0):
        """Broadcast a small picklable object from ``root``."""
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def agree(self, flag):
        """True on every rank iff ``flag`` is true on every rank (e.g. 'stop now')."""
        return bool(self.comm.allreduce(bool(flag), op=self._MPI.LAND))

    def allgather_object(self, obj):
        """List of every rank's ``obj``, in rank order."""
        return self.comm.allgather(obj)

    def check_same(self, value, what):
        """Raise :class:`InputError` unless ``value`` (picklable) is equal on all ranks."""
        values = self.allgather_object(value)
        if any(v != values[0] for v in values[1:]):
            raise InputError(f"{what} differs between ranks: {values}", f"rank {self.rank}")
        return value


def get_world(**kwargs):
    """An :class:`MPIWorld` when running as one of several MPI ranks, else a ``LocalWorld``.

    Does not import mpi4py (nor initialize MPI) unless the environment says this
    process was started by an MPI launcher.
    """
    from .launcher import check_world_size, in_mpi_job
    from .local_world import LocalWorld

    if in_mpi_job():
        world = MPIWorld(**kwargs)
        check_world_size(world.size)
        if world.size > 1:
            return world
    return LocalWorld()
