"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every shard, manifest, checkpoint and label file in lcls-dl goes through here.
Write to a temporary name in the same directory, flush and fsync, then rename
(``os.replace`` is atomic on POSIX within one file system).
"""
import contextlib
import json
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path, what="output"):
    """Raise ``InputError`` now when ``path`` could not be written later: the nearest
    existing directory above it (or the path itself) is not writable, or the path is
    taken by a file where a directory is wanted. For checks before long work (a
    read-only file system, a directory of another user).
    """
    from .errors import InputError

    path = os.path.abspath(os.fspath(path))
    probe = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"cannot write the {what}: {probe} is a file, not a directory", path)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the {what}: {probe} is not writable", path)


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Use for writers that want a file name rather than a file object (h5py, Keras).
    On an exception the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> with atomic_path("shard-00000.h5") as tmp:     # doctest: +SKIP
    ...     with h5py.File(tmp, "w") as f:
    ...         f["x"] = x
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               suffix=suffix, dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be shareable
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temporary file for writing; rename it onto ``path`` when closed cleanly."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()


def write_json(path, obj, indent=2):
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(obj):
    # numpy scalars and arrays appear in parameters and metrics
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
