"""The process group a job runs in, as the training loop sees it.

Training code talks to a ``World`` and never to MPI directly, so the same loop runs
as one process (:class:`LocalWorld`) or as N MPI ranks (``MPIWorld`` in
:mod:`lcls_dl.distributed.mpi_world`, same methods).
"""

class LocalWorld:
    """A world of one process: every collective is the identity."""

    rank = 0
    size = 1
    is_root = True

    def allreduce_mean(self, arrays):
        """Average a list of float arrays over ranks (in place where possible); return the list."""
        return arrays

    def allreduce_sum_inplace(self, buffers):
        """Sum writable arrays over ranks in their own memory (nothing to do alone)."""

    def allreduce_sum(self, value):
        """Sum a scalar or array over ranks."""
        return value

    def broadcast(self, arrays, root=0):
        """Overwrite ``arrays`` (list of ndarrays) with root's values; return the list."""
        return arrays

    def bcast_object(self, obj, root=0):
        """Broadcast a small picklable object from ``root``."""
        return obj

    def barrier(self):
        pass

    def agree(self, flag):
        """True on every rank iff ``flag`` is true on every rank (e.g. 'stop now')."""
        return bool(flag)

    def allgather_object(self, obj):
        return [obj]

