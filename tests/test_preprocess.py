"""FramePreprocessor: profile, polar image, peaks, scalars, transforms, errors."""
import json

import numpy as np
import pytest

from lcls_dl.errors import ConfigError, InputError
from lcls_dl.ingest import kernels as K
from lcls_dl.ingest.preprocess import SCALAR_NAMES, FramePreprocessor, PreprocessParams

try:
    K.get_kernels("c")
    BACKENDS = ["numpy", "c"]
except OSError:
    BACKENDS = ["numpy"]

WAVELENGTH = 1.3236  # angstrom (9.367 keV)


def flat_maps(shape=(120, 140), pixel=100e-6, distance=0.01, center=(55.3, 71.8)):
    """q (1/A) and phi (rad) of a flat detector normal to the beam; centre in pixels (ss, fs).

    A 3-D shape (modules, ny, nx) stacks the modules along ss.
    """
    ss, fs = np.indices(shape[-2:], dtype=np.float64)
    if len(shape) == 3:
        ss = ss[None] + shape[1] * np.arange(shape[0])[:, None, None]
        fs = np.broadcast_to(fs, shape)
    y = (ss - center[0]) * pixel
    x = (fs - center[1]) * pixel
    two_theta = np.arctan2(np.hypot(x, y), distance)
    q = 4 * np.pi * np.sin(two_theta / 2) / WAVELENGTH
    return q, np.arctan2(y, x)


def water_frame(q, rng, scale=20.0, dtype=np.float64):
    """Two diffuse water rings with Poisson noise, in photons."""
    mean = scale * (np.exp(-0.5 * ((q - 1.9) / 0.25) ** 2) + 0.7 * np.exp(-0.5 * ((q - 2.9) / 0.2) ** 2)) + 0.2
    return rng.poisson(mean).astype(dtype)


def params(**kw):
    base = dict(q_min=0.5, q_max=3.0, n_q=32, image_shape=(16, 32))
    base.update(kw)
    return PreprocessParams(**base)


def test_params_round_trip_and_validation():
    p = PreprocessParams(pedestal=12.5, image_shape=[64, 128], hot_pixel_photons=1e4)
    d = json.loads(json.dumps(p.to_dict()))
    d["scalar_names"] = list(SCALAR_NAMES)  # manifest extras are ignored
    assert PreprocessParams.from_dict(d) == p
    assert p.image_channels == 2 and p.image_array_shape == (64, 128, 2)
    del d["image_channels"]  # a block written before the max-SNR channel: 2-D image
    assert PreprocessParams.from_dict(d).image_array_shape == (64, 128)
    with pytest.raises(ConfigError):
        PreprocessParams(image_channels=3)
    edges = p.q_edges()
    assert edges.shape == (p.n_q + 1,) and edges[0] == p.q_min and edges[-1] == p.q_max
    with pytest.raises(ConfigError):
        PreprocessParams(n_q=100, image_shape=(64, 64))  # rows must divide n_q or vice versa
    with pytest.raises(ConfigError):
        PreprocessParams(transform="sqrt")
    with pytest.raises(ConfigError):
        PreprocessParams(q_min=2.0, q_max=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_frame_gives_constant_profile_and_image(backend):
    q, phi = flat_maps()
    mask = np.ones(q.shape, bool)
    mask[:, 100:104] = False  # a gap
    pre = FramePreprocessor(q, phi, mask, params(transform="none"), kernels=backend)
    out = pre(np.full(q.shape, 7, np.uint16))
    covered = pre._to_radial(pre.static_counts) > 0
    assert covered.sum() > 20
    np.testing.assert_allclose(out["profile"][covered], 7.0)
    assert np.all(out["profile"][~covered] == 0)
    rows = pre._static_covered.any(axis=1)
    np.testing.assert_allclose(out["image"][rows, :, 0], 7.0, rtol=1e-6)  # filled bins too
    np.testing.assert_allclose(out["image"][rows, :, 1], 0.0, atol=1e-6)  # no pixel stands out
    s = dict(zip(pre.scalar_names, out["scalars"]))
    assert s["n_peaks"] == 0 and s["lit_fraction"] == 1.0
    assert s["log10_total_photons"] == pytest.approx(np.log10(1 + 7.0 * pre.n_pixels_used), rel=1e-6)
    assert s["ring_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_pedestal_gain_and_dark_agree(backend):
    rng = np.random.default_rng(0)
    q, phi = flat_maps()
    photons = water_frame(q, rng)
    ref = FramePreprocessor(q, phi, None, params(), kernels=backend)(photons)
    adu = photons * 8.0 + 100.0
    for dtype in (np.uint16, np.int16, np.int32, np.float32, np.float64):
        pre = FramePreprocessor(q, phi, None, params(adu_per_photon=8.0, pedestal=100.0), kernels=backend)
        out = pre(adu.astype(dtype))
        for key in ("image", "profile", "scalars"):
            np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=f"{dtype} {key}")
    dark = rng.uniform(90, 110, q.shape)
    gain = rng.uniform(0.8, 1.2, q.shape)
    raw = photons * 8.0 * gain + 100.0 + dark
    pre = FramePreprocessor(q, phi, None, params(adu_per_photon=8.0, pedestal=100.0), dark=dark,
                            gain=gain, kernels=backend)
    out = pre(raw.astype(np.float32))
    np.testing.assert_allclose(out["profile"], ref["profile"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_intensity_transform_is_scale_invariant(backend):
    rng = np.random.default_rng(1)
    q, phi = flat_maps()
    frame = water_frame(q, rng)
    pre = FramePreprocessor(q, phi, None, params(), kernels=backend)
    weak, strong = pre(frame), pre(frame * 50)
    np.testing.assert_allclose(strong["image"][..., 0], weak["image"][..., 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(strong["profile"], weak["profile"], rtol=1e-5, atol=1e-6)
    # the max-SNR channel is not normalized away: 50x the photons is a more significant excess
    hi = weak["image"][..., 1] > 1.0
    assert hi.any() and np.all(strong["image"][..., 1][hi] > weak["image"][..., 1][hi])
    i = list(SCALAR_NAMES).index("log10_mean_photons")
    assert strong["scalars"][i] - weak["scalars"][i] == pytest.approx(np.log10(50), abs=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_pixels_raise_unless_masked(backend):
    q, phi = flat_maps()
    mask = np.ones(q.shape, bool)
    mask[0, 0] = False
    frame = np.ones(q.shape, np.float32)
    frame[0, 0] = np.nan
    pre = FramePreprocessor(q, phi, mask, params(q_min=0.0), kernels=backend)
    pre(frame)  # masked NaN is fine
    frame[60, 70] = np.inf
    frame[61, 70] = np.nan
    with pytest.raises(InputError, match="frame has 2 non-finite pixels") as err:
        pre(frame, where="run1.cxi:17")
    assert err.value.where == "run1.cxi:17"
    with pytest.raises(InputError, match="does not match"):
        pre(np.ones((10, 10)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hot_pixel_is_excluded(backend):
    q, phi = flat_maps()
    frame = np.full(q.shape, 3.0)
    pre = FramePreprocessor(q, phi, None, params(transform="none", hot_pixel_photons=1e3), kernels=backend)
    clean = pre(frame)
    frame[50, 80] = 1e6
    hot = pre(frame)
    np.testing.assert_allclose(hot["profile"], clean["profile"])
    np.testing.assert_allclose(hot["image"], clean["image"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaks_counted_on_water_rings(backend):
    rng = np.random.default_rng(2)
    q, phi = flat_maps(shape=(4, 100, 200), distance=0.02, center=(200, 100))  # 3-D module stack
    frame = water_frame(q, rng, scale=10.0)
    spots = [(0, 10, 20, 2, 3), (1, 30, 40, 4, 4), (2, 5, 100, 3, 2), (3, 50, 60, 2, 2), (3, 20, 120, 5, 5)]
    for m, y, x, h, w in spots:
        frame[m, y:y + h, x:x + w] += 200
    frame[2, 40, 40] += 400            # single hot-ish pixel: below peak_min_pixels
    frame[1, 0:20, 70:72] += 300       # 40 px streak: above peak_max_pixels
    p = params(q_min=0.0, q_max=4.0, n_q=8, image_shape=(8, 32), transform="none",
               peak_max_pixels=30)
    pre = FramePreprocessor(q, phi, None, p, kernels=backend)
    s = dict(zip(pre.scalar_names, pre(frame)["scalars"]))
    assert s["n_peaks"] == len(spots)
    expected = sum(200 * h * w for *_, h, w in spots)
    assert 10 ** s["log10_peak_photons"] == pytest.approx(expected, rel=0.1)
    assert s["log10_max_pixel"] >= np.log10(400)
    blank = dict(zip(pre.scalar_names, pre(water_frame(q, rng, scale=10.0))["scalars"]))
    assert blank["n_peaks"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_s1_peak_and_ring_ratio_follow_the_rings(backend):
    rng = np.random.default_rng(3)
    q, phi = flat_maps(shape=(200, 200), center=(100, 100))
    pre = FramePreprocessor(q, phi, None, params(n_q=64, image_shape=(32, 32)), kernels=backend)
    s = dict(zip(pre.scalar_names, pre(water_frame(q, rng, scale=100.0))["scalars"]))
    assert s["s1_peak_q"] == pytest.approx(1.9, abs=0.1)
    assert 0.5 < s["ring_ratio"] < 1.0


def test_panel_ids_split_peaks():
    q, phi = flat_maps()
    frame = water_frame(q, np.random.default_rng(7), scale=10.0)
    frame[10:12, 98:102] += 200  # 8 px straddling the panel boundary at fs=100
    panels = (np.arange(140) >= 100).astype(int)[None, :].repeat(120, axis=0)
    p = params(q_min=0.0, q_max=4.0, n_q=8, image_shape=(8, 32), peak_max_pixels=6)
    for backend in BACKENDS:
        whole = FramePreprocessor(q, phi, None, p, kernels=backend)(frame)["scalars"][0]
        split = FramePreprocessor(q, phi, None, p, panel_ids=panels, kernels=backend)(frame)["scalars"][0]
        assert (whole, split) == (0, 2)


@pytest.mark.skipif("c" not in BACKENDS, reason="lcls_dl._kernels not built")
def test_c_and_numpy_preprocessing_agree():
    rng = np.random.default_rng(4)
    q, phi = flat_maps(shape=(2, 80, 100))
    mask = rng.random(q.shape) > 0.05
    frames = np.stack([water_frame(q, rng, scale=s, dtype=np.uint16) for s in (0.5, 5, 50)])
    frames[:, 0, 30:33, 30:33] += 300
    p = params(hot_pixel_photons=5e3)
    a = FramePreprocessor(q, phi, mask, p, kernels="c").batch(frames)
    b = FramePreprocessor(q, phi, mask, p, kernels="numpy").batch(frames)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_batch_matches_single_frames_and_bin_maps():
    rng = np.random.default_rng(5)
    q, phi = flat_maps()
    frames = np.stack([water_frame(q, rng) for _ in range(3)])
    pre = FramePreprocessor(q, phi, None, params(n_q=16, image_shape=(32, 32)))
    out = pre.batch(frames)
    assert out["image"].shape == (3, 32, 32, 2) and out["profile"].shape == (3, 16)
    assert out["scalars"].shape == (3, len(pre.scalar_names))
    np.testing.assert_array_equal(out["profile"][1], pre(frames[1])["profile"])
    pb, ib = pre.profile_bin, pre.image_bin
    assert pb.shape == q.shape and pb.max() == 15 and ib.max() < 32 * 32 and ib.max() > 31 * 32
    assert np.all((pb < 0) == (ib < 0))
    inside = (q >= 0.5) & (q < 3.0)
    assert np.array_equal(pb >= 0, inside)


@pytest.mark.parametrize("method", ["histogram", "csr"])
def test_profile_matches_pyfai_integrate1d(method):
    pytest.importorskip("pyFAI")
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    rng = np.random.default_rng(6)
    pixel, distance, center = 100e-6, 0.01, (55.3, 71.8)
    q, phi = flat_maps(pixel=pixel, distance=distance, center=center)
    mask = rng.random(q.shape) > 0.03
    frame = water_frame(q, rng, scale=30.0, dtype=np.uint16)
    p = params(n_q=40, image_shape=(8, 32), transform="none")
    profile = FramePreprocessor(q, phi, mask, p).profile(frame)

    ai = AzimuthalIntegrator(dist=distance, poni1=(center[0] + 0.5) * pixel,
                             poni2=(center[1] + 0.5) * pixel, wavelength=WAVELENGTH * 1e-10,
                             detector=Detector(pixel, pixel, max_shape=q.shape))
    res = ai.integrate1d(frame, p.n_q, unit="q_A^-1", radial_range=(p.q_min, p.q_max),
                         mask=(~mask).astype(np.int8), correctSolidAngle=False,
                         polarization_factor=None, method=("no", method, "cython"))
    np.testing.assert_allclose(res.radial, p.q_centers(), atol=1e-6)
    ok = res.count > 0 if res.count is not None else res.intensity != 0
    assert ok.sum() > 30
    rel_l2 = np.linalg.norm(profile[ok] - res.intensity[ok]) / np.linalg.norm(res.intensity[ok])
    assert rel_l2 < 0.01, rel_l2


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_snr_channel_keeps_a_spot_the_mean_washes_out(backend):
    rng = np.random.default_rng(8)
    q, phi = flat_maps(shape=(240, 240), center=(120, 120))
    p = params(image_shape=(16, 32), transform="none", peak_max_pixels=30)
    pre = FramePreprocessor(q, phi, None, p, kernels=backend)
    ring = water_frame(q, rng, scale=20.0)
    spot = ring.copy()
    spot[80:83, 90:93] += 60  # 9 px spot, ~10 sigma of the ring's Poisson noise per pixel
    a, b = pre(ring), pre(spot)
    k = pre.image_bin[81, 91]
    r, c = divmod(int(k), 32)
    mean_gain = b["image"][r, c, 0] - a["image"][r, c, 0]
    assert mean_gain < 0.25 * 60  # averaged over the bin's pixels
    assert b["image"][r, c, 1] > a["image"][r, c, 1] + 1.5  # the spot's best pixel survives
    assert b["image"][r, c, 1] == b["image"][..., 1].max()
    # SNR channel is ~(v - mean_q) / sigma_q: check it against the profile-bin statistics
    pb = pre.profile_bin
    expect = -np.inf
    for y, xx in np.ndindex(3, 3):  # each spot pixel against its own q bin
        v = spot[pb == pb[80 + y, 90 + xx]]
        x = spot[80 + y, 90 + xx] - v.mean()
        expect = max(expect, x / np.sqrt(v.var() + x + p.snr_sigma_floor ** 2))
    assert b["image"][r, c, 1] == pytest.approx(expect, rel=1e-4)
    sa, sb = (dict(zip(pre.scalar_names, x["scalars"])) for x in (a, b))
    assert sb["log10_max_snr"] == pytest.approx(np.log10(1 + expect), rel=1e-4)
    assert sb["n_snr_bins"] >= 1 and sb["n_snr_bins"] > sa["n_snr_bins"]
    # legacy 1-channel image is channel 0
    one = FramePreprocessor(q, phi, None, params(image_shape=(16, 32), transform="none",
                                                 image_channels=1), kernels=backend)(spot)
    assert one["image"].shape == (16, 32) and one["scalars"].shape == (len(SCALAR_NAMES),)
    np.testing.assert_allclose(one["image"], b["image"][..., 0], rtol=1e-6)


@pytest.mark.parametrize("which", ["c", "numpy"])
def test_profile_is_the_mean_of_used_pixels_per_q_bin(which):
    """profile() (its own q-bin pass) = plain bincount mean over unmasked, non-hot pixels."""
    from lcls_dl.ingest import geometry as geom
    from lcls_dl.ingest.kernels import get_kernels

    geo = geom.epix10k2m()
    rng = np.random.default_rng(3)
    frame = rng.poisson(3.0, size=geo.frame_shape).astype(np.uint16)
    frame.flat[::997] = 60000  # hot pixels
    params = PreprocessParams(hot_pixel_photons=1000.0)
    pre = FramePreprocessor(geo.q_map(), geo.phi_map(), geo.mask, params,
                            kernels=get_kernels(which))
    prof = pre.profile(frame)
    b = pre.profile_bin.reshape(-1)
    x = frame.reshape(-1).astype(np.float64)
    use = (b >= 0) & (x <= 1000.0)
    s = np.bincount(b[use], weights=x[use], minlength=params.n_q)
    c = np.bincount(b[use], minlength=params.n_q)
    np.testing.assert_allclose(prof, np.divide(s, c, out=np.zeros_like(s), where=c > 0),
                               rtol=1e-12)
    assert (frame.reshape(-1)[b >= 0] == 60000).any()  # the hot pixels were in range


@pytest.mark.parametrize("backend", BACKENDS)
def test_panel_common_mode_removes_per_panel_offsets(backend):
    """ADU frame, 20 ADU/photon on a pedestal, 6 panels shifted by -9..8 ADU (< 0.5
    photon): with panel-median common mode the outputs are those of the unshifted frame."""
    rng = np.random.default_rng(21)
    q, phi = flat_maps(shape=(64, 96), center=(30.2, 47.6))
    panels = (np.arange(64)[:, None] // 32) * 3 + (np.arange(96)[None, :] // 32)  # 2 x 3
    mask = rng.random(q.shape) > 0.02
    photons = water_frame(q, rng, scale=0.8)  # mostly 0-photon pixels
    photons[5:8, 40:43] += 60  # a spot for the peak scalars
    raw = (100 + 20 * photons).astype(np.uint16)
    shift = np.array([-9, 7, 3, -4, 8, -6])
    shifted = (raw.astype(int) + shift[panels]).astype(np.uint16)
    base = dict(q_min=0.0, q_max=4.0, n_q=16, image_shape=(16, 32), adu_per_photon=20.0,
                pedestal=100.0, peak_min_snr=3.0, peak_min_pixels=2)
    cm = FramePreprocessor(q, phi, mask, params(common_mode="panel-median", **base),
                           panel_ids=panels, kernels=backend)
    plain = FramePreprocessor(q, phi, mask, params(**base), panel_ids=panels, kernels=backend)
    want = plain(raw)
    got, uncorrected = cm(shifted), plain(shifted)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(cm.profile(shifted), plain.profile(raw), rtol=1e-9, atol=1e-12)
    assert np.abs(uncorrected["profile"] - want["profile"]).max() > 0.05  # the shift matters
    assert want["scalars"][0] >= 1
    # the medians found are the shifts, in photons
    flat = shifted.reshape(-1)
    found = cm.kernels.common_mode(flat, cm._cm_panel, cm._cm_n, cm.offset, cm.scale, 0.5)
    np.testing.assert_allclose(found.median, shift / 20.0, atol=1e-12)
    # whole-ADU corrections of an integer frame: one offset per panel, no per-pixel array
    from lcls_dl.ingest.kernels import PanelOffset
    off = cm._frame_offset(flat)
    assert isinstance(off, PanelOffset)
    np.testing.assert_array_equal(off.values()[cm._cm_panel >= 0],
                                  100.0 + shift[panels.reshape(-1)][cm._cm_panel >= 0])


def test_common_mode_is_recorded_and_validated():
    p = params(common_mode="panel-median", common_mode_below=0.4)
    back = PreprocessParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert (back.common_mode, back.common_mode_below) == ("panel-median", 0.4)
    assert PreprocessParams.from_dict({}).common_mode == "none"  # older manifests
    with pytest.raises(ConfigError, match="common_mode"):
        params(common_mode="row-median")


@pytest.mark.parametrize("backend", BACKENDS)
def test_integral_dark_uses_integer_offsets_with_the_same_results(backend):
    """An integral dark frame on uint16 ADU frames goes to the kernels as int16 deltas
    (SplitOffset; the C kernels' integer path) and gives the outputs of the photon frame;
    a fractional dark stays float32 and matches the float computation."""
    rng = np.random.default_rng(31)
    q, phi = flat_maps()
    photons = np.round(water_frame(q, rng, scale=3.0))
    photons[40:43, 60:63] += 200  # a spot
    ref = FramePreprocessor(q, phi, None, params(adu_per_photon=8.0), kernels=backend)(
        (photons * 8.0).astype(np.uint16))
    dark = np.round(rng.normal(1500, 60, q.shape))
    raw = (photons * 8.0 + 100.0 + dark).astype(np.uint16)
    pre = FramePreprocessor(q, phi, None, params(adu_per_photon=8.0, pedestal=100.0), dark=dark,
                            kernels=backend)
    flat = raw.reshape(-1)
    assert isinstance(pre._frame_offset(flat), K.SplitOffset)
    assert not isinstance(pre._frame_offset(flat.astype(np.float32)), K.SplitOffset)
    out = pre(raw)
    for key in ("image", "profile", "scalars"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(pre.profile(raw), pre.profile(raw.astype(np.float64)), rtol=1e-9,
                               atol=1e-12)
    frac = FramePreprocessor(q, phi, None, params(adu_per_photon=8.0, pedestal=100.0),
                             dark=dark + 0.25, kernels=backend)
    assert not isinstance(frac._frame_offset(flat), K.SplitOffset)
    got = frac(raw)
    np.testing.assert_allclose(got["profile"], frac(raw.astype(np.float64))["profile"],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_panel_common_mode_with_integral_dark(backend):
    """Common mode on top of an integral dark: integer offsets (dark + panel shift), and
    the outputs of the unshifted frame."""
    rng = np.random.default_rng(32)
    q, phi = flat_maps(shape=(64, 96), center=(30.2, 47.6))
    panels = (np.arange(64)[:, None] // 32) * 3 + (np.arange(96)[None, :] // 32)
    photons = water_frame(q, rng, scale=0.8)
    dark = np.round(rng.normal(900, 30, q.shape))
    raw = (dark + 20 * photons).astype(np.uint16)
    shift = np.array([-9, 7, 3, -4, 8, -6])
    shifted = (raw.astype(int) + shift[panels]).astype(np.uint16)
    base = dict(q_min=0.0, q_max=4.0, n_q=16, image_shape=(16, 32), adu_per_photon=20.0,
                peak_min_snr=3.0, peak_min_pixels=2)
    cm = FramePreprocessor(q, phi, None, params(common_mode="panel-median", **base), dark=dark,
                           panel_ids=panels, kernels=backend)
    plain = FramePreprocessor(q, phi, None, params(**base), dark=dark, panel_ids=panels,
                              kernels=backend)
    off = cm._frame_offset(shifted.reshape(-1))
    assert isinstance(off, K.SplitOffset)
    np.testing.assert_array_equal(off.values(), (dark + shift[panels]).reshape(-1))
    want, got = plain(raw), cm(shifted)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
