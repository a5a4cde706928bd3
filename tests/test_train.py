"""Training loop: resume == uninterrupted, checkpoints, bad input, N classes."""
import csv
import json
import os

import numpy as np
import pytest

from helpers_data import make_dataset

from lcls_dl.errors import ConfigError, InputError

TINY = {"cnn": {"filters": [4, 8]}, "dnn": {"units": [8]}, "head": {"embedding": 8,
                                                                     "dropout": 0.2}}


def cfg(**kw):
    from lcls_dl.models.training import TrainConfig

    base = dict(epochs=3, batch_size=16, seed=3, blueprint=TINY, patience=0, progress=False,
                val_fraction=0.25)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=64, shape=(16, 32), n_q=24,
                        shard_size=20)


def weights(model_dir):
    from lcls_dl.models.model_dir import load_model_dir

    model, _ = load_model_dir(model_dir)
    return [np.asarray(w) for w in model.get_weights()]


def history(model_dir):
    with open(os.path.join(model_dir, "metrics.csv")) as fh:
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
                for r in csv.DictReader(fh)]


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_gives_same_weights_as_uninterrupted(ds, tmp_path):
    from lcls_dl.models.training import latest_checkpoint, run_training

    full = str(tmp_path / "full")
    run_training(ds, full, cfg(epochs=4))

    part = str(tmp_path / "part")

    def stop_after_2(epoch, logs, model):
        if epoch == 2:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_training(ds, part, cfg(epochs=4), callbacks=[stop_after_2])
    assert latest_checkpoint(part).endswith("epoch-0002.npz")
    assert not os.path.exists(os.path.join(part, "model.json"))
    meta = run_training(ds, part, cfg(epochs=4), resume=True)
    assert meta["training"]["epochs_run"] == 4 and meta["training"]["resumed"]
    a, b = weights(full), weights(part)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert history(full) == history(part)
    # a different seed really gives different weights (the comparison above can fail)
    other = str(tmp_path / "other")
    run_training(ds, other, cfg(epochs=4, seed=4))
    assert any(not np.array_equal(x, y) for x, y in zip(a, weights(other)))


def test_checkpoints_kept_and_best(ds, tmp_path):
    from lcls_dl.models.training import load_checkpoint, run_training

    out = str(tmp_path / "m")
    meta = run_training(ds, out, cfg(epochs=4, keep=2))
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["best.npz", "epoch-0003.npz", "epoch-0004.npz"]
    _, opt_vars, state = load_checkpoint(os.path.join(out, "checkpoints", "epoch-0004.npz"))
    assert state["epoch"] == 4 and state["config_hash"] == meta["training"]["config_hash"]
    assert int(opt_vars[0]) > 0  # the optimizer's iteration counter is saved
    for name in ("model.keras", "model.json", "metrics.csv", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "logs")))
    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert meta["training"]["best_epoch"] == int(np.argmin([float(r["val_loss"])
                                                            for r in rows])) + 1


def test_resume_refuses_corrupted_checkpoint_and_other_config(ds, tmp_path):
    from lcls_dl.models.training import latest_checkpoint, run_training

    out = str(tmp_path / "m")
    run_training(ds, out, cfg(epochs=2))
    with pytest.raises(ConfigError, match="lr"):
        run_training(ds, out, cfg(epochs=2, lr=0.01), resume=True)
    path = latest_checkpoint(out)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(InputError, match="corrupted or truncated checkpoint"):
        run_training(ds, out, cfg(epochs=2), resume=True)


def test_bad_inputs(tmp_path):
    from lcls_dl.models.training import run_training

    unl = make_dataset(tmp_path / "unl", n=12, shape=(8, 16), n_q=8, labels=[-1] * 12)
    with pytest.raises(InputError, match="no labeled frames"):
        run_training(unl, str(tmp_path / "m1"), cfg())
    one = make_dataset(tmp_path / "one", n=12, shape=(8, 16), n_q=8, labels=[1] * 10 + [-1] * 2)
    with pytest.raises(InputError, match="only one class.*ice"):
        run_training(one, str(tmp_path / "m2"), cfg())
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "notes.txt").write_text("mine")
    ok = make_dataset(tmp_path / "ok", n=12, shape=(8, 16), n_q=8)
    with pytest.raises(InputError, match="model directory exists"):
        run_training(ok, str(exists), cfg())
    with pytest.raises(InputError, match="not an lcls-dl model directory"):
        run_training(ok, str(exists), cfg(), overwrite=True)
    assert (exists / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="nothing to resume"):
        run_training(ok, str(tmp_path / "fresh"), cfg(), resume=True)


def test_cli_bad_input_one_line(tmp_path, capsys):
    from lcls_dl.cli.main import main

    unl = make_dataset(tmp_path / "unl", n=6, shape=(8, 16), n_q=8, labels=[-1] * 6)
    with pytest.raises(SystemExit) as exc:
        main(["-q", "train", unl, "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lcls-dl: error: no labeled frames")


@pytest.mark.slow
def test_cli_train_three_classes_and_overwrite(tmp_path, capsys):
    from lcls_dl.cli.main import main

    data = make_dataset(tmp_path / "d3", n=45, classes=("water", "ice", "miss"), shape=(8, 16),
                        n_q=12)
    bp = tmp_path / "bp.yaml"
    bp.write_text("cnn: {filters: [4]}\ndnn: {units: [8]}\nhead: {embedding: 6, dropout: 0.1}\n")
    out = str(tmp_path / "m")
    args = ["-q", "train", data, "--out", out, "--epochs", "2", "--batch-size", "8",
            "--blueprint", str(bp), "--test-fraction", "0.2"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err
    meta = json.load(open(os.path.join(out, "model.json")))
    assert meta["classes"] == ["water", "ice", "miss"]
    assert meta["blueprint"]["head"]["embedding"] == 6
    assert sum(meta["split"]["counts"].values()) == 45
    assert "test" in meta["metrics"] and len(meta["metrics"]["test"]["confusion"]) == 3
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(args + ["--overwrite"])
    assert exc.value.code == 0


def test_learns_synthetic_classes(tmp_path):
    """The default cnn+dnn topology separates the synthetic water/ice frames."""
    from lcls_dl.models.training import TrainConfig, run_training

    data = make_dataset(tmp_path / "d", n=120, shape=(16, 32), n_q=24, seed=5)
    meta = run_training(data, str(tmp_path / "m"),
                        TrainConfig(epochs=6, batch_size=16, seed=0, progress=False,
                                    val_fraction=0.3))
    assert meta["metrics"]["val"]["accuracy"] >= 0.9
    cal = meta["calibration"]
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9 or cal["nll_after"] <= cal["nll_before"]
