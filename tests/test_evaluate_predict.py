"""Model directory round trip, evaluate and predict (CLI and library)."""
import csv
import json
import os
import sys
import types

import h5py
import numpy as np
import pytest

from helpers_data import make_dataset, synth_frames

from lcls_dl.errors import ConfigError, InputError

TINY = {"cnn": {"filters": [4, 8]}, "dnn": {"units": [8]}, "head": {"embedding": 8}}
SHAPE, NQ = (16, 32), 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lcls_dl.models.training import TrainConfig, run_training

    root = tmp_path_factory.mktemp("ep")
    data = make_dataset(root / "data", n=80, shape=SHAPE, n_q=NQ, seed=1, unlabeled=10)
    model_dir = str(root / "model")
    run_training(data, model_dir, TrainConfig(epochs=5, batch_size=16, seed=2, blueprint=TINY,
                                              progress=False, val_fraction=0.25))
    return data, model_dir


def run_cli(args, capsys):
    from lcls_dl.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["-q"] + [str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_model_dir_round_trip(trained):
    from lcls_dl.dataset import Dataset
    from lcls_dl.models.model_dir import embed, load_model_dir, predict_proba

    data, model_dir = trained
    model, meta = load_model_dir(model_dir)
    ds = Dataset(data)
    assert meta["classes"] == ds.classes
    assert meta["preprocessing"] == ds.preprocessing
    assert meta["q_edges"] == ds.preprocessing["q_edges"]
    assert meta["dataset"]["manifest_checksum"] == ds.checksum
    assert meta["seed"] == 2 and meta["software"]["tensorflow"]
    assert meta["split"]["counts"]["train"] + meta["split"]["counts"]["val"] == 70
    assert meta["temperature"] > 0 and meta["calibration"]["n"] == meta["split"]["counts"]["val"]
    arrays = ds.read(np.arange(20))
    p = predict_proba(model, meta, arrays)
    assert p.shape == (20, 2)
    np.testing.assert_allclose(p.sum(1), 1)
    model2, _ = load_model_dir(model_dir)
    np.testing.assert_allclose(predict_proba(model2, meta, arrays), p, rtol=1e-6)
    mc = predict_proba(model, meta, arrays, mc_dropout_passes=5, seed=3)
    assert mc.shape == (5, 20, 2) and mc.std(0).max() > 0
    np.testing.assert_allclose(predict_proba(model, meta, arrays, mc_dropout_passes=5, seed=3),
                               mc)
    assert embed(model, arrays).shape == (20, 8)


def test_load_model_dir_errors(tmp_path):
    from lcls_dl.models.model_dir import load_model_dir

    with pytest.raises(InputError, match="model directory not found"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no model.json"):
        load_model_dir(tmp_path / "empty")


def test_evaluate_cli_writes_metrics_and_plots(trained, tmp_path, capsys):
    data, model_dir = trained
    out = tmp_path / "ev"
    code, stdout, err = run_cli(["evaluate", model_dir, data, "--out", out, "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["n"] == 70 and set(rep["per_class"]) == {"water", "ice"}
    assert np.array(rep["confusion"]).sum() == 70
    on_disk = json.load(open(out / "metrics.json"))
    assert on_disk["accuracy"] == rep["accuracy"]
    for png in ("confusion.png", "roc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    code, stdout, _ = run_cli(["evaluate", model_dir, data, "--split", "val"], capsys)
    assert code == 0 and "precision" in stdout and "confusion" in stdout
    assert os.path.isfile(os.path.join(model_dir, "evaluation", "data-val", "metrics.json"))


def test_evaluate_refuses_other_preprocessing_and_unknown_label(trained, tmp_path, capsys):
    data, model_dir = trained
    other = make_dataset(tmp_path / "log1p", n=10, shape=SHAPE, n_q=NQ, transform="log1p")
    code, _, err = run_cli(["evaluate", model_dir, other], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("lcls-dl: error: preprocessing differs")
    assert "transform" in err
    three = make_dataset(tmp_path / "three", n=12, shape=SHAPE, n_q=NQ,
                         classes=("water", "ice", "miss"))
    code, _, err = run_cli(["evaluate", model_dir, three], capsys)
    assert code == 1 and "'miss' is not a class of the model" in err
    from lcls_dl.models.model_dir import check_preprocessing

    a = {"q_edges": [0.5, 1.0, 1.5], "n_q": 2}
    check_preprocessing(a, {"q_edges": [0.5, 1.0, 1.5], "n_q": 2})
    with pytest.raises(ConfigError, match="q_edges"):
        check_preprocessing(a, {"q_edges": [0.5, 1.1, 1.5], "n_q": 2})


def test_predict_dataset_csv_and_h5(trained, tmp_path, capsys):
    data, model_dir = trained
    second = make_dataset(tmp_path / "run2", n=10, shape=SHAPE, n_q=NQ, prefix="run0002", seed=9)
    out_csv = tmp_path / "pred.csv"
    code, stdout, err = run_cli(["predict", model_dir, data, second, "--out", out_csv], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 90
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("water", "ice")) - 1) < 1e-4
    assert {r["predicted"] for r in rows} <= {"water", "ice"}
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["run", "frames"]
    runs = {ln.split()[0]: int(ln.split()[1]) for ln in lines[1:]}
    assert runs == {"r0001": 80, "r0002": 10}
    ice_share = float(lines[1].split()[3].rstrip("%")) / 100
    expect = np.mean([r["predicted"] == "ice" for r in rows[:80]])
    assert ice_share == pytest.approx(expect, abs=0.001)
    out_h5 = tmp_path / "pred.h5"
    code, _, err = run_cli(["predict", model_dir, data, "--out", out_h5], capsys)
    assert code == 0, err
    with h5py.File(out_h5, "r") as f:
        assert f["probs"].shape == (80, 2)
        assert list(f.attrs["classes"]) == ["water", "ice"]
        ids = f["id"].asstr()[...]
    assert list(ids) == [r["id"] for r in rows[:80]]
    code, _, err = run_cli(["predict", model_dir, data, "--out", tmp_path / "p.txt"], capsys)
    assert code == 1 and "must end in .csv" in err


def test_predict_raw_files_through_ingest_pipeline(trained, tmp_path, capsys, monkeypatch):
    """Raw input goes through lcls_dl.ingest.pipeline.iter_preprocessed with the model's params."""
    data, model_dir = trained
    raw = tmp_path / "r0042_shots.cxi"
    raw.write_bytes(b"stand-in")
    seen = {}

    def iter_preprocessed(paths, preprocessing, **options):
        seen.update(paths=paths, preprocessing=preprocessing, options=options)
        image, profile, scalars = synth_frames([0, 1, 1], ["water", "ice"], SHAPE, NQ)
        yield {"image": image, "profile": profile, "scalars": scalars,
               "ids": [f"r0042_shots.cxi:{i}" for i in range(3)],
               "files": ["r0042_shots.cxi"] * 3, "events": [0, 1, 2]}

    fake = types.ModuleType("lcls_dl.ingest.pipeline")
    fake.iter_preprocessed = iter_preprocessed
    monkeypatch.setitem(sys.modules, "lcls_dl.ingest.pipeline", fake)
    out = tmp_path / "raw.csv"
    code, stdout, err = run_cli(["predict", model_dir, raw, "--out", out,
                                 "--reader-option", "dataset=/entry_1/data_1/data"], capsys)
    assert code == 0, err
    assert seen["options"] == {"dataset": "/entry_1/data_1/data"}
    assert seen["preprocessing"]["transform"] == "asinh"
    assert len(list(csv.DictReader(open(out)))) == 3
    assert "r0042" in stdout
