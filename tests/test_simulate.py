"""Simulator: physics checks that can fail, photon statistics, CXI layout, determinism."""
import csv
import dataclasses
import json

import h5py
import numpy as np
import pytest

from lcls_dl.errors import InputError
from lcls_dl.ingest import geometry as G
from lcls_dl.simulate import (SimParams, Simulator, draw_shot, physics, render_frame,
                              sample_photons, simulate_run)

ICE_IH_Q = np.array([t[1] for t in physics.ICE_IH])


@pytest.fixture(scope="module")
def small():
    """A flat 384x384 detector, 0.7 mm pixels at 139 mm: q from 0 to ~3.9 1/A."""
    return G.flat((384, 384), 0.7e-3, 0.139, 9370.0)


def _shot(params, label, seed=0, **over):
    shot = draw_shot(params, np.random.default_rng([seed, 12345]))
    shot.update(label=label, **over)
    return shot


def _profile(g, image, dq=0.02, weights=None):
    """Azimuthal average of ``image`` corrected for polarization and solid angle."""
    corr = image / (g.polarization() * g.solid_angle())
    good = g.mask
    q = g.q_map()[good]
    bins = (q / dq).astype(int)
    total = np.bincount(bins, corr[good])
    count = np.bincount(bins)
    centres = (np.arange(len(total)) + 0.5) * dq
    ok = count > 20
    return centres[ok], total[ok] / count[ok]


@pytest.mark.parametrize("temp", [221.0, 240.0, 268.0])
def test_water_ring_peaks_at_configured_s1(small, temp):
    params = SimParams(seed=1)
    sim = Simulator(small, params)
    shot = _shot(params, "water", temperature_k=temp, hit_strength=60.0)
    photons, _, truth = sim.photons(np.random.default_rng([1, 7]), shot)
    q, prof = _profile(small, photons.astype(float))
    peak = q[(q > 1.0) & (q < 2.6)][np.argmax(prof[(q > 1.0) & (q < 2.6)])]
    assert truth["s1_q"] == pytest.approx(physics.s1_position(temp), abs=1e-4)
    assert abs(peak - truth["s1_q"]) < 0.05
    # a second, weaker ring near 3.05: a local maximum between 2.8 and 3.3
    hi = (q > 2.5) & (q < 3.4)
    assert 2.85 < q[hi][np.argmax(prof[hi])] < 3.25


@pytest.mark.parametrize("temp", [220.0, 223.0, 250.0, 290.0])
def test_water_profile_peak_is_the_fitted_s1(temp):
    q = np.linspace(0.5, 3.5, 30001)
    prof, p = physics.water_profile(q, temp)
    assert q[np.argmax(prof)] == pytest.approx(p["s1_q"], abs=0.002)
    assert prof.max() == pytest.approx(1.0, abs=1e-3)
    # f_O^2 pulls the observed peak below the structure-factor peak
    assert p["s_peak_q"] > p["s1_q"]
    s2 = (q > 2.8) & (q < 3.3)
    assert 2.9 < q[s2][np.argmax(prof[s2])] < 3.2


def test_s1_moves_down_on_supercooling(small):
    params = SimParams(seed=2)
    sim = Simulator(small, params)
    peaks = []
    for temp in (222.0, 268.0):
        shot = _shot(params, "water", temperature_k=temp, hit_strength=200.0)
        _, expected, _ = sim.photons(np.random.default_rng([2, 0]), shot)
        q, prof = _profile(small, expected.astype(float), dq=0.005)
        sel = (q > 1.0) & (q < 2.6)
        peaks.append(q[sel][np.argmax(prof[sel])])
    assert peaks[1] - peaks[0] > 0.08        # 1.86 at 222 K vs 1.99 at 268 K


def test_misses_have_no_ring_but_weak_water_does(small):
    params = SimParams(seed=3)
    sim = Simulator(small, params)
    miss, _, truth = sim.photons(np.random.default_rng([3, 1]),
                                 _shot(params, "miss", air_level=0.05))
    assert truth["hit_strength"] == 0.0
    q, prof = _profile(small, miss.astype(float), dq=0.1)
    ring = prof[(q > 1.8) & (q < 2.1)].mean()
    inside = prof[(q > 1.2) & (q < 1.5)].mean()
    assert ring < 1.05 * inside
    water, _, _ = sim.photons(np.random.default_rng([3, 1]),
                              _shot(params, "water", air_level=0.05, hit_strength=1.0))
    q, prof = _profile(small, water.astype(float), dq=0.1)
    assert prof[(q > 1.8) & (q < 2.1)].mean() > 1.3 * prof[(q > 1.2) & (q < 1.5)].mean()


def test_ice_spots_sit_at_ice_ih_q(small):
    params = SimParams(seed=4)
    sim = Simulator(small, params)
    base = dict(temperature_k=222.0, hit_strength=20.0, n_crystallites=25,
                ice_strength=300.0, ice_type="ih")
    ice, _, truth = sim.photons(np.random.default_rng([4, 2]), _shot(params, "ice", **base))
    _, water_only, _ = sim.photons(np.random.default_rng([4, 2]),
                                   _shot(params, "water", **base))
    assert truth["label"] == "ice" and truth["n_spots"] >= 10
    excess = ice - water_only
    noise = np.sqrt(water_only) + 1.0
    bright = excess > 10 * noise
    assert bright.sum() >= 10
    q = small.q_map()
    # pixel q resolution here is ~0.02 1/A and spots span a few pixels
    dist = np.abs(q[bright][:, None] - ICE_IH_Q[None, :]).min(axis=1)
    assert np.mean(dist < 0.06) > 0.95
    # excess per pixel is far larger inside the ice Ih windows than outside
    window = np.abs(q[..., None] - ICE_IH_Q).min(axis=-1) < 0.05
    assert excess[window].mean() > 10 * max(excess[~window].mean(), 1e-3)
    # a water frame drawn the same way has no such excess
    water, _, _ = sim.photons(np.random.default_rng([4, 3]), _shot(params, "water", **base))
    assert ((water - water_only) > 10 * noise).sum() < 3


def test_stacking_disordered_ice_uses_cubic_lines(small):
    params = SimParams(seed=5)
    sim = Simulator(small, params)
    base = dict(temperature_k=221.0, hit_strength=5.0, n_crystallites=30, ice_strength=300.0)
    ice, _, _ = sim.photons(np.random.default_rng([5, 0]),
                            _shot(params, "ice", ice_type="sd", **base))
    _, water_only, _ = sim.photons(np.random.default_rng([5, 0]),
                                   _shot(params, "water", **base))
    bright = (ice - water_only) > 10 * (np.sqrt(water_only) + 1)
    sd_q = np.array([t[1] for t in physics.ICE_SD])
    dist = np.abs(small.q_map()[bright][:, None] - sd_q[None, :]).min(axis=1)
    assert bright.sum() >= 10 and np.mean(dist < 0.06) > 0.95


@pytest.mark.parametrize("lam", [0.002, 0.3, 3.0, 40.0, 500.0])
def test_sample_photons_is_poisson(lam):
    rng = np.random.default_rng(11)
    n = 400_000
    k = sample_photons(np.full(n, lam, np.float32), rng)
    assert np.issubdtype(k.dtype, np.integer)
    se = np.sqrt(lam / n)
    assert abs(k.mean() - lam) < 5 * se + 1e-3 * lam
    assert k.var() == pytest.approx(lam, rel=0.03 + 5 * np.sqrt(2.0 / n) + 5 / (n * lam))
    assert np.mean(k == 0) == pytest.approx(np.exp(-lam), abs=5 * np.sqrt(np.exp(-lam) / n)
                                            + 1e-5)


def test_sample_photons_distribution_chi2():
    from scipy import stats

    rng = np.random.default_rng(12)
    k = sample_photons(np.full(200_000, 4.2, np.float32), rng)
    counts = np.bincount(k, minlength=16)[:16]
    expect = stats.poisson.pmf(np.arange(16), 4.2) * k.size
    chi2 = ((counts - expect) ** 2 / expect).sum()
    assert chi2 < stats.chi2.ppf(0.999, 15)


def test_frame_photons_have_poisson_variance(small):
    params = SimParams(seed=6)
    sim = Simulator(small, params)
    photons, expected, _ = sim.photons(np.random.default_rng([6, 0]),
                                       _shot(params, "water", hit_strength=30.0))
    assert photons.dtype.kind == "i"
    resid = (photons - expected).astype(float)
    assert resid.mean() == pytest.approx(0.0, abs=0.05)
    assert (resid ** 2).sum() / expected.sum() == pytest.approx(1.0, abs=0.03)


def test_adu_converts_back_to_photons(small):
    params = SimParams(seed=7)
    sim = Simulator(small, params)
    rng_a = np.random.default_rng([7, 3])
    shot = _shot(params, "water", hit_strength=20.0)
    photons, _, _ = sim.photons(np.random.default_rng([7, 3]), dict(shot))
    adu, _ = sim.frame(rng_a, dict(shot))
    assert adu.dtype == np.int16
    r = params.response
    back = (adu.astype(float) - r.pedestal) / r.gain
    good = sim.mask
    diff = back[good] - photons[good]
    # noise 0.15 photon rms plus per-panel common mode (0.3 rms, one panel here)
    assert np.std(diff) == pytest.approx(0.15, abs=0.03)
    assert np.mean(np.rint(back[good] - diff.mean()) == photons[good]) > 0.99
    hot, _, dead = sim.bad
    assert (adu.reshape(-1)[dead] == 0).all()
    assert not sim.mask.reshape(-1)[hot].any()


def test_render_frame_deterministic_per_rng(small):
    params = SimParams(seed=8)
    a, ta = render_frame(small, params, np.random.default_rng([8, 5]))
    b, tb = render_frame(small, params, np.random.default_rng([8, 5]))
    c, _ = render_frame(small, params, np.random.default_rng([8, 6]))
    np.testing.assert_array_equal(a, b)
    assert ta == tb
    assert not np.array_equal(a, c)


def test_class_mix_balanced_and_realistic():
    params = SimParams(mix={"water": 0.7, "ice": 0.3, "miss": 0.0})
    labels = [draw_shot(params, np.random.default_rng([0, i]))["label"] for i in range(1000)]
    assert labels.count("miss") == 0
    assert labels.count("water") / 1000 == pytest.approx(0.7, abs=0.05)
    cold = SimParams(temperature=221.0, hit_rate=0.5)
    shots = [draw_shot(cold, np.random.default_rng([1, i])) for i in range(2000)]
    hits = [s for s in shots if s["label"] != "miss"]
    assert len(hits) / 2000 == pytest.approx(0.5, abs=0.05)
    ice = sum(s["label"] == "ice" for s in hits) / len(hits)
    assert 0.65 < ice < 0.92          # 84 % at 221 K, smeared by +-0.5 K
    warm = SimParams(temperature=250.0, hit_rate=1.0)
    shots = [draw_shot(warm, np.random.default_rng([2, i])) for i in range(1000)]
    assert sum(s["label"] == "ice" for s in shots) <= 8
    for s in shots:
        assert 1.0 <= s["hit_strength"] <= 100.0


def test_bad_parameters_raise_input_error():
    with pytest.raises(InputError):
        SimParams(mix={"water": 1.0, "snow": 1.0})
    with pytest.raises(InputError):
        SimParams(ice_strength=(5.0, 1.0))
    with pytest.raises(InputError):
        SimParams(hit_rate=1.5)


def _read_run(out):
    frames, names = [], []
    with open(out / "truth.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for name in sorted({r["file"] for r in rows}):
        with h5py.File(out / name, "r") as f:
            frames.append(f["/entry_1/data_1/data"][()])
        names.append(name)
    return np.concatenate(frames), rows, names


def test_run_layout_and_determinism_across_file_splits(tmp_path, small):
    params = SimParams()
    tiny = G.flat((96, 128), 2e-3, 0.139, 9370.0)
    a = simulate_run(tmp_path / "a", 7, seed=21, params=params, frames_per_file=3,
                     geometry=tiny)
    simulate_run(tmp_path / "b", 7, seed=21, params=params, frames_per_file=7, geometry=tiny)
    simulate_run(tmp_path / "c", 7, seed=22, params=params, frames_per_file=7, geometry=tiny)
    assert a["files"] == ["run0001_000.cxi", "run0001_001.cxi", "run0001_002.cxi"]
    fa, ra, _ = _read_run(tmp_path / "a")
    fb, rb, _ = _read_run(tmp_path / "b")
    fc, _, _ = _read_run(tmp_path / "c")
    assert fa.shape == (7, 96, 128) and fa.dtype == np.int16
    assert fa.tobytes() == fb.tobytes()
    assert not np.array_equal(fa, fc)
    drop = ("file", "event")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rb]
    assert [(r["file"], r["event"]) for r in ra][3] == ("run0001_001.cxi", "0")
    # the file as a user opens it
    with h5py.File(tmp_path / "a" / "run0001_000.cxi", "r") as f:
        assert "cxi_version" in f
        link = f["entry_1/data_1"].get("data", getlink=True)
        assert isinstance(link, h5py.SoftLink)
        assert link.path == "/entry_1/instrument_1/detector_1/data"
        det = f["entry_1/instrument_1/detector_1"]
        data = det["data"]
        assert data.chunks == (1, 96, 128) and data.compression == "gzip"
        assert det["distance"][()] == pytest.approx(0.139)
        assert det["x_pixel_size"][()] == pytest.approx(2e-3)
        assert det["lcls_dl_adu_per_photon"][()] == pytest.approx(9.8)
        assert det["lcls_dl_pedestal"][()] == pytest.approx(100.0)
        assert det["mask"].shape == (96, 128)
        energy = f["entry_1/instrument_1/source_1/energy"][()]
        assert energy == pytest.approx(9370.0 * 1.602176634e-19)
        geo = G.DetectorGeometry.from_cxi(f, (96, 128))
    np.testing.assert_allclose(geo.q_map(), tiny.q_map())
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["seed"] == 21 and run["software"]["lcls_dl"]
    assert sum(run["class_counts"].values()) == 7
    with pytest.raises(InputError, match="not empty"):
        simulate_run(tmp_path / "a", 2, seed=1, params=params, geometry=tiny)
    simulate_run(tmp_path / "a", 2, seed=1, params=params, geometry=tiny, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.cxi")) == ["run0001_000.cxi"]


def test_full_cspad_frames(tmp_path):
    """Two real CSPAD frames through the whole writer; the water ring found on the slab."""
    params = SimParams(mix={"water": 1.0, "ice": 0.0, "miss": 0.0}, hit_strength=(30, 60))
    simulate_run(tmp_path / "run", 2, seed=3, params=params)
    with h5py.File(tmp_path / "run" / "run0001_000.cxi", "r") as f:
        frames = f["/entry_1/data_1/data"][()]
        g = G.DetectorGeometry.from_cxi(f, frames.shape[1:])
        gain = f["entry_1/instrument_1/detector_1/lcls_dl_adu_per_photon"][()]
        pedestal = f["entry_1/instrument_1/detector_1/lcls_dl_pedestal"][()]
    assert frames.shape == (2, 1480, 1552)
    assert g.name == "cspad-slab" and (~g.mask).sum() > 0
    with open(tmp_path / "run" / "truth.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for frame, row in zip(frames, rows):
        photons = (frame.astype(float) - pedestal) / gain
        q, prof = _profile(g, photons)
        sel = (q > 1.0) & (q < 2.6)
        assert abs(q[sel][np.argmax(prof[sel])] - float(row["s1_q"])) < 0.05


def test_params_round_trip():
    p = SimParams(seed=3, temperature=223.0)
    q = SimParams(**p.to_dict())
    assert dataclasses.asdict(q) == dataclasses.asdict(p)


def test_balanced_mode_water_temperature_is_no_class_proxy():
    params = SimParams(mix={"water": 0.5, "ice": 0.5, "miss": 0.0})
    shots = [draw_shot(params, np.random.default_rng([5, i])) for i in range(2000)]
    water = np.array([s["temperature_k"] for s in shots if s["label"] == "water"])
    ice = np.array([s["temperature_k"] for s in shots if s["label"] == "ice"])
    assert np.all((ice >= 220.0) & (ice <= 224.0))
    cold = (water >= 220.0) & (water <= 224.0)
    assert cold.mean() == pytest.approx(0.5, abs=0.05)  # half the water is as cold as ice
    assert water[~cold].min() >= 224.0 and water.max() <= 270.0
    assert min(s["ice_strength"] for s in shots if s["label"] == "ice") >= 20.0
    no_cold = SimParams(mix={"water": 1.0}, cold_water_fraction=0.0)
    t = [draw_shot(no_cold, np.random.default_rng([6, i]))["temperature_k"] for i in range(200)]
    assert min(t) >= 224.0
    with pytest.raises(InputError):
        SimParams(cold_water_fraction=1.5)
    with pytest.raises(InputError):
        SimParams(min_spot_snr=-1.0)


def test_ice_shots_record_at_least_one_spot():
    # a small detector (q <= ~2.4 1/A): most ice lines fall off it
    params = SimParams(seed=9)
    sim = Simulator(G.flat((160, 160), 0.7e-3, 0.139, 9370.0), params)
    for i in range(12):  # one crystallite: its 1-3 reflections often miss the detector
        shot = _shot(params, "ice", seed=i, n_crystallites=1, ice_strength=50.0, ice_type="ih",
                     hit_strength=5.0)
        _, _, truth = sim.photons(np.random.default_rng([9, i]), shot)
        assert truth["n_spots"] >= 1 and truth["max_spot_snr"] >= params.min_spot_snr
    _, _, water = sim.photons(np.random.default_rng([9, 99]), _shot(params, "water"))
    assert water["n_spots"] == 0 and water["max_spot_snr"] == 0
