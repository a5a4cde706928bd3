"""Pieces every command shares: progress bars, output echo, option helpers."""
import click

# Set once per process by the ``lcls-dl`` group from -q/-v. Kept in the process, not in the
# environment, so it never leaks into child processes; relaunched MPI ranks get the flags
# on their command line instead (see verbosity_argv).
_VERBOSITY = {"quiet": False, "verbose": 0}


def set_verbosity(quiet=False, verbose=0):
    _VERBOSITY.update(quiet=bool(quiet), verbose=int(verbose))


def quiet():
    """True when the user asked for ``-q``."""
    return _VERBOSITY["quiet"]


def verbosity():
    """The ``-v`` count."""
    return _VERBOSITY["verbose"]


def verbosity_argv():
    """Global flags that give a relaunched ``lcls-dl`` (an MPI rank) this process's verbosity."""
    return ["-q"] if quiet() else ["-v"] * verbosity()


def progress(iterable=None, total=None, desc=None, unit="frame", disable=None, **kwargs):
    """A tqdm progress bar on stderr that honors ``-q`` (and stays quiet off a terminal in tests)."""
    from tqdm.auto import tqdm

    if disable is None:
        # None lets tqdm decide: drawn on a terminal, silent in logs and pipes
        disable = True if quiet() else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, leave=False, **kwargs)


def echo(message="", err=False):
    """Print unless ``-q``; results a user asked for should use ``click.echo`` directly."""
    if not quiet():
        click.echo(message, err=err)
