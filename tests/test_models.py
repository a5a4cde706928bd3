"""Builders, blueprints, augmentation, splits, metrics, calibration."""
import json

import numpy as np
import pytest

from helpers_data import make_dataset

from lcls_dl.errors import ConfigError


# -- blueprints --------------------------------------------------------------------------------
def test_blueprint_validation_names_the_key(tmp_path):
    from lcls_dl.models.blueprint import DEFAULT, load_blueprint, validate_blueprint

    assert validate_blueprint(None) == DEFAULT
    with pytest.raises(ConfigError, match="cnn.filtres"):
        validate_blueprint({"cnn": {"filtres": [8]}})
    with pytest.raises(ConfigError, match="head.dropout"):
        validate_blueprint({"head": {"dropout": 1.5}})
    with pytest.raises(ConfigError, match="cnn.filters"):
        validate_blueprint({"cnn": {"filters": [8, -1]}})
    with pytest.raises(ConfigError, match="activation"):
        validate_blueprint({"activation": "sigmoidal"})
    bad = tmp_path / "bp.yaml"
    bad.write_text("cnn: [unclosed\n")
    with pytest.raises(ConfigError, match="unparsable blueprint"):
        load_blueprint(bad)
    good = tmp_path / "bp.json"
    good.write_text(json.dumps({"dnn": {"units": [5]}}))
    assert load_blueprint(good)["dnn"]["units"] == [5]


# -- builders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,inputs", [("cnn+dnn", ["image", "profile", "scalars"]),
                                         ("cnn", ["image"]), ("dnn", ["profile", "scalars"])])
def test_build_model_kinds(kind, inputs):
    from lcls_dl.models.builders import build_model, select_inputs, sub_model

    bp = {"cnn": {"filters": [4, 8]}, "dnn": {"units": [8]}, "head": {"embedding": 5}}
    m = build_model(kind, (16, 32), 24, 4, 3, blueprint=bp, seed=1)
    assert [t.name.split(":")[0] for t in m.inputs] == inputs
    rng = np.random.default_rng(0)
    x = {"image": rng.random((6, 16, 32)), "profile": rng.random((6, 24)),
         "scalars": rng.random((6, 4))}
    p = np.asarray(m(select_inputs(m, x)))
    assert p.shape == (6, 3)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert sub_model(m, "embedding")(select_inputs(m, x)).shape == (6, 5)
    # same seed -> same initial weights; another seed -> different
    m2 = build_model(kind, (16, 32), 24, 4, 3, blueprint=bp, seed=1)
    m3 = build_model(kind, (16, 32), 24, 4, 3, blueprint=bp, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), m2.get_weights()))
    assert any(not np.array_equal(a, b) for a, b in zip(m.get_weights(), m3.get_weights()))
    # dropout is active with training=True only (Monte-Carlo dropout)
    e1 = np.asarray(m(select_inputs(m, x), training=True))
    assert not np.allclose(e1, p)


def test_build_model_rejects_bad_kind_and_one_class():
    from lcls_dl.models.builders import build_model

    with pytest.raises(ConfigError, match="unknown model kind"):
        build_model("rnn", (8, 8), 8, 1, 2)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_model("dnn", None, 8, 1, 1)


# -- data --------------------------------------------------------------------------------------
def test_split_is_deterministic_and_order_independent():
    from lcls_dl.models.data import split_rows

    ids = np.array([f"run1.cxi:{i}" for i in range(2000)])
    labels = np.arange(2000) % 2
    labels[::10] = -1
    s = split_rows(ids, labels, seed=7, val_fraction=0.2, test_fraction=0.1)
    allrows = np.concatenate(list(s.values()))
    assert sorted(allrows.tolist()) == np.flatnonzero(labels >= 0).tolist()
    assert abs(len(s["val"]) / 1800 - 0.2) < 0.04 and abs(len(s["test"]) / 1800 - 0.1) < 0.03
    perm = np.random.default_rng(0).permutation(2000)
    s2 = split_rows(ids[perm], labels[perm], seed=7, val_fraction=0.2, test_fraction=0.1)
    assert set(ids[perm][s2["val"]]) == set(ids[s["val"]])
    s3 = split_rows(ids, labels, seed=8, val_fraction=0.2, test_fraction=0.1)
    assert set(ids[s3["val"]]) != set(ids[s["val"]])


def test_augmenter_respects_physics():
    from lcls_dl.models.data import Augmenter

    rng = np.random.default_rng(0)
    n, h, w = 8, 16, 32
    counts = rng.poisson(rng.uniform(0.01, 5.0, (n, 1, 1)), (n, h, w)).astype(np.float64) + 1e-3
    mean = counts.mean((1, 2))
    pre = {"transform": "asinh", "transform_scale": 1.0, "norm_floor": 0.05,
           "scalar_names": ["n_peaks", "log10_total_photons", "log10_mean_photons"]}
    norm = np.maximum(mean, 0.05)[:, None, None]
    batch = {"image": np.arcsinh(counts / norm).astype(np.float32),
             "profile": np.arcsinh(counts.mean(2) / norm[:, :, 0]).astype(np.float32),
             "scalars": np.stack([np.full(n, 3.0), np.log10(1 + counts.sum((1, 2))),
                                  np.log10(mean + 1e-4)], 1).astype(np.float32)}
    # geometry only: roll/flip along phi keep every q row's multiset of values
    geo = Augmenter(pre, scale_sigma=0, noise=0)
    out = geo(batch, np.random.default_rng(1))
    np.testing.assert_allclose(np.sort(out["image"], axis=2), np.sort(batch["image"], axis=2),
                               rtol=1e-5)
    assert not np.array_equal(out["image"], batch["image"])
    np.testing.assert_allclose(out["profile"], batch["profile"], rtol=1e-5)
    # intensity scaling = the same frame with a*photons, re-preprocessed the way ingest does
    scl = Augmenter(pre, scale_sigma=0.5, noise=0, roll=False, flip=False)
    out = scl(batch, np.random.default_rng(2))
    a = (10 ** out["scalars"][:, 2] - 1e-4) / mean
    assert a.std() > 0.05
    expect = np.arcsinh(a[:, None, None] * counts / np.maximum(a[:, None, None] * mean[:, None,
                                                                                       None], 0.05))
    np.testing.assert_allclose(out["image"], expect, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(10 ** out["scalars"][:, 1] - 1, a * counts.sum((1, 2)), rtol=1e-3)
    np.testing.assert_array_equal(out["scalars"][:, 0], batch["scalars"][:, 0])  # peak count
    bright = mean * a > 0.05
    np.testing.assert_allclose(out["image"][bright], batch["image"][bright], rtol=2e-3, atol=2e-3)
    # photon noise: std of half the Poisson noise of a bin (1 pixel per bin here)
    flat = np.full((4, 64, 64), 100.0)
    fb = {"image": np.arcsinh(flat / 100.0).astype(np.float32),
          "scalars": np.stack([np.zeros(4), np.log10(1 + flat.sum((1, 2))),
                               np.log10(np.full(4, 100.0) + 1e-4)], 1).astype(np.float32)}
    noisy = Augmenter(pre, scale_sigma=0, noise=0.5, roll=False, flip=False)
    d = np.sinh(noisy(fb, np.random.default_rng(3))["image"]) * 100.0 - 100.0
    assert 4.0 < d.std() < 6.0  # 0.5 * sqrt(100)
    # no photon scalars: geometry only, intensities untouched
    plain = Augmenter({"transform": "asinh", "scalar_names": ["n_peaks"]}, roll=False,
                      flip=False)
    out = plain({"image": batch["image"], "scalars": batch["scalars"][:, :1]},
                np.random.default_rng(4))
    np.testing.assert_array_equal(out["image"], batch["image"])


def test_iter_batches_streams_deterministically(tmp_path):
    from lcls_dl.dataset import Dataset
    from lcls_dl.models.data import Augmenter, iter_batches

    ds = Dataset(make_dataset(tmp_path / "d", n=50, shape=(8, 16), n_q=8, shard_size=15))
    rows = np.arange(3, 50)
    aug = Augmenter(ds.preprocessing)
    a = list(iter_batches(ds, rows, ds.labels[rows], 8, seed=1, epoch=2, augment=aug, block=16))
    b = list(iter_batches(ds, rows, ds.labels[rows], 8, seed=1, epoch=2, augment=aug, block=40))
    c = list(iter_batches(ds, rows, ds.labels[rows], 8, seed=1, epoch=3, augment=aug, block=16))
    assert [len(y) for _, y in a] == [8] * 5 + [7]
    for (xa, ya), (xb, yb) in zip(a, b):  # block size (memory) does not change the batches
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa["image"], xb["image"])
    assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    # wrapped to a longer length (a short MPI partition): same number of steps as the longest
    d = list(iter_batches(ds, rows[:10], ds.labels[rows[:10]], 8, length=24))
    assert [len(y) for _, y in d] == [8, 8, 8]


# -- metrics and calibration -------------------------------------------------------------------
def test_metrics_against_brute_force():
    from lcls_dl.models.metrics import classification_report, roc_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet([1, 1, 1], 300)
    p[np.arange(300), y] += 0.5
    p /= p.sum(1, keepdims=True)
    rep = classification_report(y, p, ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    cm = np.array(rep["confusion"])
    assert cm.sum() == 300 and np.trace(cm) == (p.argmax(1) == y).sum()
    pos, neg = p[y == 1, 1], p[y != 1, 1]
    mw = ((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    assert roc_auc(y == 1, p[:, 1]) == pytest.approx(mw)
    tp = cm[0, 0]
    assert rep["per_class"]["a"]["precision"] == pytest.approx(tp / cm[:, 0].sum())
    assert rep["per_class"]["a"]["recall"] == pytest.approx(tp / cm[0].sum())


def test_temperature_scaling_reduces_calibration_error():
    from lcls_dl.models.calibration import calibrate, softmax

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    true_logit = rng.normal(0, 2, 2000)
    p1 = 1 / (1 + np.exp(-true_logit))
    y = (rng.random(2000) < p1).astype(int)
    over = np.stack([np.zeros(2000), 3.0 * true_logit], 1)  # 3x over-confident
    res = calibrate(over, y)
    assert res["temperature"] == pytest.approx(3.0, rel=0.2)
    assert res["ece_after"] < 0.5 * res["ece_before"]
    assert (softmax(over, res["temperature"]).argmax(1) == over.argmax(1)).all()


def test_two_channel_image_model_and_per_channel_norm(tmp_path):
    from lcls_dl.models.builders import build_model, image_input_shape, select_inputs
    from lcls_dl.dataset import Dataset
    from lcls_dl.models.data import normalization_stats

    ds = Dataset(make_dataset(tmp_path / "d", n=20, shape=(8, 16, 2), n_q=8, shard_size=10))
    norm = normalization_stats(ds, np.arange(20), arrays=("image",))
    mean, std = norm["image"]
    assert mean.shape == std.shape == (2,)
    img = ds.read(np.arange(20), ("image",))["image"]
    np.testing.assert_allclose(mean, img.mean((0, 1, 2)), rtol=1e-5)
    assert image_input_shape((8, 16)) == (8, 16, 1)
    m = build_model("cnn", (8, 16, 2), 8, 0, 2, blueprint={"cnn": {"filters": [4]}}, seed=0,
                    norm=norm)
    assert tuple(m.inputs[0].shape[1:]) == (8, 16, 2)
    p = np.asarray(m(select_inputs(m, {"image": img})))
    assert p.shape == (20, 2) and np.all(np.isfinite(p))
    # the normalization layer standardizes each channel separately
    from lcls_dl.models.builders import sub_model
    z = np.asarray(sub_model(m, "image_norm")(img))
    np.testing.assert_allclose(z.mean((0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std((0, 1, 2)), 1.0, rtol=1e-3)


def test_augmenter_two_channels_roll_together_and_snr_scales_with_sqrt():
    from lcls_dl.models.data import Augmenter

    rng = np.random.default_rng(0)
    n, h, w = 6, 8, 16
    counts = rng.poisson(3.0, (n, h, w)).astype(np.float64) + 1e-3
    snr = rng.uniform(-1, 20, (n, h, w))
    mean = counts.mean((1, 2))
    pre = {"transform": "asinh", "transform_scale": 1.0, "norm_floor": 0.05,
           "scalar_names": ["log10_total_photons", "log10_mean_photons"]}
    img = np.stack([np.arcsinh(counts / mean[:, None, None]), np.arcsinh(snr)], -1)
    batch = {"image": img.astype(np.float32),
             "scalars": np.stack([np.log10(1 + counts.sum((1, 2))), np.log10(mean + 1e-4)],
                                 1).astype(np.float32)}
    out = Augmenter(pre, scale_sigma=0, noise=0)(batch, np.random.default_rng(1))
    # roll/flip move both channels with the same permutation of phi columns
    o = out["image"]
    for i in range(n):
        for j in range(w):
            src = [k for k in range(w) if np.array_equal(batch["image"][i, :, k, 0], o[i, :, j, 0])]
            assert any(np.array_equal(batch["image"][i, :, k, 1], o[i, :, j, 1]) for k in src)
    out = Augmenter(pre, scale_sigma=0.5, noise=0, roll=False, flip=False)(
        batch, np.random.default_rng(2))
    a = (10 ** out["scalars"][:, 1] - 1e-4) / mean
    assert a.std() > 0.05
    np.testing.assert_allclose(np.sinh(out["image"][..., 1]),
                               snr * np.sqrt(a)[:, None, None], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["image"][..., 0], batch["image"][..., 0], rtol=2e-3, atol=2e-3)
