"""``lcls-dl ingest --common-mode``: per-panel common mode recorded in the manifest and
applied the same way at ingest and on the fly (predict)."""
import json

import h5py
import numpy as np

from lcls_dl.dataset import Dataset
from lcls_dl.ingest import pipeline
from lcls_dl.ingest.geometry import flat

FLAGS = ["--pixel-size-um", "400", "--distance-mm", "12", "--energy-ev", "9370"]
GEOM = dict(pixel_size_um=400.0, distance_mm=12.0, energy_ev=9370.0)
ADU = ["--preprocess", "n_q=16", "--preprocess", "image_shape=[16,32]",
       "--preprocess", "adu_per_photon=20", "--preprocess", "pedestal=100"]


def adu_frames(n, shift, seed=0):
    """ADU frames (20 ADU/photon on a 100 ADU pedestal) of a ring, shifted by ``shift`` ADU."""
    q = flat((40, 40), 400e-6, 0.012, 9370.0).q_map()
    rng = np.random.default_rng(seed)
    lam = 0.02 + 2.0 * np.exp(-0.5 * ((q - 1.9) / 0.2) ** 2)
    photons = rng.poisson(lam, (n,) + q.shape)
    return (100 + shift + 20 * photons).astype(np.uint16)


def write_plain(path, data):
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/frames", data=data)
    return str(path)


def test_ingest_common_mode_option_removes_a_frame_offset(tmp_path, cli):
    clean = write_plain(tmp_path / "clean.h5", adu_frames(4, 0))
    shifted = write_plain(tmp_path / "shifted.h5", adu_frames(4, 8))  # 0.4 photon
    out = tmp_path / "cm"
    cli("ingest", shifted, "--out", out, "--common-mode", "panel-median", *FLAGS, *ADU,
        check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["common_mode"] == "panel-median"
    ds = Dataset(out)
    got = ds.read(np.arange(4))
    # the unshifted frames, no correction: the same profiles (the offset was removed)
    params = dict(manifest["preprocessing"], common_mode="none")
    ref = pipeline.ingest([clean], str(tmp_path / "ref"), params=params, **GEOM)
    want = Dataset(tmp_path / "ref").read(np.arange(4))
    assert ref["preprocessing"]["common_mode"] == "none"
    np.testing.assert_allclose(got["profile"], want["profile"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["image"], want["image"], rtol=1e-5, atol=1e-6)
    # predict-time preprocessing reads the parameter back from the manifest
    again = next(iter(pipeline.iter_preprocessed([shifted], manifest["preprocessing"],
                                                 batch_size=4, **GEOM)))
    np.testing.assert_array_equal(again["profile"], got["profile"])
