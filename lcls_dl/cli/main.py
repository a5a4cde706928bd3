"""Entry point of the ``lcls-dl`` command.

Subcommands live one per module in :mod:`lcls_dl.cli` and are imported only when
used, so ``lcls-dl --help`` stays fast (TensorFlow takes seconds to import).
Errors are printed as one line, ``lcls-dl: error: <what> (<where>)``; exit code 2
for usage errors, 1 for failures; a traceback only with ``--verbose``.
"""
import importlib
import importlib.util
import logging
import os
import sys

import click

from .. import __version__
from ..errors import LclsError
from .common import set_verbosity

# name -> (module, attribute, one-line summary shown by `lcls-dl --help` without importing)
COMMANDS = {
    "simulate": ("lcls_dl.cli.simulate", "simulate", "Write simulated LCLS water/ice detector runs (CXI + truth.csv)."),
    "ingest": ("lcls_dl.cli.ingest", "ingest", "Turn detector files into a sharded, labeled, training-ready dataset."),
    "info": ("lcls_dl.cli.info", "info", "Summarize a dataset or a model directory."),
    "train": ("lcls_dl.cli.train", "train", "Train the CNN+DNN classifier on a dataset (optionally over MPI)."),
    "evaluate": ("lcls_dl.cli.evaluate", "evaluate", "Score a trained model on a labeled dataset."),
    "predict": ("lcls_dl.cli.predict", "predict", "Classify frames of a dataset or raw detector files."),
    "suggest-labels": ("lcls_dl.cli.suggest", "suggest_labels", "Pick the frames a human should label next."),
    "label": ("lcls_dl.cli.label", "label", "Import, set and export labels of a dataset."),
    "active-loop": ("lcls_dl.cli.active_loop", "active_loop", "Measure label efficiency with a simulated labeler."),
    "demo": ("lcls_dl.cli.demo", "demo", "Run the whole pipeline end to end on simulated data."),
    "run": ("lcls_dl.cli.run", "run", "Run your own Keras script data-parallel over MPI ranks."),
    "batch-script": ("lcls_dl.cli.batch_script", "batch_script", "Print a Slurm/PBS/LSF batch script for an lcls-dl job."),
}


def _available(name):
    module = COMMANDS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it runs."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(name):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="lcls-dl")
@click.option("-v", "--verbose", count=True, help="More output; tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.pass_context
def cli(ctx, verbose, quiet):
    """lcls-dl: classify X-ray detector images (water, ice, miss) at light sources.

    \b
    A typical session:
      lcls-dl simulate run1 --frames 200          # or bring your own CXI / NeXus / HDF5
      lcls-dl ingest run1 --labels run1/truth.csv --out data1
      lcls-dl train data1 --out model1 --np 2
      lcls-dl suggest-labels model1 data1 --budget 50 --out next.csv

    Every command has --help with an example.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose > 1 else "2")
    set_verbosity(quiet=quiet, verbose=verbose)


# click >= 8.2 raises this for a bare group invocation; older clicks print help and exit
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _verbose(argv):
    return any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"})
               for a in argv)


def _error(message, code):
    message = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"lcls-dl: error: {message}", err=True)
    return code


def main(argv=None):
    """Run the CLI; return (and exit with) its code."""
    from ..distributed.launcher import end_job_on_failure, mark_started

    argv = list(sys.argv[1:] if argv is None else argv)
    mark_started()  # a rank started by lcls-dl's launcher says so
    try:
        rv = cli.main(args=argv, prog_name="lcls-dl", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except _NO_ARGS_IS_HELP as exc:  # a group run with no command: show its help
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        code = 2
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "lcls-dl"
        code = _error(f"{exc.format_message()} (see '{cmd} --help')", 2)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        code = _error("interrupted", 130)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except KeyboardInterrupt:
        code = _error("interrupted", 130)
    except LclsError as exc:
        if _verbose(argv):
            import traceback
            traceback.print_exc()
        code = _error(exc, exc.exit_code)
    except click.ClickException as exc:
        code = _error(exc.format_message(), exc.exit_code)
    except Exception as exc:  # a bug or an unexpected library failure: still one line
        if _verbose(argv):
            import traceback
            traceback.print_exc()
        code = _error(f"{type(exc).__name__}: {exc} (run with -v for a traceback)", 1)
    end_job_on_failure(code)  # a rank that fails alone must not leave the others waiting
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
