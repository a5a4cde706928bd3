"""Pieces every command shares: progress bars, output echo, option helpers."""
import os

import click


def quiet():
    """True when the user asked for ``-q``."""
    return os.environ.get("LCLS_DL_QUIET") == "1"


def progress(iterable=None, total=None, desc=None, unit="frame", disable=None, **kwargs):
    """A tqdm progress bar on stderr that honors ``-q`` (and stays quiet off a terminal in tests)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = quiet()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, leave=False, **kwargs)


def echo(message="", err=False):
    """Print unless ``-q``; results a user asked for should use ``click.echo`` directly."""
    if not quiet():
        click.echo(message, err=err)
