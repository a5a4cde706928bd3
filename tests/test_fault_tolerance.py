"""Fault tolerance of ``lcls-dl train`` and ``ingest``: what survives what.

- stop signals (a scheduler's time limit): checkpoint mid-epoch, exit 0, resume bitwise;
- a process killed while writing a checkpoint: the previous one stays good, resume works;
- bad resumes (other dataset, other model configuration, incompatible version): one line;
- ULFM: SIGKILLed ranks (one, two, rank 0) -> the survivors shrink and finish;
- no ULFM / too few ranks left: ``--max-restarts`` restarts from the last checkpoint;
- ingest: a rank killed mid-run -> re-running completes the dataset exactly.

Faults are injected with the environment hooks of :mod:`lcls_dl.models.training`
(``LCLS_DL_TEST_KILL``, ``LCLS_DL_TEST_SIGNAL``, ``LCLS_DL_TEST_CHECKPOINT_SLEEP``) and
:mod:`lcls_dl.ingest.pipeline` (``LCLS_DL_TEST_INGEST_KILL``): real signals, real ranks.
Every subprocess has a timeout, so a hang fails instead of stalling CI.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_cli
from helpers_data import make_dataset

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK), reason="no mpiexec")
BLUEPRINT = {"cnn": {"filters": [4]}, "dnn": {"units": [8]},
             "head": {"embedding": 8, "dropout": 0.2}}
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def make_data(root):
    """A tiny learnable dataset (72 frames, 8x16 images) and a tiny blueprint under ``root``."""
    ds = make_dataset(root / "ds", n=72, shape=(8, 16), n_q=12, shard_size=24, seed=5)
    bp = root / "bp.json"
    bp.write_text(json.dumps(BLUEPRINT))
    return {"root": root, "ds": ds, "bp": str(bp)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ft"))


def train_args(data, out, epochs=5, extra=()):
    return ["train", data["ds"], "--out", str(out), "--epochs", str(epochs), "--batch-size", "4",
            "--blueprint", data["bp"], "--seed", "2", "--patience", "0", "--val-fraction", "0.3",
            "--lr", "0.01", "--no-calibrate", *extra]


def env_with(**kw):
    env = dict(os.environ)
    env.update(QUIET)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def run(args, cwd, timeout=60, **env):
    """``python -m lcls_dl ARGS`` with a timeout (a hang fails the test)."""
    return run_cli(args, cwd=cwd, timeout=timeout, env=env_with(**env))


def digests(debug_dir):
    """``{COMM_WORLD rank: sha256 of its final weights}`` written by LCLS_DL_DEBUG_WEIGHTS."""
    out = {}
    for name in os.listdir(debug_dir):
        with open(os.path.join(debug_dir, name)) as fh:
            d = json.load(fh)
        out[d["rank"]] = d["sha256"]
    return out


def model_json(out):
    with open(os.path.join(out, "model.json")) as fh:
        return json.load(fh)


def metrics(out):
    with open(os.path.join(out, "metrics.csv")) as fh:
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
                for r in csv.DictReader(fh)]


# -- time limit: SIGTERM / SIGUSR1 -> checkpoint mid-epoch, resume bitwise ---------------------
def _cfg(**kw):
    from lcls_dl.models.training import TrainConfig

    base = dict(epochs=3, batch_size=4, seed=2, blueprint=BLUEPRINT, patience=0,
                progress=False, val_fraction=0.3, lr=0.01, calibrate=False)
    base.update(kw)
    return TrainConfig(**base)


def _train_inproc(data, out, monkeypatch, debug, resume=False, signal_spec=None, cfg=None):
    from lcls_dl.distributed.signals import StopRequest
    from lcls_dl.models.training import run_training

    monkeypatch.setenv("LCLS_DL_DEBUG_WEIGHTS", str(debug))
    if signal_spec:
        monkeypatch.setenv("LCLS_DL_TEST_SIGNAL", signal_spec)
    else:
        monkeypatch.delenv("LCLS_DL_TEST_SIGNAL", raising=False)
    stop = StopRequest()
    try:
        return run_training(data["ds"], str(out), cfg or _cfg(), resume=resume, stop=stop)
    finally:
        stop.uninstall()


def test_stop_signals_checkpoint_mid_epoch_and_resume_bitwise(data, tmp_path, monkeypatch):
    """SIGTERM mid-epoch 1, then SIGUSR1 on the last step of epoch 2, then resume: same
    weights (bitwise) and the same history as an uninterrupted run of the same seed."""
    from lcls_dl.models.training import latest_checkpoint, load_checkpoint

    (tmp_path / "d_full").mkdir()
    (tmp_path / "d_int").mkdir()
    full = _train_inproc(data, tmp_path / "full", monkeypatch, tmp_path / "d_full")
    assert "interrupted" not in full
    # 52 training frames / batch 4 = 13 steps per epoch; the hook fires before step S
    res = _train_inproc(data, tmp_path / "int", monkeypatch, tmp_path / "d_int",
                        signal_spec="0:5:SIGTERM")
    assert res["interrupted"] == "SIGTERM" and (res["epoch"], res["step"]) == (0, 6)
    assert not (tmp_path / "int" / "model.json").exists()
    path = latest_checkpoint(str(tmp_path / "int"))
    assert path.endswith("epoch-0000-step-000006.npz") and path == res["checkpoint"]
    _, ovars, state = load_checkpoint(path)
    assert state["step"] == 6 and state["epoch"] == 0 and state["checkpoint_version"] == 2
    res = _train_inproc(data, tmp_path / "int", monkeypatch, tmp_path / "d_int", resume=True,
                        signal_spec="0:25:SIGUSR1")          # last step of epoch 2
    assert res["interrupted"] == "SIGUSR1" and (res["epoch"], res["step"]) == (1, 13)
    meta = _train_inproc(data, tmp_path / "int", monkeypatch, tmp_path / "d_int", resume=True)
    assert meta["training"]["resumed"] and meta["training"]["epochs_run"] == 3
    assert digests(tmp_path / "d_int") == digests(tmp_path / "d_full")
    assert metrics(tmp_path / "int") == metrics(tmp_path / "full")


def test_sigterm_cli_exits_0_and_prints_resume_command(data, tmp_path):
    proc = run(train_args(data, tmp_path / "m", epochs=3), tmp_path, timeout=60,
               LCLS_DL_TEST_SIGNAL="0:3:SIGTERM")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("resume with: ")]
    assert line.startswith("resume with: lcls-dl train ") and line.endswith(" --resume")
    assert "stopped by SIGTERM after epoch 0 + 4 steps" in proc.stdout
    assert sorted(os.listdir(tmp_path / "m" / "checkpoints")) == ["epoch-0000-step-000004.npz"]


# -- crash while writing a checkpoint ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_kill_during_checkpoint_write_keeps_last_good_one(data, tmp_path):
    from lcls_dl.models.training import latest_checkpoint, load_checkpoint

    out = tmp_path / "m"
    ckdir = out / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "lcls_dl", *train_args(data, out, epochs=3)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_with(
                                LCLS_DL_TEST_CHECKPOINT_SLEEP="epoch-0002.npz:60"))
    try:
        t0 = time.time()
        while not (ckdir / ".writing-epoch-0002.npz").exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() - t0 < 60, "the checkpoint write never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)             # inside the atomic write
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(ckdir)
    assert "epoch-0002.npz" not in names
    assert any(n.startswith(".epoch-0002.npz.") and n.endswith(".tmp") for n in names)
    assert latest_checkpoint(str(out)).endswith("epoch-0001.npz")
    _, _, state = load_checkpoint(latest_checkpoint(str(out)))   # intact
    assert state["epoch"] == 1
    proc = run(train_args(data, out, epochs=3, extra=["--resume"]), tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = model_json(out)
    assert meta["training"]["resumed"] and meta["training"]["epochs_run"] == 3
    assert [r["epoch"] for r in metrics(out)] == ["1", "2", "3"]


# -- bad states: one clear line, exit 1 ------------------------------------------------------
def _cli_inproc(args, capsys):
    from lcls_dl.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return exc.value.code, [ln for ln in err.splitlines() if ln.strip()]


def test_bad_resumes_one_line_exit_1(data, tmp_path, capsys, monkeypatch):
    from lcls_dl.models.training import latest_checkpoint, load_checkpoint, save_checkpoint

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    out = tmp_path / "m"
    code, _ = _cli_inproc(["-q", *train_args(data, out, epochs=1)], capsys)
    assert code == 0
    other = make_dataset(tmp_path / "other", n=72, shape=(8, 16), n_q=12, shard_size=24, seed=9)
    args = train_args(data, out, epochs=1, extra=["--resume"])
    cases = {
        "dataset": ([a if a != data["ds"] else other for a in args], "dataset_checksum"),
        "model": (args + ["--model", "dnn"], "option model was 'cnn+dnn'"),
    }
    for what, (argv, needle) in cases.items():
        code, lines = _cli_inproc(["-q", *argv], capsys)
        assert code == 1, what
        assert len(lines) == 1 and lines[0].startswith("lcls-dl: error: cannot resume"), lines
        assert needle in lines[0], (what, lines)
    # a checkpoint written by an incompatible version
    path = latest_checkpoint(str(out))
    mvars, ovars, state = load_checkpoint(path)
    import lcls_dl.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "CHECKPOINT_VERSION", 99)
    save_checkpoint(path, mvars, ovars, state)
    monkeypatch.undo()
    code, lines = _cli_inproc(["-q", *args], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "incompatible checkpoint version 99" in lines[0] and "epoch-0001.npz" in lines[0]
    assert not (out / "model.json").exists() or model_json(out)["training"]["epochs_run"] == 1


# -- dead ranks under ULFM --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_free(data):
    """A fault-free 3-rank run of the same seed (the reference for the kill tests)."""
    out, dbg = data["root"] / "free3", data["root"] / "dbg_free3"
    dbg.mkdir()
    proc = run(train_args(data, out, extra=["--np", "3"]), data["root"], timeout=90,
               LCLS_DL_DEBUG_WEIGHTS=dbg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_json(out)


def _killed_run(data, tmp_path, kill, n=3):
    out, dbg = tmp_path / "m", tmp_path / "dbg"
    dbg.mkdir()
    t0 = time.time()
    proc = run(train_args(data, out, extra=["--np", str(n)]), tmp_path, timeout=90,
               LCLS_DL_TEST_KILL=kill, LCLS_DL_DEBUG_WEIGHTS=dbg)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert time.time() - t0 < 90
    return proc, model_json(out), digests(dbg)


def _val_accuracy(meta):
    return meta["metrics"]["val"]["accuracy"]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_mpi
@pytest.mark.parametrize("kill,lost,size", [("1:5", [1], 2), ("0:6", [0], 2),
                                            ("1:4,2:31", [1, 2], 1)],
                         ids=["one-of-three", "rank-0", "two-at-different-times"])
def test_dead_ranks_survived_with_ulfm(data, tmp_path, fault_free, kill, lost, size):
    proc, meta, dig = _killed_run(data, tmp_path, kill)
    tr = meta["training"]
    assert tr["world_size"] == 3 and tr["final_world_size"] == size
    assert tr["lost_ranks"] == lost and tr["epochs_run"] == 5
    assert len(tr["recoveries"]) == len(lost)
    assert all(r["first_step_s"] > 0 for r in tr["recoveries"])
    log = proc.stdout + proc.stderr
    for r in lost:
        assert f"lost rank(s) [{r}]" in log
    assert f"world size now {size}" in log
    assert "from detection to the first step after the shrink" in log
    # the survivors end with the same weights; the model is complete and as good
    assert sorted(dig) == sorted(set(range(3)) - set(lost)) and len(set(dig.values())) == 1
    for name in ("model.keras", "metrics.csv", "curves.png"):
        assert (tmp_path / "m" / name).exists()
    assert abs(_val_accuracy(meta) - _val_accuracy(fault_free)) <= 0.01
    # the leader after the shrink reported (rank 0 of the survivors)
    (line,) = [ln for ln in proc.stdout.splitlines() if "model written to" in ln]
    assert line.startswith(f"[1,{min(set(range(3)) - set(lost))}]")


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_mpi
def test_rank_lost_with_an_update_pending(data, tmp_path, fault_free):
    """The training step applies its update at the start of the next step's call. A rank
    that dies after a reduction, before that update, is seen by the others in the stop
    check that follows: they must still apply the reduced update (every counted step is
    applied exactly once) and end with the same weights."""
    out, dbg = tmp_path / "m", tmp_path / "dbg"
    dbg.mkdir()
    proc = run(train_args(data, out, extra=["--np", "3"]), tmp_path, timeout=90,
               LCLS_DL_TEST_KILL_AFTER_REDUCE="1:5", LCLS_DL_DEBUG_WEIGHTS=dbg)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "kills itself after reducing step 5" in proc.stdout + proc.stderr
    tr = model_json(out)["training"]
    assert tr["lost_ranks"] == [1] and tr["final_world_size"] == 2 and tr["epochs_run"] == 5
    reports = [json.load(open(dbg / name)) for name in sorted(os.listdir(dbg))]
    assert sorted(r["rank"] for r in reports) == [0, 2]
    assert len({r["sha256"] for r in reports}) == 1
    for r in reports:
        assert r["iterations"] == r["updates_counted"], r
    assert abs(_val_accuracy(model_json(out)) - _val_accuracy(fault_free)) <= 0.01


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_mpi
def test_rank_lost_in_the_last_evaluation_is_recorded(data, tmp_path, fault_free):
    out, dbg = tmp_path / "m", tmp_path / "dbg"
    dbg.mkdir()
    proc = run(train_args(data, out, extra=["--np", "3"]), tmp_path, timeout=90,
               LCLS_DL_TEST_KILL_IN_EVAL="2:5", LCLS_DL_DEBUG_WEIGHTS=dbg)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    tr = model_json(out)["training"]
    assert tr["lost_ranks"] == [2] and tr["epochs_run"] == 5
    (rec,) = tr["recoveries"]                    # no training step came after the loss
    assert rec["lost"] == [2] and rec["first_step_s"] is None and rec["done_s"] > 0
    assert "after the last training step" in proc.stdout + proc.stderr
    assert sorted(digests(dbg)) == [0, 1] and len(set(digests(dbg).values())) == 1
    assert abs(_val_accuracy(model_json(out)) - _val_accuracy(fault_free)) <= 0.01


# -- no ULFM or too few ranks: restart from the last checkpoint -------------------------------
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_mpi
@pytest.mark.parametrize("extra", [["--no-fault-tolerance"], ["--min-ranks", "2"]],
                         ids=["no-ulfm", "too-few-ranks"])
def test_max_restarts_resumes_from_last_checkpoint(data, tmp_path, extra):
    out = tmp_path / "m"
    n = "2"
    proc = run(train_args(data, out, epochs=3, extra=["--np", n, "--max-restarts", "2",
                                                      *extra]),
               tmp_path, timeout=180, LCLS_DL_TEST_KILL="1:20",
               LCLS_DL_TEST_KILL_ONCE=tmp_path / "killed")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (tmp_path / "killed.1.20").exists()        # the kill happened, once
    assert "restart 1 of 2" in log and "restart 2 of 2" not in log
    meta = model_json(out)
    assert meta["training"]["resumed"] and meta["training"]["epochs_run"] == 3
    assert [r["epoch"] for r in metrics(out)] == ["1", "2", "3"]


# -- ingest: a rank killed mid-run, the same command again completes the dataset -------------
def _raw_run(root):
    import h5py

    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("a.h5", 7), ("b.h5", 5)):
        frames = rng.poisson(0.5, size=(n, 24, 24)).astype(np.float32)
        with h5py.File(raw / name, "w") as f:
            f.create_dataset("entry/frames", data=frames, chunks=(1, 24, 24))
    return raw


INGEST_FLAGS = ["--pixel-size-um", "400", "--distance-mm", "12", "--energy-ev", "9370",
                "--preprocess", "n_q=8", "--preprocess", "image_shape=[8,16]",
                "--shard-size", "2"]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(200)
@needs_mpi
def test_ingest_rank_killed_then_rerun_completes_exactly(tmp_path):
    from lcls_dl.dataset import Dataset

    raw = _raw_run(tmp_path)
    ref = run(["ingest", raw, "--out", tmp_path / "ref", *INGEST_FLAGS], tmp_path, timeout=90)
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = ["ingest", raw, "--out", tmp_path / "d", *INGEST_FLAGS, "--np", "2"]
    dead = run(args, tmp_path, timeout=90, LCLS_DL_TEST_INGEST_KILL="1",
               LCLS_DL_TEST_KILL_ONCE=tmp_path / "killed")
    assert dead.returncode != 0 and (tmp_path / "killed.ingest.1").exists()
    assert not (tmp_path / "d" / "manifest.json").exists()
    staged = [d for d in os.listdir(tmp_path) if "lcls-dl-staging" in d]
    assert len(staged) == 1                           # finished shards kept for the re-run
    again = run(args, tmp_path, timeout=90, LCLS_DL_TEST_KILL_ONCE=tmp_path / "killed")
    assert again.returncode == 0, again.stderr[-2000:]
    m_ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in m_ref["shards"]]
    assert m["n_frames"] == m_ref["n_frames"] == 12
    files = sorted(os.listdir(tmp_path / "d"))
    shards = [f for f in files if f.startswith("shard-") and f.endswith(".h5")]
    assert files == sorted(shards + ["manifest.json"])   # no partial or temporary file
    assert len(shards) == len(m["shards"]) == 6
    ids = Dataset(tmp_path / "d").ids
    assert len(ids) == len(set(ids)) == 12            # no duplicated, no missing frame
    assert not [d for d in os.listdir(tmp_path) if "lcls-dl-staging" in d]
    shutil.rmtree(tmp_path / "raw")
