"""Give each rank its share of the node's cores for TensorFlow's thread pools.

Several ranks on one node, each with TensorFlow's default thread pools (one thread per
core each), oversubscribe the cores many times over and run slower than one rank.
:func:`configure_threads` sets TensorFlow's intra-op threads to ``cores / local
ranks`` (at least 1) and inter-op threads to 1-2. It must run before TensorFlow
executes its first operation; :func:`lcls_dl.distributed.init` calls it.
"""
import logging
import os

log = logging.getLogger(__name__)


def available_cores():
    """Cores this process may run on (its CPU affinity set, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_ranks(comm=None):
    """``(local_rank, local_size)``: this rank among the ranks sharing its node.

    Uses ``MPI_Comm_split_type(COMM_TYPE_SHARED)`` on ``comm`` (``COMM_WORLD`` by
    default); ``(0, 1)`` without MPI.
    """
    from .launcher import in_mpi_job

    if comm is None:
        if not in_mpi_job():
            return 0, 1
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def thread_share(cores, local_size, bound=False):
    """Intra-op threads for one of ``local_size`` ranks sharing ``cores`` cores.

    A rank the launcher bound to its own cores (``bound=True``) uses all of them.

    Examples
    --------
    >>> thread_share(16, 4)
    4
    >>> thread_share(2, 4)
    1
    >>> thread_share(2, 2, bound=True)
    2
    """
    if bound:
        return max(1, int(cores))
    return max(1, int(cores) // max(1, int(local_size)))


def configure_threads(comm=None, intra=None, inter=None):
    """Set TensorFlow's intra/inter-op thread counts to this rank's share of cores.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Communicator whose ranks share the nodes (``COMM_WORLD`` in an MPI job).
    intra, inter : int, optional
        Override the computed counts. The environment variable
        ``LCLS_DL_THREADS`` overrides ``intra`` too.

    Returns
    -------
    (int, int)
        The intra- and inter-op thread counts in effect for this process (what was
        requested; TensorFlow keeps its earlier setting if it had already started,
        which is logged as a warning).
    """
    _, local_size = local_ranks(comm)
    cores = available_cores()
    total = os.cpu_count() or cores
    bound = cores < total and local_size > 1  # the launcher pinned each rank to its cores
    if intra is None:
        env = os.environ.get("LCLS_DL_THREADS")
        intra = int(env) if env and env.isdigit() and int(env) > 0 else thread_share(
            cores, local_size, bound)
    if inter is None:
        inter = 1 if intra <= 2 else 2
    # libraries that read these at start-up (OpenMP inside oneDNN, BLAS)
    os.environ.setdefault("OMP_NUM_THREADS", str(intra))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(intra))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(inter))
    from .. import models  # noqa: F401  (imports TensorFlow without its start-up chatter)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    except RuntimeError:  # TensorFlow already initialized its thread pools
        log.warning("TensorFlow already started; cannot set its threads to %d/%d "
                    "(call lcls_dl.distributed.init() before building models)", intra, inter)
    return int(intra), int(inter)
