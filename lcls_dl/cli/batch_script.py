"""``lcls-dl batch-script``: print a Slurm / PBS / LSF batch script for an lcls-dl job.

The script text is built by :func:`make_batch_script` (a pure function, tested
without a scheduler).
"""
import os
import re
import shlex

import click

from ..distributed.launcher import MALLOC_TUNABLES
from ..errors import InputError

SCHEDULERS = ("slurm", "pbs", "lsf")
LAUNCHERS = ("auto", "srun", "mpirun", "jsrun")


def parse_time(text):
    """Seconds in a time limit written as Slurm reads ``--time``.

    ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS``: a bare
    number is minutes.

    Examples
    --------
    >>> parse_time("02:00:00"), parse_time("1-00:30:00"), parse_time("90"), parse_time("30:00")
    (7200, 88200, 5400, 1800)
    >>> parse_time("2-12"), parse_time("1-06:30")
    (216000, 109800)
    """
    t = str(text).strip()
    m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", t)
    if m:
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    else:
        parts = t.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise InputError(f"time limit {text!r} is not minutes, MM:SS, HH:MM:SS or "
                             f"D-HH:MM:SS", "--time")
        v = [int(p) for p in parts]
        d, h = 0, (v[0] if len(v) == 3 else 0)
        mi, s = (v[0], 0) if len(v) == 1 else (v[-2], v[-1])
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _hms(seconds):
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def make_batch_script(command, scheduler, nodes, ranks_per_node, time="01:00:00",
                      cpus_per_rank=None, venv=None, modules=(), account=None, queue=None,
                      job_name="lcls-dl", launcher="auto", signal_seconds=300):
    """Return the text of a batch script that runs ``lcls-dl COMMAND`` on all ranks.

    Parameters
    ----------
    command : list of str
        The lcls-dl command and its arguments, e.g. ``["train", "data", "--out", "m"]``.
    scheduler : {"slurm", "pbs", "lsf"}
    nodes, ranks_per_node : int
    time : str
        Wall-clock limit (:func:`parse_time`: minutes, ``HH:MM:SS``, ``D-HH:MM:SS``).
    cpus_per_rank : int, optional
        Cores per rank (threads are set to this share by lcls-dl itself).
    venv : str, optional
        Virtual environment to activate.
    modules : sequence of str
        Environment modules to ``module load`` first.
    account, queue : str, optional
        Allocation/project and partition/queue.
    launcher : {"auto", "srun", "mpirun", "jsrun"}
        How ranks are started; auto: srun on Slurm, mpirun on PBS and LSF.
        Open MPI with ULFM (fault tolerance) needs ``mpirun`` inside the allocation.
    signal_seconds : int
        Send SIGUSR1 to the ranks this many seconds before the time limit so the job
        can checkpoint and stop cleanly.

    Returns
    -------
    str

    Examples
    --------
    >>> text = make_batch_script(["train", "d", "--out", "m"], "slurm", 2, 4)
    >>> "#SBATCH --nodes=2" in text and "srun" in text
    True
    """
    if scheduler not in SCHEDULERS:
        raise InputError(f"unknown scheduler {scheduler!r}", "--scheduler slurm|pbs|lsf")
    if launcher not in LAUNCHERS:
        raise InputError(f"unknown launcher {launcher!r}", "--launcher")
    if not command:
        raise InputError("no lcls-dl command given", "put it after --, e.g. -- train data --out m")
    nodes, rpn = int(nodes), int(ranks_per_node)
    if nodes < 1 or rpn < 1:
        raise InputError("--nodes and --ranks-per-node must be at least 1", "batch-script")
    seconds = parse_time(time)
    if seconds <= 0:
        raise InputError(f"time limit {time!r} is zero", "--time")
    signal_seconds = max(0, min(int(signal_seconds), seconds // 2))
    if launcher == "auto":
        launcher = "srun" if scheduler == "slurm" else "mpirun"
    if launcher == "srun" and scheduler != "slurm":
        raise InputError("srun exists only under Slurm", "--launcher")
    n = nodes * rpn
    cmd = " ".join(shlex.quote(c) for c in ["lcls-dl", *command])
    lines = ["#!/bin/bash"]
    if scheduler == "slurm":
        lines += [f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
                  f"#SBATCH --ntasks-per-node={rpn}", f"#SBATCH --time={_hms(seconds)}",
                  f"#SBATCH --output={job_name}-%j.out"]
        if cpus_per_rank:
            lines.append(f"#SBATCH --cpus-per-task={int(cpus_per_rank)}")
        if account:
            lines.append(f"#SBATCH --account={account}")
        if queue:
            lines.append(f"#SBATCH --partition={queue}")
        if signal_seconds:
            lines.append(f"#SBATCH --signal=B:USR1@{signal_seconds}")
    elif scheduler == "pbs":
        cpus = rpn * int(cpus_per_rank or 1)
        lines += [f"#PBS -N {job_name}",
                  f"#PBS -l select={nodes}:ncpus={cpus}:mpiprocs={rpn}",
                  f"#PBS -l walltime={_hms(seconds)}", "#PBS -j oe"]
        if account:
            lines.append(f"#PBS -A {account}")
        if queue:
            lines.append(f"#PBS -q {queue}")
    else:  # lsf
        minutes = max(1, -(-seconds // 60))
        lines += [f"#BSUB -J {job_name}", f"#BSUB -n {n}", f'#BSUB -R "span[ptile={rpn}]"',
                  f"#BSUB -W {minutes // 60:d}:{minutes % 60:02d}",
                  f"#BSUB -o {job_name}-%J.out"]
        if account:
            lines.append(f"#BSUB -P {account}")
        if queue:
            lines.append(f"#BSUB -q {queue}")
        if signal_seconds:
            lines.append(f"#BSUB -wa USR1 -wt {max(1, signal_seconds // 60)}")
    lines += ["", "set -uo pipefail"]
    if scheduler == "pbs":  # PBS starts in $HOME; relative paths are the submitter's
        lines.append('cd "${PBS_O_WORKDIR:-.}"')
    if modules:
        lines.append("module load " + " ".join(shlex.quote(m) for m in modules))
    if venv:
        lines.append(f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}")
    lines.append("export TF_CPP_MIN_LOG_LEVEL=2")
    # what lcls-dl's own launcher gives its ranks (srun/jsrun/mpirun here bypass it)
    tunables = ":".join(f"{k}={v}" for k, v in MALLOC_TUNABLES)
    lines.append(f'export GLIBC_TUNABLES="${{GLIBC_TUNABLES:+$GLIBC_TUNABLES:}}{tunables}"'
                 "   # huge pages for TensorFlow's tensors, reused malloc buffers")
    if cpus_per_rank:
        lines.append(f"export LCLS_DL_THREADS={int(cpus_per_rank)}   # TensorFlow threads per rank")
    else:
        lines.append("# each rank gives TensorFlow its share of its node's cores "
                     "(LCLS_DL_THREADS overrides)")
    lines.append("")
    training = bool(command) and command[0] == "train"
    if launcher == "srun":
        bind = f" --cpus-per-task={int(cpus_per_rank)}" if cpus_per_rank else ""
        lines.append("# --mpi=pmix: how Open MPI 5 ranks find each other under srun (use "
                     "your site's plugin if it differs)")
        launch = f"srun --mpi=pmix --ntasks={n} --ntasks-per-node={rpn}{bind} --kill-on-bad-exit=1"
    elif launcher == "jsrun":
        launch = f"jsrun -n {n} -r {rpn} -a 1 -c {int(cpus_per_rank or 1)}"
    else:
        lines.append("# Open MPI's mpirun (MPICH/Intel: mpiexec -n N -ppn R); -x passes this "
                     "environment to the ranks on every node")
        hostfile = {"pbs": ' --hostfile "$PBS_NODEFILE"', "lsf": ' --hostfile "$LSB_DJOB_HOSTFILE"',
                    "slurm": ""}[scheduler]
        forward = " ".join(f"-x {v}" for v in ("PATH", "GLIBC_TUNABLES", "TF_CPP_MIN_LOG_LEVEL")
                           + (("LCLS_DL_THREADS",) if cpus_per_rank else ()))
        forward += " ${LD_LIBRARY_PATH:+-x LD_LIBRARY_PATH} ${VIRTUAL_ENV:+-x VIRTUAL_ENV}"
        ft = ""
        if training and "--no-fault-tolerance" not in command:
            from ..distributed.ulfm import mpiexec_ft_args

            lines.append("# --with-ft ulfm: Open MPI 5 fault tolerance, training survives lost "
                         "ranks (remove for another MPI)")
            ft = " " + " ".join(mpiexec_ft_args())
        launch = f"mpirun -n {n} --map-by ppr:{rpn}:node --bind-to none{hostfile}{ft} {forward}"
    resume = ""
    out = _option_value(command, "--out")
    if training and out and "--resume" not in command and "--overwrite" not in command:
        ckpts = shlex.quote(os.path.join(out, "checkpoints", "epoch-*.npz"))
        lines += ["# resubmitted after a stop, the job continues from its last checkpoint",
                  "resume=", f"if compgen -G {ckpts} > /dev/null; then resume=--resume; fi"]
        resume = " $resume"
    lines += [f"{launch} {cmd}{resume} &", "pid=$!"]
    if signal_seconds:
        if scheduler == "pbs":
            lines.append(f"# PBS has no warning signal: a timer sends USR1 {signal_seconds} s "
                         "before the walltime")
            lines += [f"( sleep {seconds - signal_seconds}; kill -USR1 $pid 2>/dev/null ) &",
                      "timer=$!"]
        lines += [f"# SIGUSR1 {signal_seconds} s before the time limit is forwarded to the "
                  "ranks (lcls-dl train checkpoints and stops on it); resubmit to resume",
                  "trap 'kill -USR1 $pid 2>/dev/null' USR1 TERM"]
    lines += ["wait $pid", "rc=$?",
              "while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done   "
              "# wait again after a trapped signal"]
    if signal_seconds and scheduler == "pbs":
        lines.append("kill $timer 2>/dev/null")
    lines += ["exit $rc", ""]
    return "\n".join(lines)


def _option_value(args, name):
    """The value of option ``name`` in an argument list (``--out m`` or ``--out=m``)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_command(command):
    """Refuse now what the job would refuse only after its wait in the queue: an unknown
    lcls-dl command, options it does not take, and ``--np`` (the script starts the ranks)."""
    import importlib

    from .main import COMMANDS

    if not command:
        return  # make_batch_script says what is missing
    name, args = command[0], list(command[1:])
    if name not in COMMANDS:
        raise InputError(f"unknown lcls-dl command {name!r} (one of {', '.join(COMMANDS)})",
                         "the command after --")
    if any(a == "--np" or a.startswith("--np=") for a in args):
        raise InputError("--np does not belong in a batch script's command: the script starts "
                         "--nodes x --ranks-per-node ranks itself", "the command after --")
    module, attr, _ = COMMANDS[name]
    cmd = getattr(importlib.import_module(module), attr)
    try:
        cmd.make_context(f"lcls-dl {name}", args)
    except click.exceptions.Exit:  # --help
        pass
    except click.ClickException as exc:
        raise InputError(f"lcls-dl {name}: {exc.format_message()}", "the command after --") \
            from None


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--scheduler", type=click.Choice(SCHEDULERS), required=True,
              help="Batch system the script is for.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of nodes.")
@click.option("--ranks-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="MPI ranks per node.")
@click.option("--cpus-per-rank", type=click.IntRange(min=1), default=None,
              help="Cores per rank (default: the scheduler's).")
@click.option("--time", "time_", default="01:00:00", show_default=True,
              help="Wall-clock limit as Slurm reads it: minutes, HH:MM:SS or D-HH:MM:SS.")
@click.option("--venv", type=click.Path(file_okay=False),
              help="Virtual environment to activate in the job.")
@click.option("--modules", default="", metavar='"M1 M2"',
              help="Environment modules to load first (space separated).")
@click.option("--account", help="Account / project to charge.")
@click.option("--queue", help="Partition (Slurm) or queue (PBS, LSF).")
@click.option("--job-name", default="lcls-dl", show_default=True)
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="auto", show_default=True,
              help="Rank launcher: srun on Slurm, mpirun elsewhere (auto); mpirun for Open MPI ULFM.")
@click.option("--signal-seconds", type=click.IntRange(min=0), default=300, show_default=True,
              help="Send SIGUSR1 this long before the time limit (checkpoint); 0: none.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def batch_script(scheduler, nodes, ranks_per_node, cpus_per_rank, time_, venv, modules,
                 account, queue, job_name, launcher, signal_seconds, command):
    """Print a Slurm/PBS/LSF batch script for an lcls-dl job.

    Everything after -- is the lcls-dl command every rank runs. Save the output and
    submit it with sbatch, qsub or bsub.

    \b
    Example:
      lcls-dl batch-script --scheduler slurm --nodes 4 --ranks-per-node 8 \\
          --time 02:00:00 --venv ~/lcls-venv --modules "gcc openmpi" \\
          -- train data1 --out model1 > train.sbatch
      sbatch train.sbatch
    """
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] == "lcls-dl":
        command = command[1:]
    check_command(command)
    text = make_batch_script(command, scheduler, nodes, ranks_per_node, time=time_,
                             cpus_per_rank=cpus_per_rank, venv=venv,
                             modules=modules.split(), account=account, queue=queue,
                             job_name=job_name, launcher=launcher,
                             signal_seconds=signal_seconds)
    click.echo(text, nl=False)
