"""The files of a model directory that training writes and resumes from, without TensorFlow.

Checkpoints (``MODEL_DIR/checkpoints/epoch-NNNN.npz``, ``epoch-NNNN-step-SSSSSS.npz`` for a
stopped epoch, ``best.npz``) are ``.npz`` archives of numpy arrays plus a JSON state,
written atomically. The launcher of ``lcls-dl train --np N`` checks the model directory
with :func:`prepare_out_dir` (``create=False``) before it starts any rank, so this module
imports nothing heavy.
"""
import glob
import json
import os
import re
import shutil
import time

import numpy as np

from .atomic import atomic_open, check_writable
from .errors import InputError

CHECKPOINT_DIR = "checkpoints"
#: version written; versions this code can resume from (1: epoch boundaries only)
CHECKPOINT_VERSION = 2
READABLE_CHECKPOINT_VERSIONS = (1, 2)
_CKPT_RE = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{6,}))?\.npz$")


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_path(out_dir, epoch, step=0):
    """``checkpoints/epoch-NNNN.npz`` after ``epoch`` complete epochs, or
    ``epoch-NNNN-step-SSSSSS.npz`` after ``step`` more steps (an interrupted epoch)."""
    name = f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "") + ".npz"
    return os.path.join(out_dir, CHECKPOINT_DIR, name)


def _checkpoint_key(path):
    """``(epochs done, steps done in the next epoch)`` of a checkpoint path, or None."""
    m = _CKPT_RE.search(os.path.basename(path))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _test_checkpoint_pause(path):
    """Test hooks inside the atomic write of a checkpoint (temporary file written, not yet
    renamed): ``LCLS_DL_TEST_CHECKPOINT_FAIL="epoch-0002.npz"`` fails that write as a full
    disk would; ``LCLS_DL_TEST_CHECKPOINT_SLEEP="epoch-0002.npz:30"`` pauses there, after
    creating ``<checkpoints>/.writing-<name>``, so a test can kill the process."""
    if os.environ.get("LCLS_DL_TEST_CHECKPOINT_FAIL") == os.path.basename(path):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    spec = os.environ.get("LCLS_DL_TEST_CHECKPOINT_SLEEP")
    if not spec:
        return
    name, _, seconds = spec.rpartition(":")
    if name == os.path.basename(path):
        mark = os.path.join(os.path.dirname(path), ".writing-" + name)
        with open(mark, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(float(seconds))


def save_checkpoint(path, model_vars, opt_vars, state):
    """Write one checkpoint atomically (``.npz``: ``m/NNN``, ``o/NNN``, ``state`` JSON).

    A process killed during the write leaves only a hidden temporary file (removed or
    ignored later); the previous checkpoints are untouched.
    """
    arrays = {f"m/{i:04d}": np.asarray(v) for i, v in enumerate(model_vars)}
    arrays.update({f"o/{i:04d}": np.asarray(v) for i, v in enumerate(opt_vars)})
    state = dict(state, checkpoint_version=CHECKPOINT_VERSION,
                 n_model_vars=len(model_vars), n_opt_vars=len(opt_vars))
    arrays["state"] = np.frombuffer(json.dumps(state, default=_json_num).encode(), np.uint8)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        _test_checkpoint_pause(path)


def _json_num(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def load_checkpoint(path):
    """Read a checkpoint -> ``(model_vars, opt_vars, state)``.

    Raises
    ------
    InputError
        The file is missing, truncated or corrupted, or was written by an incompatible
        version of lcls-dl (one line naming the file).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            state = json.loads(bytes(z["state"]).decode())
            version = state.get("checkpoint_version")
            if version not in READABLE_CHECKPOINT_VERSIONS:
                raise _VersionMismatch(version)
            model_vars = [z[f"m/{i:04d}"] for i in range(state["n_model_vars"])]
            opt_vars = [z[f"o/{i:04d}"] for i in range(state["n_opt_vars"])]
    except FileNotFoundError:
        raise InputError("checkpoint not found", path) from None
    except _VersionMismatch as exc:
        raise InputError(f"incompatible checkpoint version {exc.args[0]!r} (this lcls-dl "
                         f"reads version(s) {', '.join(map(str, READABLE_CHECKPOINT_VERSIONS))}"
                         f"); train again with --overwrite", path) from None
    except Exception as exc:  # zipfile.BadZipFile, EOFError, KeyError, ValueError, zlib.error
        raise InputError(f"corrupted or truncated checkpoint ({type(exc).__name__}); delete it "
                         f"or train again with --overwrite", path) from None
    return model_vars, opt_vars, state


class _VersionMismatch(Exception):
    pass


def latest_checkpoint(out_dir):
    """Path of the newest epoch or mid-epoch checkpoint in ``out_dir`` (None if there is none).

    Temporary files of an interrupted write (``.epoch-*.npz.*.tmp``) are never chosen.
    """
    found = []
    for p in glob.glob(os.path.join(out_dir, CHECKPOINT_DIR, "epoch-*.npz")):
        key = _checkpoint_key(p)
        if key is not None:
            found.append((key, p))
    return max(found)[1] if found else None


def prune_checkpoints(out_dir, keep):
    paths = [p for p in glob.glob(os.path.join(out_dir, CHECKPOINT_DIR, "epoch-*.npz"))
             if _checkpoint_key(p) is not None]
    paths.sort(key=_checkpoint_key)
    for p in paths[:-max(int(keep), 1)]:
        try:
            os.unlink(p)
        except OSError:
            pass


# -- output directory -------------------------------------------------------------------------
def prepare_out_dir(out_dir, resume=False, overwrite=False, create=True):
    """Check/create MODEL_DIR: refuse an existing one unless ``resume`` or ``overwrite``.

    ``overwrite`` deletes only a directory that looks like a model directory (has
    ``model.json``, ``checkpoints/``, ``logs/`` or ``metrics.csv``) or is empty. With
    ``create=False`` only the checks run (and that the directory could be written):
    nothing is deleted or created.

    Raises
    ------
    InputError
        The path is a file; ``resume`` without a checkpoint; an existing directory
        without ``overwrite``, or one that is not a model directory; with
        ``create=False``, a place that cannot be written.

    Examples
    --------
    >>> prepare_out_dir("/nonexistent/model1", create=False)
    '/nonexistent/model1'
    """
    out_dir = os.fspath(out_dir)
    exists = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError("output path exists and is not a directory", out_dir)
    if resume:
        if latest_checkpoint(out_dir) is None:
            raise InputError("nothing to resume: no checkpoints in the model directory", out_dir)
        return out_dir
    if exists:
        if not overwrite:
            raise InputError("model directory exists (use --overwrite to replace it or "
                             "--resume to continue training)", out_dir)
        looks = any(os.path.exists(os.path.join(out_dir, name))
                    for name in ("model.json", CHECKPOINT_DIR, "logs", "metrics.csv"))
        if not looks:
            raise InputError("refusing to overwrite a directory that is not an lcls-dl model "
                             "directory", out_dir)
        if create:
            shutil.rmtree(out_dir)
    if create:
        os.makedirs(out_dir, exist_ok=True)
    else:
        check_writable(out_dir, "model directory")
    return out_dir
