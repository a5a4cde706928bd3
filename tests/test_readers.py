"""Each reader on a small file the test writes (4 frames of 32x40 unless said otherwise)."""
import os

import h5py
import numpy as np
import pytest

from lcls_dl.errors import InputError
from lcls_dl.ingest import geometry as geom
from lcls_dl.ingest.readers import detect_format, expand_inputs, open_source
from lcls_dl.ingest.readers.cxi import asics_to_modules

N, SS, FS = 4, 32, 40


def frames(n=N, shape=(SS, FS), seed=0):
    return np.random.default_rng(seed).poisson(3.0, (n,) + shape).astype(np.float32)


def write_cxi(path, data, geometry=None, energy_j=9370 * 1.602176634e-19, lcls=None,
              npeaks=None):
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 150
        det = f.create_group("entry_1/instrument_1/detector_1")
        det["data"] = data
        f["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        src = f.create_group("entry_1/instrument_1/source_1")
        if geometry is not None:
            geometry.write_cxi(det, src)
        else:
            src["energy"] = energy_j
        if npeaks is not None:
            f["entry_1/result_1/nPeaks"] = npeaks
        for k, v in (lcls or {}).items():
            f[f"LCLS/{k}"] = v


def test_cxi_flat_roundtrip_geometry_and_chunks(tmp_path):
    g = geom.flat((SS, FS), 100e-6, 0.05, 9370.0, beam_center=(10.0, 20.0))
    data = frames()
    p = tmp_path / "run.cxi"
    write_cxi(p, data, g, npeaks=np.arange(N))
    assert detect_format(str(p)) == "cxi"
    with open_source(str(p)) as src:
        assert (src.reader, src.n_frames, src.frame_shape) == ("cxi", N, (SS, FS))
        np.testing.assert_array_equal(src.read(1, 3), data[1:3])
        np.testing.assert_array_equal(src.events, np.arange(N))
        np.testing.assert_array_equal(src.extra["nPeaks"], np.arange(N))
        np.testing.assert_allclose(src.geometry.q_map(), g.q_map(), rtol=1e-9)
        assert src.geometry.energy_ev == pytest.approx(9370.0)


def test_cxi_psocake_asic_stack_without_geometry_gets_cspad(tmp_path):
    data = np.zeros((2, 64, 185, 194), np.uint16)
    data[:, 1, 0, 0] = 7          # ASIC 1 = right half of 2x1 sensor 0
    p = tmp_path / "r0001.cxi"
    write_cxi(p, data, lcls={"photon_energy_eV": np.array([9400.0, 9400.0]),
                             "eventNumber": np.array([11, 12])},
              npeaks=np.array([0, 30]))
    with h5py.File(p, "a") as f:
        del f["entry_1/instrument_1/source_1/energy"]
    with open_source(str(p)) as src:
        assert src.frame_shape == (32, 185, 388)
        chunk = src.read(0, 2)
        assert chunk.shape == (2, 32, 185, 388) and chunk[0, 0, 0, 194] == 7
        assert src.geometry.frame_shape == (32, 185, 388)
        assert src.geometry.energy_ev == pytest.approx(9400.0)
        np.testing.assert_array_equal(src.extra["eventNumber"], [11, 12])


def test_asics_to_modules_places_pairs_side_by_side():
    x = np.arange(64 * 185 * 194).reshape(1, 64, 185, 194)
    m = asics_to_modules(x)
    np.testing.assert_array_equal(m[0, 3, :, :194], x[0, 6])
    np.testing.assert_array_equal(m[0, 3, :, 194:], x[0, 7])


@pytest.mark.parametrize("compression", ["bitshuffle", "blosc"])
def test_nexus_external_links_compressed_units(tmp_path, compression):
    import hdf5plugin

    comp = hdf5plugin.Bitshuffle() if compression == "bitshuffle" else hdf5plugin.Blosc()
    data = frames(5).astype(np.uint16)
    for i, (a, b) in enumerate(((0, 3), (3, 5)), start=1):
        with h5py.File(tmp_path / f"x_data_{i:06d}.h5", "w") as f:
            f.create_dataset("entry/data/data", data=data[a:b], chunks=(1, SS, FS), **comp)
    m = tmp_path / "x_master.h5"
    with h5py.File(m, "w") as f:
        for i in (1, 2):
            f[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(f"x_data_{i:06d}.h5",
                                                               "/entry/data/data")
        d = f.create_group("entry/instrument/detector")
        for key, value, unit in (("x_pixel_size", 75.0, "um"), ("y_pixel_size", 0.075, "mm"),
                                 ("detector_distance", 120.0, "mm"),
                                 ("beam_center_x", 20.0, "pixel"),
                                 ("beam_center_y", 0.9e-3, "m")):
            d[key] = value
            d[key].attrs["units"] = unit
        pm = np.zeros((SS, FS), np.uint32)
        pm[0, 0] = 1
        d["pixel_mask"] = pm
        f["entry/instrument/beam/incident_wavelength"] = 1.0
        f["entry/instrument/beam/incident_wavelength"].attrs["units"] = "angstrom"
    names = [n for _, n in expand_inputs([str(tmp_path)])]
    assert names == ["x_master.h5"]          # data files belong to the master
    with open_source(str(m)) as src:
        assert src.reader == "nexus" and src.n_frames == 5
        np.testing.assert_array_equal(src.read(2, 5), data[2:5])   # spans both files
        g = src.geometry
        ref = geom.flat((SS, FS), 75e-6, 0.12, 12398.419843320026, beam_center=(12.0, 20.0))
        np.testing.assert_allclose(g.q_map(), ref.q_map(), rtol=1e-9)
        assert not g.mask[0, 0] and g.mask[1, 1]


def test_nexus_data_files_of_different_dtypes_read_without_overflow(tmp_path):
    """A run continued at a higher bit depth: uint16 then uint32 data files."""
    first = frames(2).astype(np.uint16)
    second = frames(2).astype(np.uint32) + 70000          # does not fit in uint16
    for i, part in enumerate((first, second), start=1):
        with h5py.File(tmp_path / f"z_data_{i:06d}.h5", "w") as f:
            f["entry/data/data"] = part
    m = tmp_path / "z_master.h5"
    with h5py.File(m, "w") as f:
        for i in (1, 2):
            f[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(f"z_data_{i:06d}.h5",
                                                               "/entry/data/data")
    with open_source(str(m), pixel_size_um=75.0, distance_mm=120.0, energy_ev=9500.0) as src:
        assert src.dtype == np.uint32
        got = src.read(0, 4)
        np.testing.assert_array_equal(got, np.concatenate([first.astype(np.uint32), second]))
        buf = np.empty((3, SS, FS), np.uint32)                 # a reused read buffer
        assert src.read(1, 4, out=buf) is buf
        np.testing.assert_array_equal(buf, got[1:4])


def test_nexus_missing_link_target_is_input_error(tmp_path):
    m = tmp_path / "y_master.h5"
    with h5py.File(m, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink("y_data_000001.h5", "/entry/data/data")
        f.create_group("entry/instrument/detector")
    with pytest.raises(InputError, match="external link target"):
        open_source(str(m))


def test_plain_largest_3d_flags_mask_and_errors(tmp_path):
    data = frames()
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["small"] = np.zeros((2, 3, 3))
        f["a/b/frames"] = data
        f["meta"] = np.arange(4)
    mask = np.ones((SS, FS), bool)
    mask[5, 5] = False
    np.save(tmp_path / "mask.npy", mask)
    opts = dict(pixel_size_um=100.0, distance_mm=50.0, energy_ev=9370.0, beam_center=(10, 20))
    with open_source(str(p), mask=str(tmp_path / "mask.npy"), **opts) as src:
        assert src.reader == "plain"
        np.testing.assert_array_equal(src.read(0, 4), data)
        ref = geom.flat((SS, FS), 100e-6, 0.05, 9370.0, beam_center=(10.0, 20.0))
        np.testing.assert_allclose(src.geometry.q_map(), ref.q_map())
        assert not src.geometry.mask[5, 5] and src.geometry.mask.sum() == SS * FS - 1
    np.save(tmp_path / "bad_mask.npy", np.ones((SS, FS + 1), bool))
    with pytest.raises(InputError, match="mask shape"):
        open_source(str(p), mask=str(tmp_path / "bad_mask.npy"), **opts)
    with pytest.raises(InputError, match="no dataset /nope"):
        open_source(str(p), dataset="/nope", **opts)
    with h5py.File(tmp_path / "twod.h5", "w") as f:
        f["image"] = np.zeros((SS, FS))
    with pytest.raises(InputError, match="2-D"):
        open_source(str(tmp_path / "twod.h5"), dataset="image", **opts)
    with pytest.raises(InputError, match="no 3-D"):
        open_source(str(tmp_path / "twod.h5"), **opts)


def test_plain_poni_geometry(tmp_path):
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:
        f["data"] = frames()
    poni = tmp_path / "g.poni"
    poni.write_text("Distance: 0.1\nPoni1: 0.002\nPoni2: 0.003\nRot1: 0\nRot2: 0\nRot3: 0\n"
                    "Wavelength: 1.3e-10\nDetector_config: {\"pixel1\": 1e-4, \"pixel2\": 1e-4}\n")
    with open_source(str(p), format="plain", poni=str(poni)) as src:
        q = src.geometry.q_map()
        assert q.shape == (SS, FS)
        ss, fs = np.unravel_index(np.argmin(q), q.shape)
        assert (ss, fs) in {(19, 29), (19, 30), (20, 29), (20, 30)}   # poni / pixel size


def test_cheetah_classic_raw_slab_and_assembled(tmp_path):
    raw = np.random.default_rng(1).integers(0, 50, (1480, 1552)).astype(np.int16)
    p = tmp_path / "LCLS_2011_Feb28_r0139_163412_1a3f_cspad.h5"
    with h5py.File(p, "w") as f:
        f["data/rawdata"] = raw
        f["data/data"] = np.zeros((100, 100), np.float32)
        f["LCLS/photon_energy_eV"] = [9367.0]
        f["LCLS/detectorPosition"] = [139.0]
    assert detect_format(str(p)) == "cheetah"
    with open_source(str(p)) as src:
        assert src.n_frames == 1 and src.frame_shape == (1480, 1552)
        np.testing.assert_array_equal(src.read(0, 1)[0], raw)
        assert src.geometry.distance == pytest.approx(0.139)
        assert src.geometry.energy_ev == pytest.approx(9367.0)
    q = tmp_path / "assembled.h5"
    with h5py.File(q, "w") as f:
        f["data/data"] = np.ones((SS, FS), np.float32)
        f["LCLS/photon_energy_eV"] = 9367.0
        f["LCLS/detectorPosition"] = 139.0
    with open_source(str(q), pixel_size_um=110.0) as src:
        assert src.read(0, 1).shape == (1, SS, FS)
        assert src.geometry.distance == pytest.approx(0.139)
    with open_source(str(q)) as src:      # assembled image, no pixel size: no geometry
        assert src.geometry is None


def test_smalldata_and_ml_layout_labels(tmp_path):
    data = frames()
    p = tmp_path / "smd.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("jungfrau/calib", data=data, maxshape=(None, SS, FS), chunks=True)
        f["timestamp"] = np.arange(N) * 10
        f["ipm2/sum"] = np.linspace(0, 1, N)
        f["tags"] = np.array([0, 1, -1, 2])
    opts = dict(pixel_size_um=75.0, distance_mm=80.0, energy_ev=9500.0)
    assert detect_format(str(p)) == "smalldata"
    with open_source(str(p), label_dataset="tags", **opts) as src:
        assert src.reader == "smalldata"
        np.testing.assert_array_equal(src.read(0, N), data)
        assert src.labels == ["water", "ice", None, "miss"]
        np.testing.assert_array_equal(src.extra["timestamp"], np.arange(N) * 10)
        assert "ipm2/sum" in src.extra
    ml = tmp_path / "ml.h5"
    with h5py.File(ml, "w") as f:
        f["data"] = data
        f["label"] = np.array([b"ice", b"water", b"", b"ice"])
    with open_source(str(ml), **opts) as src:
        assert src.reader == "smalldata" and src.labels == ["ice", "water", None, "ice"]


def test_tabular_csv_and_netcdf(tmp_path):
    c = tmp_path / "feat.csv"
    c.write_text("file,event,q_1.0,q_2.0,q_3.0,npeaks,label\n"
                 "a.h5,3,1,2,3,0,water\n"
                 "a.h5,7,4,5,6,12,ice\n"
                 "a.h5,9,7,8,9,1,\n")
    with open_source(str(c)) as src:
        assert src.tabular and src.n_frames == 3
        np.testing.assert_array_equal(src.events, [3, 7, 9])
        prof, scal = src.read_table(1, 3)
        np.testing.assert_array_equal(prof, [[4, 5, 6], [7, 8, 9]])
        assert src.scalar_names == ["npeaks"]
        np.testing.assert_array_equal(scal[:, 0], [12, 1])
        np.testing.assert_array_equal(src.profile_q, [1.0, 2.0, 3.0])
        assert src.labels == ["water", "ice", None]
    netCDF4 = pytest.importorskip("netCDF4")
    n = tmp_path / "prof.nc"
    with netCDF4.Dataset(n, "w") as ds:
        ds.createDimension("frame", None)
        ds.createDimension("q", 4)
        ds.createVariable("q", "f8", ("q",))[:] = [1, 2, 3, 4]
        ds.createVariable("profile", "f4", ("frame", "q"))[:] = np.arange(12).reshape(3, 4)
        ds.createVariable("total", "f4", ("frame",))[:] = [1, 2, 3]
        ds.createVariable("label", "i4", ("frame",))[:] = [1, -1, 0]
    with open_source(str(n)) as src:
        assert src.reader == "tabular" and src.n_frames == 3
        np.testing.assert_array_equal(src.read_table(0, 3)[0], np.arange(12).reshape(3, 4))
        assert src.scalar_names == ["total"] and src.labels == ["ice", None, "water"]


def test_bad_files_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "missing.h5"))
    t = tmp_path / "text.h5"
    t.write_text("not hdf5 at all\n")
    with pytest.raises(InputError, match="not an HDF5 file"):
        open_source(str(t))
    good = tmp_path / "good.cxi"
    write_cxi(good, frames(), geom.flat((SS, FS), 1e-4, 0.05, 9370.0))
    trunc = tmp_path / "trunc.cxi"
    trunc.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(InputError) as err:
        open_source(str(trunc))
    assert str(trunc) in str(err.value) and "\n" not in str(err.value)


def test_expand_inputs_sorted_names_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for rel in ("d/b.cxi", "d/a.h5", "d/sub/c.h5", "d/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    got = expand_inputs([str(tmp_path / "d")])
    assert [n for _, n in got] == ["a.h5", "b.cxi", os.path.join("sub", "c.h5")]
    got = expand_inputs([str(tmp_path / "d" / "*.h5")])
    assert [n for _, n in got] == ["a.h5"]
    with pytest.raises(InputError, match="no input files match"):
        expand_inputs([str(tmp_path / "*.nothing")])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "nope")])


def test_nexus_read_clips_to_frame_count_and_energy_units(tmp_path):
    """read(start, stop) past the end gives only the frames there (no uninitialised rows);
    a master without a wavelength takes its energy from incident_energy in keV."""
    data = frames(3).astype(np.uint16) + 1
    with h5py.File(tmp_path / "z_data_000001.h5", "w") as f:
        f["entry/data/data"] = data
    m = tmp_path / "z_master.h5"
    with h5py.File(m, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink("z_data_000001.h5", "/entry/data/data")
        d = f.create_group("entry/instrument/detector")
        d["x_pixel_size"] = 75e-6
        d["detector_distance"] = 0.12
        f["entry/instrument/beam/incident_energy"] = 9.5
        f["entry/instrument/beam/incident_energy"].attrs["units"] = np.array([b"keV"])
    with open_source(str(m)) as src:
        got = src.read(1, 10)
        assert got.shape == (2, SS, FS)
        np.testing.assert_array_equal(got, data[1:3])
        assert src.read(5, 8).shape == (0, SS, FS)
        assert src.geometry.energy_ev == pytest.approx(9500.0)
    with h5py.File(m, "a") as f:
        f["entry/instrument/beam/incident_energy"].attrs["units"] = "furlong"
    with pytest.raises(InputError, match="unknown energy units"):
        open_source(str(m))


def test_cxi_distance_flag_overrides_file_geometry(tmp_path):
    """--distance-mm on a CXI file with its own geometry moves the detector (was ignored)."""
    g = geom.flat((SS, FS), 100e-6, 0.05, 9370.0, beam_center=(10.0, 20.0))
    p = tmp_path / "run.cxi"
    write_cxi(p, frames(), g)
    with open_source(str(p), distance_mm=80.0, energy_ev=9000.0) as src:
        ref = geom.flat((SS, FS), 100e-6, 0.08, 9000.0, beam_center=(10.0, 20.0))
        assert src.geometry.distance == pytest.approx(0.08)
        np.testing.assert_allclose(src.geometry.q_map(), ref.q_map(), rtol=1e-9)
    with pytest.raises(InputError, match="positive"):
        open_source(str(p), distance_mm=-5.0)


def write_cxi_with(path, key, value, g):
    """A CXI file of ``g`` whose dataset ``key`` is then overwritten with ``value``."""
    write_cxi(path, frames(), g)
    with h5py.File(path, "a") as f:
        f[key][()] = value
    return str(path)


def test_cxi_non_si_energy_or_distance_is_input_error(tmp_path):
    """CXI is SI: energy stored in eV (or distance in mm) is refused, not turned into nonsense q."""
    g = geom.flat((SS, FS), 100e-6, 0.05, 9370.0)
    ev = write_cxi_with(tmp_path / "ev.cxi", "entry_1/instrument_1/source_1/energy", 9370.0, g)
    with pytest.raises(InputError, match="joules"):
        open_source(ev)
    with pytest.raises(InputError, match="joules"):                    # the fallback path too
        open_source(ev, format="cxi", pixel_size_um=100.0)
    with open_source(ev, energy_ev=9370.0) as src:                     # the flag replaces it
        np.testing.assert_allclose(src.geometry.q_map(), g.q_map(), rtol=1e-9)
    with open_source(ev, pixel_size_um=100.0, energy_ev=9370.0) as src:
        assert src.geometry.energy_ev == pytest.approx(9370.0)
    mm = write_cxi_with(tmp_path / "mm.cxi", "entry_1/instrument_1/detector_1/distance", 139.0, g)
    with pytest.raises(InputError, match="metres"):
        open_source(mm)


def test_cxi_per_asic_stack_with_per_asic_geometry(tmp_path):
    """(N, 64, 185, 194) data with 64 corner_positions (one per ASIC) maps onto the 2x1s."""
    ref = geom.cspad(distance=0.139, energy_ev=9370.0, layout="modules")
    order = sorted(ref.panels, key=lambda p: (p.module, p.fs0))   # ASIC a = 2 m + fs0 // 194
    data = np.zeros((1, 64, 185, 194), np.uint16)
    data[0, 5, 3, 4] = 9
    p = tmp_path / "asics.cxi"
    write_cxi(p, data)
    mask = np.zeros((64, 185, 194), np.uint8)
    mask[5, 0, 0] = 1                 # CXI mask: nonzero = bad
    with h5py.File(p, "a") as f:
        det = f["entry_1/instrument_1/detector_1"]
        det["distance"] = 0.139
        det["corner_positions"] = np.array([np.add(q.corner, (0, 0, 0.139)) for q in order])
        det["basis_vectors"] = np.array([[q.ss_vec, q.fs_vec] for q in order])
        det["mask"] = mask
    with open_source(str(p)) as src:
        assert src.frame_shape == (32, 185, 388)
        assert src.read(0, 1)[0, 2, 3, 194 + 4] == 9
        np.testing.assert_allclose(src.geometry.q_map(), ref.q_map(), rtol=1e-9)
        assert not src.geometry.mask[2, 0, 194] and src.geometry.mask[2, 0, 0]


def test_cheetah_single_frame_read_past_the_frame_is_empty(tmp_path):
    p = tmp_path / "LCLS_2011_Feb28_r0139_163412_1a40_cspad.h5"
    with h5py.File(p, "w") as f:
        f["data/data"] = np.ones((SS, FS), np.float32)
    with open_source(str(p), pixel_size_um=110.0, distance_mm=139.0, energy_ev=9367.0) as src:
        assert src.read(0, 5).shape == (1, SS, FS)
        assert src.read(1, 2).shape == (0, SS, FS)


def write_cheetah_hit(path, raw, energy_ev=9367.0, position_mm=139.0, fiducial=0x1a3f):
    """One Cheetah classic hit file: raw CSPAD slab, a small assembled image, machine data."""
    with h5py.File(path, "w") as f:
        f.create_dataset("data/rawdata", data=raw, chunks=(185, 388))
        f["data/data"] = raw[:SS, :FS].astype(np.float32)      # assembled (small stand-in)
        f["LCLS/photon_energy_eV"] = [energy_ev]
        f["LCLS/photon_wavelength_A"] = [12398.419843320026 / energy_ev]
        f["LCLS/detectorPosition"] = [position_mm]
        f["LCLS/fiducial"] = [fiducial]


def test_cheetah_classic_ingest_end_to_end(tmp_path, cli):
    """A run directory of Cheetah one-hit files -> lcls-dl ingest -> a labeled dataset."""
    import csv
    import json

    from lcls_dl.dataset import Dataset

    g = geom.cspad(distance=0.139, energy_ev=9367.0, layout="slab")
    q = g.q_map()
    rng = np.random.default_rng(3)
    run = tmp_path / "r0139"
    run.mkdir()
    names = [f"LCLS_2011_Feb28_r0139_16341{i}_1a3{i}_cspad.h5" for i in range(3)]
    for i, name in enumerate(names):
        lam = 0.05 + (8.0 if i != 1 else 0.0) * np.exp(-0.5 * ((q - 1.9) / 0.2) ** 2)
        raw = np.where(np.isfinite(lam), rng.poisson(np.nan_to_num(lam)), 0).astype(np.int16)
        write_cheetah_hit(run / name, raw, fiducial=0x1a30 + i)
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["file", "event", "label"], [names[0], 0, "water"],
                     [names[1], 0, "miss"]])
    out = tmp_path / "data"
    r = cli("ingest", run, "--labels", tmp_path / "labels.csv", "--out", out,
            "--preprocess", "n_q=16", "--preprocess", "image_shape=[16,32]", timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [(i["path"], i["reader"], i["frames"]) for i in m["inputs"]] == \
        [(n, "cheetah", 1) for n in names]
    assert m["geometry"]["frame_shape"] == [1480, 1552]
    assert m["geometry"]["distance"] == pytest.approx(0.139)
    assert m["geometry"]["energy_ev"] == pytest.approx(9367.0)
    assert {k: v for k, v in m["class_counts"].items() if v} == \
        {"water": 1, "miss": 1, "unlabeled": 1}
    ds = Dataset(out)
    assert list(ds.ids) == [f"{n}:0" for n in names]
    prof = ds.read([0, 1, 2])["profile"]
    centers = np.asarray(ds.preprocessing["q_edges"])
    centers = (centers[1:] + centers[:-1]) / 2
    assert abs(centers[np.argmax(prof[0])] - 1.9) < 0.3      # the ring is where it was put
    assert np.ptp(prof[1]) < 0.2 * np.ptp(prof[0])           # the blank frame's is flat
    ds.close()
    # an encoder that is not the sample distance: --distance-mm overrides it
    r = cli("ingest", run / names[0], "--out", tmp_path / "d2", "--distance-mm", "150",
            "--preprocess", "n_q=16", "--preprocess", "image_shape=[16,32]", timeout=120)
    assert r.returncode == 0, r.stderr
    m2 = json.loads((tmp_path / "d2" / "manifest.json").read_text())
    assert m2["geometry"]["distance"] == pytest.approx(0.150)


def test_info_lists_inputs_bad_items_versions_and_model_sections(tmp_path, cli):
    """lcls-dl info: inputs, skipped bad items and versions of a dataset; a model's sections."""
    import json

    from lcls_dl.ingest import pipeline
    from lcls_dl.ingest.preprocess import PreprocessParams

    raw = tmp_path / "raw"
    raw.mkdir()
    with h5py.File(raw / "a.h5", "w") as f:
        f["frames"] = frames(3)
    (raw / "broken.h5").write_text("not hdf5")
    out = tmp_path / "data"
    m = pipeline.ingest([str(raw)], str(out), skip_bad=True, pixel_size_um=400.0,
                        distance_mm=12.0, energy_ev=9370.0,
                        params=PreprocessParams(n_q=8, image_shape=(8, 16)))
    r = cli("info", out, check=True)
    assert "a.h5: 3 frames (plain)" in r.stdout
    assert "broken.h5: not an HDF5 file" in r.stdout
    assert f"numpy {np.__version__}" in r.stdout and "preprocess  n_q = 8" in r.stdout
    model = tmp_path / "model"
    model.mkdir()
    meta = {"schema_version": 1, "kind": "lcls-dl model", "software": m["software"],
            "model_kind": "cnn_dnn", "classes": ["water", "ice"],
            "inputs": {"image": [8, 16, 2], "profile": [8]}, "geometry": m["geometry"],
            "preprocessing": m["preprocessing"],
            "dataset": {"path": str(out), "n_frames": 3, "manifest_checksum": "f" * 64,
                        "class_counts": {"water": 2, "ice": 1}},
            "split": {"seed": 4, "counts": {"train": 2, "val": 1, "test": 0}},
            "training": {"epochs_run": 5, "best_epoch": 4, "params": 1234},
            "metrics": {"val": {"n": 1, "accuracy": 0.75, "macro_f1": 0.5}},
            "temperature": 1.5, "seed": 4}
    (model / "model.json").write_text(json.dumps(meta))
    r = cli("info", model, check=True)
    assert r.stdout.startswith("model: ")
    assert "model       cnn_dnn, 1234 parameters" in r.stdout
    assert "inputs      image (8, 16, 2), profile (8,)" in r.stdout
    assert "3 frames (water 2, ice 1)" in r.stdout and "train 2, val 1, test 0" in r.stdout
    assert "accuracy 0.7500" in r.stdout and "geometry    flat (32, 40)" in r.stdout
    assert "preprocess  n_q = 8" in r.stdout and "seed        4" in r.stdout
    (model / "model.json").write_text("{torn")
    r = cli("info", model)
    assert r.returncode == 1 and "unreadable model.json" in r.stderr


def test_nexus_energy_units_are_case_sensitive_where_it_matters(tmp_path):
    import h5py

    from lcls_dl.ingest.readers.nexus import to_ev

    with h5py.File(tmp_path / "e.h5", "w") as f:
        for name, value, units in (("kev", 9.37, "keV"), ("ev", 9370.0, "eV"),
                                   ("MeV", 0.00937, "MeV"), ("meV", 9.37e6, "meV")):
            f[name] = value
            f[name].attrs["units"] = units
        for name in ("kev", "ev", "MeV", "meV"):
            assert to_ev(f[name]) == pytest.approx(9370.0), name
