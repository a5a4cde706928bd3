"""Shared test setup: MPI-as-root variables, quiet TensorFlow, a CLI runner."""
import os
import subprocess
import sys

import pytest

# mpiexec refuses to run as root without these; CI runs as root.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")


def run_cli(args, cwd, timeout=300, env=None, check=False):
    """Run ``python -m lcls_dl ARGS`` in ``cwd`` (outside the source tree) with a timeout.

    Returns the CompletedProcess (text mode). A hang fails the test instead of stalling CI.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "lcls_dl", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lcls-dl {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(tmp_path):
    """``cli(*args, timeout=...)`` runs the lcls-dl CLI in a subprocess inside tmp_path."""
    def _run(*args, timeout=300, env=None, check=False):
        return run_cli(args, cwd=tmp_path, timeout=timeout, env=env, check=check)
    return _run
