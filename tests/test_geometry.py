"""Detector geometry: q values, CSPAD layout, CXI / dict / PONI round trips."""
import json

import h5py
import numpy as np
import pytest

from lcls_dl.errors import InputError
from lcls_dl.ingest import geometry as G


def _q_at_radius(r_m, distance=0.139, energy_ev=9370.0):
    g = G.flat((3, 3), r_m, distance, energy_ev, beam_center=(1, 1))
    return g.q_map()[1, 2]


def test_q_matches_cxi25410_numbers():
    # DOMAIN.md: at 139 mm and 9.37 keV, q = 0.34 at r = 10 mm, 2.84 at 96.8 mm, 3.60 at 137 mm
    assert _q_at_radius(0.010) == pytest.approx(0.34, abs=0.005)
    assert _q_at_radius(0.0968) == pytest.approx(2.84, abs=0.01)
    assert _q_at_radius(0.137) == pytest.approx(3.60, abs=0.01)
    assert G.cspad().wavelength == pytest.approx(1.3232, abs=1e-3)


def _lab_pixels(g):
    x, y, _ = g.pixel_xyz()
    pix = np.linalg.norm(g.panels[0].fs_vec)
    return np.round(x / pix).astype(np.int64), np.round(y / pix).astype(np.int64)


def _no_overlap(ix, iy):
    """True when no two pixels land on the same lab pixel cell."""
    span = int(iy.max() - iy.min()) + 1
    cells = (ix - ix.min()).ravel() * span + (iy - iy.min()).ravel()
    return np.bincount(cells).max() == 1


def test_cspad_slab_layout():
    g = G.cspad()
    assert g.frame_shape == (1480, 1552)
    assert len(g.panels) == 64
    assert {(p.ss1 - p.ss0, p.fs1 - p.fs0) for p in g.panels} == {(185, 194)}
    for p in g.panels:
        assert np.linalg.norm(p.fs_vec) == pytest.approx(109.92e-6)
        assert np.linalg.norm(p.ss_vec) == pytest.approx(109.92e-6)
    # every stored pixel covered once, and no two pixels at the same lab position
    covered = np.zeros(g.frame_shape, int)
    for p in g.panels:
        covered[p.index()] += 1
    assert (covered == 1).all()
    ix, iy = _lab_pixels(g)
    assert _no_overlap(ix, iy)
    q = g.q_map()
    assert 0.2 < q.min() < 0.35 and 3.2 < q.max() < 3.7
    # central hole: nothing within 70 px of the beam on both axes
    assert not ((np.abs(ix) < 70) & (np.abs(iy) < 70)).any()


def test_cspad_asic_gap_of_three_pixels():
    g = G.cspad()
    p0, p1 = g.panels[0], g.panels[1]           # the two ASICs of module 0
    assert (p0.ss0, p0.fs1) == (p1.ss0, p1.fs0)
    step = np.array(p1.corner) - np.array(p0.corner)
    gap = np.linalg.norm(step) / 109.92e-6 - 194
    assert gap == pytest.approx(3.0)


def test_cspad_modules_match_slab():
    slab, mod = G.cspad(), G.cspad(layout="modules")
    assert mod.frame_shape == (32, 185, 388)
    qs, qm = slab.q_map(), mod.q_map()
    for quad in range(4):
        for sensor in range(8):
            m = quad * 8 + sensor
            block = qs[sensor * 185:(sensor + 1) * 185, quad * 388:(quad + 1) * 388]
            np.testing.assert_allclose(qm[m], block)


def test_maps_are_cached_and_read_only():
    g = G.epix10k2m()
    assert g.q_map() is g.q_map()
    assert g.polarization() is g.polarization()
    with pytest.raises(ValueError):
        g.q_map()[0, 0, 0] = 1.0


def test_solid_angle_and_polarization_flat():
    g = G.flat((101, 101), 1e-3, 0.1, 9370.0)
    tth = g.two_theta()
    np.testing.assert_allclose(g.solid_angle(), np.cos(tth) ** 3, rtol=1e-9)
    pol = g.polarization(0.99)
    assert pol[50, 50] == pytest.approx(1.0)
    # horizontal polarization: weaker along x (row 50, far column) than along y
    assert pol[50, 100] < pol[100, 50]
    assert pol[50, 100] == pytest.approx(
        0.5 * (1 + np.cos(tth[50, 100]) ** 2 - 0.98 * np.sin(tth[50, 100]) ** 2))


@pytest.mark.parametrize("builder,shape", [(G.jungfrau4m, (8, 512, 1024)),
                                           (G.epix10k2m, (16, 352, 384))])
def test_other_detectors(builder, shape):
    g = builder()
    assert g.frame_shape == shape
    ix, iy = _lab_pixels(g)
    assert _no_overlap(ix, iy)
    assert np.isfinite(g.q_map()).all()


def test_dict_round_trip_keeps_mask():
    g = G.cspad(layout="modules")
    mask = np.ones(g.frame_shape, bool)
    mask[3, 10, 20:25] = False
    mask[31, 184, 387] = False
    g = g.with_mask(mask)
    back = G.DetectorGeometry.from_dict(json.loads(json.dumps(g.to_dict())))
    assert back.frame_shape == g.frame_shape
    np.testing.assert_array_equal(back.mask, g.mask)
    np.testing.assert_allclose(back.q_map(), g.q_map())


def test_cxi_round_trip(tmp_path):
    g = G.cspad(distance=0.2, energy_ev=8000.0)
    mask = np.ones(g.frame_shape, bool)
    mask[100, 200] = False
    g = g.with_mask(mask)
    path = tmp_path / "g.cxi"
    with h5py.File(path, "w") as f:
        g.write_cxi(f.create_group("entry_1/instrument_1/detector_1"),
                    f.create_group("entry_1/instrument_1/source_1"))
    with h5py.File(path, "r") as f:
        det = f["entry_1/instrument_1/detector_1"]
        assert det["mask"][100, 200] != 0 and det["mask"][0, 0] == 0   # CXI: 0 = good
        assert f["entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8000 * 1.602e-19,
                                                                               rel=1e-3)
        back = G.DetectorGeometry.from_cxi(f, g.frame_shape)
    assert back.distance == pytest.approx(0.2) and back.energy_ev == pytest.approx(8000.0)
    np.testing.assert_array_equal(back.mask, g.mask)
    np.testing.assert_allclose(back.q_map(), g.q_map(), atol=1e-9)


def test_from_poni_matches_pyfai(tmp_path):
    pyFAI = pytest.importorskip("pyFAI")
    from pyFAI.geometry import Geometry

    poni = tmp_path / "det.poni"
    poni.write_text("# test\nponi_version: 2\n"
                    'Detector: Detector\nDetector_config: {"pixel1": 1e-4, "pixel2": 1.2e-4, '
                    '"max_shape": [60, 80]}\n'
                    "Distance: 0.15\nPoni1: 0.003\nPoni2: 0.004\n"
                    "Rot1: 0.05\nRot2: -0.03\nRot3: 0.2\nWavelength: 1.3e-10\n")
    g = G.from_poni(str(poni), (60, 80))
    ref = Geometry(dist=0.15, poni1=0.003, poni2=0.004, rot1=0.05, rot2=-0.03, rot3=0.2,
                   pixel1=1e-4, pixel2=1.2e-4, wavelength=1.3e-10)
    q_ref = ref.qArray((60, 80)) / 10.0      # nm^-1 -> 1/angstrom
    np.testing.assert_allclose(g.q_map(), q_ref, rtol=1e-6, atol=1e-9)
    assert g.wavelength == pytest.approx(1.3)
    del pyFAI


def test_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError):
        G.cspad(layout="ring")
    with pytest.raises(InputError):
        G.by_name("pilatus")
    with pytest.raises(InputError, match="cannot read"):
        G.from_poni(str(tmp_path / "missing.poni"), (10, 10))
    bad = tmp_path / "bad.poni"
    bad.write_text("Distance: 0.1\n")
    with pytest.raises(InputError):
        G.from_poni(str(bad), (10, 10))
