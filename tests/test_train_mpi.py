"""``lcls-dl train --np N``: real ranks through the launcher, same model as one process.

Each rank writes a SHA-256 of its final weights (``LCLS_DL_DEBUG_WEIGHTS=DIR``), so the
tests check that all ranks end bitwise identical; a SIGTERM to the launcher is relayed to
the ranks (as SIGUSR1), they checkpoint after the same step and a ``--resume`` gives the
same weights, bitwise, as the uninterrupted run.
"""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_fault_tolerance import MPIEXEC, digests, env_with, make_data, model_json, run, train_args

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                                                  reason="no mpiexec")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("mpi"))


def _run_np(data, out, np_, dbg, timeout=120, **env):
    dbg.mkdir(exist_ok=True)
    extra = ["--np", str(np_)] if np_ > 1 else []
    proc = run(train_args(data, out, extra=extra), out.parent, timeout=timeout,
               LCLS_DL_DEBUG_WEIGHTS=dbg, **env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc, model_json(out), digests(dbg)


@pytest.fixture(scope="module")
def np1(data):
    return _run_np(data, data["root"] / "np1", 1, data["root"] / "dbg_np1")


@pytest.fixture(scope="module")
def np2(data):
    return _run_np(data, data["root"] / "np2", 2, data["root"] / "dbg_np2")


def _val_accuracy(meta):
    return meta["metrics"]["val"]["accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_np2_ranks_bitwise_identical_and_as_accurate_as_np1(np1, np2):
    proc, meta, dig = np2
    tr = meta["training"]
    assert tr["world_size"] == 2 and tr["global_batch_size"] == 8
    assert tr["lr_scaling"]["rule"] == "linear"
    assert tr["lr_scaling"]["peak_lr"] == pytest.approx(2 * 0.01)
    assert np1[1]["training"]["lr_scaling"]["peak_lr"] == pytest.approx(0.01)
    assert sorted(dig) == [0, 1] and dig[0] == dig[1]
    assert abs(_val_accuracy(meta) - _val_accuracy(np1[1])) <= 0.05   # one frame of 20
    assert _val_accuracy(meta) >= 0.9                                  # it learned
    # images/s counts every rank's frames: np=2 trained the same frames as np=1
    frames = [m["training"]["images_per_second"] * m["training"]["train_seconds"]
              for m in (np1[1], meta)]
    assert frames[1] == pytest.approx(frames[0], rel=0.1)
    # the MPI library is recorded where MPI ran
    assert "MPI" in meta["software"]["mpi_library"] and "mpi_library" not in np1[1]["software"]
    # only rank 0 reports
    written = [ln for ln in proc.stdout.splitlines() if "model written to" in ln]
    assert len(written) == 1 and written[0].startswith("[1,0]")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_np4_oversubscribed(data, np1, tmp_path):
    proc, meta, dig = _run_np(data, tmp_path / "np4", 4, tmp_path / "dbg", timeout=180)
    assert meta["training"]["world_size"] == 4 and meta["training"]["global_batch_size"] == 16
    assert sorted(dig) == [0, 1, 2, 3] and len(set(dig.values())) == 1
    assert abs(_val_accuracy(meta) - _val_accuracy(np1[1])) <= 0.1


def _signal_after_epoch_1(data, out, sig, group=False):
    """Start ``train --np 2`` (slowed down), send ``sig`` once epoch 1 is checkpointed, to
    the launcher or to its whole process group; return ``(proc, stdout, stderr)``."""
    cmd = [sys.executable, "-m", "lcls_dl", *train_args(data, out, extra=["--np", "2"])]
    proc = subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group,  # a group of its own to signal
                            env=env_with(LCLS_DL_TEST_STEP_SLEEP="0.25"))
    try:
        t0 = time.time()
        while not (out / "checkpoints" / "epoch-0001.npz").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 90, "no epoch finished"
            time.sleep(0.05)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, stdout, stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_to_launcher_checkpoints_and_resume_is_bitwise(data, np2, tmp_path):
    out, dbg = tmp_path / "m", tmp_path / "dbg"
    dbg.mkdir()
    # what a scheduler sends the launcher at the time limit
    proc, stdout, stderr = _signal_after_epoch_1(data, out, signal.SIGTERM)
    assert proc.returncode == 0, (stdout + stderr)[-3000:]
    assert not (out / "model.json").exists()
    (line,) = [ln for ln in stdout.splitlines() if "resume with: " in ln]
    assert line.startswith("[1,0]")
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["lcls-dl", "train"] and "--np" in resume and resume[-1] == "--resume"
    mid = [n for n in os.listdir(out / "checkpoints") if "-step-" in n]
    assert len(mid) == 1, os.listdir(out / "checkpoints")
    assert "by SIGUSR1" in stdout                  # relayed by the launcher
    # a damaged best.npz (read by rank 0 alone) stops both ranks with one clear line
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "checkpoints" / "best.npz").write_bytes(b"PK\x03\x04 torn")
    broken = run([str(bad) if a == str(out) else a for a in resume[1:]], tmp_path, timeout=120)
    assert broken.returncode == 1, broken.stderr[-3000:]
    errors = [ln for ln in broken.stderr.splitlines() if "lcls-dl: error:" in ln]
    assert {ln[:5] for ln in errors} == {"[1,0]", "[1,1]"}
    assert all("best.npz" in ln for ln in errors), errors
    again = run(resume[1:], tmp_path, timeout=120, LCLS_DL_DEBUG_WEIGHTS=dbg)
    assert again.returncode == 0, again.stderr[-3000:]
    meta = model_json(out)
    assert meta["training"]["resumed"] and meta["training"]["epochs_run"] == 5
    assert digests(dbg) == np2[2]                  # same weights as never interrupted


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)],
                         ids=["ctrl-c", "timeout"])
def test_signal_to_the_process_group_checkpoints(data, tmp_path, sig, code):
    """Ctrl-C in a terminal, ``timeout`` and schedulers signal the whole process group:
    mpiexec must not get it (it would kill the ranks), the launcher relays a stop."""
    out = tmp_path / "m"
    proc, stdout, stderr = _signal_after_epoch_1(data, out, sig, group=True)
    assert proc.returncode == code, (stdout + stderr)[-3000:]
    assert [ln for ln in stdout.splitlines() if "resume with: " in ln]
    assert [n for n in os.listdir(out / "checkpoints") if "-step-" in n]
    assert ("Ctrl-C" in stderr) == (sig == signal.SIGINT)


@pytest.mark.timeout(180)
def test_root_checkpoint_write_failure_stops_every_rank(data, tmp_path):
    """Only rank 0 writes: a full disk there must end the job with one clear error on
    every rank (not leave rank 1 waiting, not let it train on as a survivor)."""
    out = tmp_path / "m"
    proc = run(train_args(data, out, extra=["--np", "2"]), tmp_path, timeout=150,
               LCLS_DL_TEST_CHECKPOINT_FAIL="epoch-0002.npz")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "lcls-dl: error:" in ln]
    assert {ln[:5] for ln in errors} == {"[1,0]", "[1,1]"}
    assert all("cannot write the epoch 2 checkpoint" in ln and "No space left" in ln
               for ln in errors)
    ck = sorted(os.listdir(out / "checkpoints"))
    assert "epoch-0001.npz" in ck and "epoch-0002.npz" not in ck
    assert not (out / "model.json").exists()
