"""``lcls-dl run``: start a user's Python script on N MPI ranks."""
import os
import runpy
import sys

import click

from ..errors import InputError


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("--np", "np_", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of MPI ranks to start.")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False),
              help="MPI hostfile for several nodes (passed to mpiexec).")
@click.option("--mpiexec-args", default="", metavar="ARGS",
              help='Extra mpiexec arguments, one quoted string, e.g. "--mca btl tcp,self".')
@click.argument("script", type=click.Path(dir_okay=False))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run(np_, hostfile, mpiexec_args, script, script_args):
    """Run your own Keras script data-parallel over MPI ranks.

    The script uses lcls_dl.distributed (ld.init(), ld.DistributedOptimizer,
    ld.BroadcastCallback, ...; see docs/distributed.md). Every rank runs SCRIPT with
    SCRIPT_ARGS; output lines carry their rank. Under mpiexec/srun/jsrun already,
    the script runs in this rank without starting another job. Exit code: the job's.

    \b
    Example:
      lcls-dl run --np 2 train_mine.py --epochs 5
      lcls-dl run --np 8 --hostfile hosts.txt train_mine.py
    """
    from ..distributed.launcher import maybe_launch
    from .common import verbosity_argv

    if script.startswith("-"):  # an unknown option of run, before the script
        raise click.UsageError(f"No such option: {script}")
    if not os.path.isfile(script):
        raise InputError("script not found", script)
    argv = ["run", "--np", str(np_)]
    if hostfile:
        argv += ["--hostfile", os.path.abspath(hostfile)]
    argv += [os.path.abspath(script), *script_args]
    code = maybe_launch(verbosity_argv() + argv, np_, hostfile=hostfile,
                        mpiexec_args=mpiexec_args or "")
    if code is not None:
        return code
    return run_script(script, script_args)


def run_script(script, script_args=()):
    """Run ``script`` as ``__main__`` in this process with ``sys.argv = [script, *args]``.

    Returns the script's exit code; its exceptions print a normal Python traceback
    (exit 1) so a user debugs their own code as usual. In an MPI job ``lcls-dl`` then
    makes sure the job ends (:func:`lcls_dl.distributed.launcher.end_job_on_failure`).
    """
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        click.echo(str(exc.code), err=True)
        return 1
    except Exception:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
