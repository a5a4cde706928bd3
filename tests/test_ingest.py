"""lcls-dl ingest / info end to end: resume, --force, labels, MPI, every bad input."""
import csv
import json
import os

import h5py
import numpy as np
import pytest

from lcls_dl.dataset import Dataset
from lcls_dl.errors import ConfigError, InputError
from lcls_dl.ingest import pipeline
from lcls_dl.ingest.geometry import flat
from lcls_dl.ingest.manifest import validate_manifest
from lcls_dl.ingest.preprocess import PreprocessParams

SS = FS = 48
GEOM = dict(pixel_size_um=400.0, distance_mm=12.0, energy_ev=9370.0)
FLAGS = ["--pixel-size-um", "400", "--distance-mm", "12", "--energy-ev", "9370"]
SMALL = PreprocessParams(n_q=16, image_shape=(16, 32))
SMALL_FLAGS = ["--preprocess", "n_q=16", "--preprocess", "image_shape=[16,32]"]


def ring_frames(n, seed=0, ring=None):
    """Photon frames: a water-like ring (S1 ~1.9 1/A) on odd frames, blank misses on even."""
    g = flat((SS, FS), 400e-6, 0.012, 9370.0)
    q = g.q_map()
    rng = np.random.default_rng(seed)
    out = np.empty((n, SS, FS), np.float32)
    for i in range(n):
        lam = 0.02 + ((5.0 if (i % 2 if ring is None else ring[i]) else 0.0)
                      * np.exp(-0.5 * ((q - 1.9) / 0.2) ** 2))
        out[i] = rng.poisson(lam)
    return out


def write_plain(path, data):
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/frames", data=data, chunks=(1,) + data.shape[1:])
    return str(path)


def snapshot(path):
    """Names, sizes and contents' hashes of everything under ``path`` (None if absent)."""
    if not os.path.exists(path):
        return None
    import hashlib

    out = {}
    for root, dirs, files in os.walk(path):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def staging_dirs(parent):
    return [d for d in os.listdir(parent) if "lcls-dl-staging" in d]


@pytest.fixture
def run_dir(tmp_path):
    """Two plain HDF5 files of 7 and 5 frames + a labels CSV for some frames."""
    d = tmp_path / "raw"
    d.mkdir()
    write_plain(d / "a.h5", ring_frames(7, seed=1))
    write_plain(d / "b.h5", ring_frames(5, seed=2))
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "event", "label"])
        w.writerows([["a.h5", 0, "miss"], ["a.h5", 1, "water"], ["b.h5", 4, "ice"],
                     ["b.h5", 2, ""]])
    return d


def test_ingest_end_to_end_plain(tmp_path, run_dir):
    out = tmp_path / "data"
    m = pipeline.ingest([str(run_dir)], str(out), labels_csv=str(tmp_path / "labels.csv"),
                        shard_size=5, params=SMALL, **GEOM)
    validate_manifest(m, str(out), check_files=True)
    assert m["n_frames"] == 12 and [s["frames"] for s in m["shards"]] == [5, 5, 2]
    assert m["classes"] == ["water", "ice", "miss"]
    assert m["class_counts"] == {"water": 1, "ice": 1, "miss": 1, "unlabeled": 9}
    assert [i["path"] for i in m["inputs"]] == ["a.h5", "b.h5"]
    assert m["preprocessing"]["n_q"] == 16 and len(m["preprocessing"]["q_edges"]) == 17
    assert not staging_dirs(tmp_path)
    ds = Dataset(out)
    assert list(ds.ids[:2]) == ["a.h5:0", "a.h5:1"] and ds.ids[7] == "b.h5:0"
    assert ds.labels[[0, 1, 2, 11]].tolist() == [2, 0, -1, 1]
    batch = ds.read([0, 1, 11])
    assert batch["image"].shape == (3, 16, 32, 2) and batch["profile"].shape == (3, 16)
    pre = ds.preprocessing  # (H, W) + channel count; re-creates the same parameters
    assert pre["image_shape"] == [16, 32] and pre["image_channels"] == 2
    assert PreprocessParams.from_dict(pre).image_array_shape == (16, 32, 2)
    # the ring frame's profile peaks near S1, the blank frame's is flat and low
    centers = PreprocessParams(n_q=16, image_shape=(16, 32)).q_centers()
    assert abs(centers[np.argmax(batch["profile"][1])] - 1.9) < 0.3
    # the same files preprocessed on the fly (predict) give the same arrays
    got = list(pipeline.iter_preprocessed([str(run_dir)], m["preprocessing"], batch_size=4,
                                          **GEOM))
    ids = sum((b["ids"] for b in got), [])
    assert ids == list(ds.ids)
    allrows = Dataset(out).read(np.arange(12))
    np.testing.assert_array_equal(np.concatenate([b["profile"] for b in got]),
                                  allrows["profile"])


def test_info_dataset_and_model(tmp_path, run_dir, cli):
    out = tmp_path / "data"
    cli("ingest", run_dir, "--out", out, "--shard-size", "4", *FLAGS, *SMALL_FLAGS, check=True)
    r = cli("info", out, check=True)
    assert "frames      12" in r.stdout and "shards      3" in r.stdout
    assert "geometry    flat (48, 48)" in r.stdout
    r = cli("info", out, "--json", check=True)
    summary = json.loads(r.stdout)
    assert summary["frames"] == 12 and summary["shapes"]["image"] == [16, 32, 2]
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"architecture": "cnn_dnn",
                                                  "classes": ["water", "ice"]}))
    r = cli("info", model, check=True)
    assert "architecture" in r.stdout and "cnn_dnn" in r.stdout
    r = cli("info", tmp_path / "nothing")
    assert r.returncode == 1 and r.stderr.startswith("lcls-dl: error:")


def test_shards_blosc_images_despite_a_foreign_hdf5_plugin_path(tmp_path, run_dir, cli):
    """Shard images are Blosc-compressed; netCDF4's wheel points HDF5_PLUGIN_PATH at its own
    filters (another libhdf5), which must not replace hdf5plugin's in lcls-dl."""
    netCDF4 = pytest.importorskip("netCDF4")
    plugins = os.path.join(os.path.dirname(netCDF4.__file__), "plugins")
    out = tmp_path / "data"
    cli("ingest", run_dir, "--out", out, "--shard-size", "4", *FLAGS, *SMALL_FLAGS, check=True,
        env={"HDF5_PLUGIN_PATH": plugins})
    with h5py.File(out / "shard-00000.h5", "r") as f:
        dcpl = f["image"].id.get_create_plist()
        assert [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())] == [32001]  # Blosc
        assert f["image"].chunks[0] == 1
    ds = Dataset(out)
    image = ds.read([0, 5], ("image",))["image"]
    assert image.shape == (2, 16, 32, 2) and np.isfinite(image).all() and image.std() > 0


def test_dark_and_gain_files_calibrate_frames_and_are_recorded(tmp_path, cli):
    """(raw * gain + dark) ingested with --dark/--gain == raw ingested without them."""
    from lcls_dl.ingest.pipeline import iter_preprocessed

    raw = ring_frames(6, seed=4)
    rng = np.random.default_rng(5)
    dark = np.round(rng.normal(50.0, 5.0, (SS, FS)))            # ADU, per pixel
    gain = rng.uniform(0.8, 1.25, (SS, FS))
    for name, data in (("raw", raw), ("cal", raw * gain + dark)):
        (tmp_path / name).mkdir()
        write_plain(tmp_path / name / "x.h5", data.astype(np.float32))
    np.save(tmp_path / "dark.npy", dark)
    with h5py.File(tmp_path / "gain.h5", "w") as f:
        f["gain"] = gain
    cli("ingest", tmp_path / "raw", "--out", tmp_path / "d_raw", *FLAGS, *SMALL_FLAGS, check=True)
    cli("ingest", tmp_path / "cal", "--out", tmp_path / "d_cal", *FLAGS, *SMALL_FLAGS,
        "--dark", tmp_path / "dark.npy", "--gain", tmp_path / "gain.h5", "--np", "2", check=True)
    a, b = Dataset(tmp_path / "d_raw"), Dataset(tmp_path / "d_cal")
    rows = list(range(6))
    for key in ("profile", "image", "scalars"):
        got, want = b.read(rows, (key,))[key], a.read(rows, (key,))[key]
        if key == "scalars":  # whole-photon pixels sit exactly on the lit threshold (5.0):
            keep = [i for i, n in enumerate(a.scalar_names) if n != "lit_fraction"]
            got, want = got[:, keep], want[:, keep]  # float rounding flips a few of them
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=key)
    pre = b.manifest["preprocessing"]
    assert pre["dark_file"] == str(tmp_path / "dark.npy")
    assert set(pre["calibration_sha256"]) == {"dark", "gain"}
    # predict's path applies the recorded calibration, and refuses a changed file
    got = next(iter_preprocessed([str(tmp_path / "cal")], pre, **GEOM))
    np.testing.assert_allclose(got["profile"], a.read(rows, ("profile",))["profile"],
                               rtol=1e-4, atol=1e-4)
    np.save(tmp_path / "dark.npy", dark + 1)
    with pytest.raises(InputError, match="dark file changed"):
        next(iter_preprocessed([str(tmp_path / "cal")], pre, **GEOM))


def test_damaged_shard_is_one_line_naming_it(tmp_path, run_dir):
    out = tmp_path / "data"
    pipeline.ingest([str(run_dir)], str(out), shard_size=5, params=SMALL, **GEOM)
    shard = out / "shard-00001.h5"
    with h5py.File(shard, "r") as f:
        info = f["scalars"].id.get_chunk_info(0)       # gzip-compressed bytes of frames 5..
    with open(shard, "r+b") as fh:                     # as a bad disk or copy would leave
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * min(info.size, 64))
    ds = Dataset(out)
    ds.read([0, 1])                                    # other shards still read
    with pytest.raises(InputError, match=r"cannot read shard shard-00001\.h5 .*damaged"):
        ds.read([0, 5])


def test_resume_after_kill_keeps_finished_shards(tmp_path, run_dir, monkeypatch):
    out = str(tmp_path / "data")
    real = pipeline.build_shard

    def ingest_to(path):
        return pipeline.ingest([str(run_dir)], path, shard_size=3, params=SMALL,
                               labels_csv=str(tmp_path / "labels.csv"), **GEOM)

    calls = []

    def dying(plan, k, *a, **kw):
        calls.append(k)
        if k == 2:
            raise KeyboardInterrupt  # like a kill after two shards
        return real(plan, k, *a, **kw)

    monkeypatch.setattr(pipeline, "build_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        ingest_to(out)
    assert not os.path.exists(out)                    # DATASET_DIR untouched
    (staged,) = staging_dirs(tmp_path)
    assert sorted(os.listdir(tmp_path / staged)) == ["shard-00000.h5", "shard-00001.h5"]
    calls.clear()
    monkeypatch.setattr(pipeline, "build_shard", lambda plan, k, *a, **kw:
                        calls.append(k) or real(plan, k, *a, **kw))
    m = ingest_to(out)
    assert calls == [2, 3] and m["n_frames"] == 12
    assert not staging_dirs(tmp_path)
    # the shards finished before the kill count their classes like the others
    clean = ingest_to(str(tmp_path / "clean"))
    assert m["class_counts"] == clean["class_counts"] == \
        {"water": 1, "ice": 1, "miss": 1, "unlabeled": 9}
    assert [s["class_counts"] for s in m["shards"]] == \
        [s["class_counts"] for s in clean["shards"]]
    # a deleted shard is redone, the others kept
    os.unlink(os.path.join(out, "shard-00001.h5"))
    calls.clear()
    m2 = ingest_to(out)
    assert calls == [1] and [s["sha256"] for s in m2["shards"]] == \
        [s["sha256"] for s in m["shards"]]
    calls.clear()
    m3 = ingest_to(out)
    assert calls == [] and m3.get("_up_to_date")
    calls.clear()
    pipeline.ingest([str(run_dir)], out, shard_size=3, params=SMALL, force=True, **GEOM)
    assert calls == [0, 1, 2, 3]


def test_other_parameters_refused_without_force(tmp_path, run_dir):
    out = str(tmp_path / "data")
    pipeline.ingest([str(run_dir)], out, shard_size=5, params=SMALL, **GEOM)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="--force"):
        pipeline.ingest([str(run_dir)], out, shard_size=4, params=SMALL, **GEOM)
    assert snapshot(out) == before
    (tmp_path / ".data.lcls-dl-staging-0123456789abcdef").mkdir()   # left by a killed run
    m = pipeline.ingest([str(run_dir)], out, shard_size=4, params=SMALL, force=True, **GEOM)
    assert [s["frames"] for s in m["shards"]] == [4, 4, 4]
    assert not staging_dirs(tmp_path)
    assert sorted(f for f in os.listdir(out) if f.startswith("shard")) == \
        ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]   # old 3rd 2-frame shard gone


def test_labels_single_run_event_label_and_classes(tmp_path):
    p = write_plain(tmp_path / "one.h5", ring_frames(4))
    lab = tmp_path / "l.csv"
    lab.write_text("event,label\n0,miss\n3,snow\n")
    m = pipeline.ingest([p], str(tmp_path / "d"), labels_csv=str(lab), params=SMALL, **GEOM)
    assert m["classes"] == ["miss", "snow"]
    assert Dataset(tmp_path / "d").labels.tolist() == [0, -1, -1, 1]
    with pytest.raises(InputError, match="unknown label name 'snow'.*one.h5:3"):
        pipeline.ingest([p], str(tmp_path / "e"), labels_csv=str(lab), params=SMALL,
                        classes=["water", "ice", "miss"], **GEOM)
    assert not os.path.exists(tmp_path / "e")


def test_drop_misses_keeps_ring_frames(tmp_path):
    p = write_plain(tmp_path / "hits.h5", ring_frames(6, ring=[0, 1, 0, 0, 1, 1]))
    m = pipeline.ingest([p], str(tmp_path / "d"), params=SMALL, drop_misses=True,
                        shard_size=4, **GEOM)
    assert Dataset(tmp_path / "d").ids.tolist() == ["hits.h5:1", "hits.h5:4", "hits.h5:5"]
    assert m["n_frames"] == 3


def test_tabular_csv_ingest(tmp_path):
    c = tmp_path / "feat.csv"
    c.write_text("event,q_1.0,q_2.0,npeaks,label\n0,1,2,0,water\n1,3,4,20,ice\n2,5,6,1,\n")
    m = pipeline.ingest([str(c)], str(tmp_path / "d"))
    assert m["preprocessing"]["tabular"] and m["geometry"] is None
    ds = Dataset(tmp_path / "d")
    b = ds.read([0, 1, 2])
    assert b["image"].shape == (3, 0, 0)
    np.testing.assert_array_equal(b["profile"], [[1, 2], [3, 4], [5, 6]])
    assert ds.scalar_names == ["npeaks"] and ds.labels.tolist() == [0, 1, -1]


def test_simulated_cxi_run_with_truth_labels(tmp_path, cli):
    from lcls_dl.simulate.run import simulate_run

    simulate_run(str(tmp_path / "run1"), 6, seed=3, frames_per_file=4)
    m = pipeline.ingest([str(tmp_path / "run1")], str(tmp_path / "d"),
                        labels_csv=str(tmp_path / "run1" / "truth.csv"), params=SMALL,
                        shard_size=4)
    assert m["inputs"][0]["reader"] == "cxi" and m["preprocessing"]["adu_per_photon"] != 1.0
    with open(tmp_path / "run1" / "truth.csv") as fh:
        truth = {f"{r['file']}:{r['event']}": r["label"] for r in csv.DictReader(fh)}
    ds = Dataset(tmp_path / "d")
    assert [ds.classes[i] for i in ds.labels] == [truth[i] for i in ds.ids]


# -- bad input: one line, exit 1, DATASET_DIR exactly as before -------------------------------
@pytest.fixture
def existing(tmp_path, run_dir):
    out = tmp_path / "data"
    pipeline.ingest([str(run_dir)], str(out), shard_size=5, params=SMALL, **GEOM)
    return out


def _bad_cases(tmp_path, run_dir):
    good = str(run_dir / "a.h5")
    (tmp_path / "text.h5").write_text("hello\n")
    raw = (run_dir / "a.h5").read_bytes()
    (tmp_path / "trunc.h5").write_bytes(raw[:len(raw) // 3])
    with h5py.File(tmp_path / "twod.h5", "w") as f:
        f["frames"] = np.zeros((SS, FS), np.float32)
    np.save(tmp_path / "mask.npy", np.ones((SS, FS + 2), bool))
    nan = ring_frames(9)
    nan[7, 20, 30] = np.nan
    write_plain(tmp_path / "nan.h5", nan)
    (tmp_path / "unknown_event.csv").write_text("file,event,label\na.h5,99,ice\n")
    (tmp_path / "unknown_name.csv").write_text("file,event,label\na.h5,1,slush\n")
    np.save(tmp_path / "dark_shape.npy", np.zeros((SS + 1, FS)))
    dark_nan = np.zeros((SS, FS))
    dark_nan[3, 4] = np.inf
    np.save(tmp_path / "dark_nan.npy", dark_nan)
    return [
        ([good], ["--dark", str(tmp_path / "dark_shape.npy")], "dark_shape.npy", "dark shape"),
        ([good], ["--dark", str(tmp_path / "dark_nan.npy")], "dark_nan.npy", "non-finite"),
        ([good], ["--gain", str(tmp_path / "no_gain.npy")], "no_gain.npy", "gain file not found"),
        ([str(tmp_path / "missing.h5")], [], "missing.h5", "no such file"),
        ([str(tmp_path / "text.h5")], [], "text.h5", "not an HDF5 file"),
        ([str(tmp_path / "trunc.h5")], [], "trunc.h5", ""),
        ([good], ["--dataset", "/nope"], "a.h5", "no dataset /nope"),
        ([str(tmp_path / "twod.h5")], ["--dataset", "frames"], "twod.h5", "2-D"),
        ([good], ["--mask", str(tmp_path / "mask.npy")], "mask.npy", "mask shape"),
        ([str(tmp_path / "nan.h5")], ["--shard-size", "4"], "nan.h5:7", "non-finite"),
        ([str(run_dir)], ["--labels", str(tmp_path / "unknown_event.csv")], "a.h5:99",
         "unknown event"),
        ([str(run_dir)], ["--labels", str(tmp_path / "unknown_name.csv"), "--classes",
                          "water,ice,miss"], "a.h5:1", "unknown label name 'slush'"),
    ]


@pytest.mark.slow
def test_every_bad_input_one_line_exit_1_dataset_unchanged(tmp_path, run_dir, existing, cli):
    before = snapshot(existing)
    fresh = tmp_path / "fresh"
    for inputs, extra, where, what in _bad_cases(tmp_path, run_dir):
        for out, more in ((existing, ["--force"]), (fresh, [])):
            r = cli("ingest", *inputs, "--out", out, *FLAGS, *SMALL_FLAGS, *extra, *more)
            msg = f"{inputs} {extra}: {r.stderr}"
            assert r.returncode == 1, msg
            lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
            assert len(lines) == 1 and lines[0].startswith("lcls-dl: error: "), msg
            assert r.stderr.strip().splitlines()[-1] == lines[0], msg   # bars cleared
            assert where in lines[0] and what in lines[0], msg
            assert snapshot(existing) == before, msg
            assert not fresh.exists(), msg
            assert not staging_dirs(tmp_path), msg


def test_skip_bad_lists_bad_items(tmp_path, run_dir, cli):
    (run_dir / "junk.h5").write_text("not hdf5")
    nan = ring_frames(3)
    nan[1, 24, 30] = np.inf
    write_plain(run_dir / "c.h5", nan)
    r = cli("ingest", run_dir, "--out", tmp_path / "d", "--skip-bad", *FLAGS, *SMALL_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "junk.h5" in r.stderr and "c.h5:1" in r.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert {b["where"].split(os.sep)[-1] for b in m["bad"]} == {"junk.h5", "c.h5:1"}
    assert m["n_frames"] == 7 + 5 + 2
    assert "c.h5:1" not in Dataset(tmp_path / "d").ids


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_np1_and_np2_give_identical_datasets(tmp_path, run_dir, cli):
    args = [run_dir, "--labels", tmp_path / "labels.csv", "--shard-size", "3", *FLAGS,
            *SMALL_FLAGS]
    cli("ingest", *args, "--out", tmp_path / "d1", timeout=150, check=True)
    r2 = cli("ingest", *args, "--out", tmp_path / "d2", "--np", "2", timeout=150, check=True)
    assert "[1,0]" in r2.stdout + r2.stderr          # rank-tagged output
    m1 = json.loads((tmp_path / "d1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "d2" / "manifest.json").read_text())
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert m1["n_frames"] == m2["n_frames"] == 12
    # a bad frame on one rank stops both ranks with one error line on rank 0
    nan = ring_frames(8)
    nan[6, 20, 30] = np.nan
    write_plain(tmp_path / "nan.h5", nan)
    r3 = cli("ingest", tmp_path / "nan.h5", "--out", tmp_path / "d3", "--np", "2",
             "--shard-size", "2", *FLAGS, *SMALL_FLAGS, timeout=150)
    assert r3.returncode == 1
    errors = [ln for ln in (r3.stdout + r3.stderr).splitlines() if "lcls-dl: error:" in ln]
    assert len(errors) == 1 and "nan.h5:6" in errors[0]
    assert not (tmp_path / "d3").exists() and not staging_dirs(tmp_path)


def test_launcher_environment_and_command():
    from lcls_dl.distributed import launcher

    assert launcher.maybe_launch(["info", "x"], 1) is None
    assert launcher.in_mpi_job({"PMIX_RANK": "0"})
    assert not launcher.in_mpi_job({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert launcher.in_mpi_job({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
                                "SLURM_STEP_NUM_TASKS": "2"})
    cmd = launcher.mpiexec_command(["ingest", "a b"], 4, mpiexec="/x/mpiexec", cores=2)
    assert cmd[:3] == ["/x/mpiexec", "-n", "4"] and "--oversubscribe" in cmd
    assert cmd[-2:] == ["ingest", "a b"] and cmd[-5:-2] == launcher.lcls_dl_command()
    cmd = launcher.mpiexec_command(["x"], 4, hostfile="hosts", mpiexec="m", cores=2)
    assert "--oversubscribe" not in cmd and "hosts" in cmd
    # one host: shared memory only (MPI_Init without the slow TCP probe); never across nodes
    env = launcher.rank_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["OMPI_MCA_btl"] == "self,sm"
    assert env["GLIBC_TUNABLES"].split(":")[:2] == ["glibc.malloc.arena_max=2", "glibc.malloc.hugetlb=1"]
    assert "glibc.malloc.mmap_threshold=33554432" in env["GLIBC_TUNABLES"]
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert launcher.rank_environment({"OMPI_MCA_mpi_yield_when_idle": "0"})[
        "OMPI_MCA_mpi_yield_when_idle"] == "0"                  # the user's choice wins
    for kw in ({"hostfile": "hosts"}, {"environ": {"SLURM_JOB_NUM_NODES": "2"}},
               {"environ": {"PBS_NODEFILE": "/n"}}, {"environ": {"OMPI_MCA_btl": "tcp,self"}},
               {"mpiexec_args": ["--mca", "btl", "tcp,self"]}):
        kw = {"environ": {}, **kw}
        assert launcher.rank_environment(**kw).get("OMPI_MCA_btl") != "self,sm", kw
    assert launcher.comm_world() is None


def test_child_command_runs_the_installed_package_not_the_working_directory(tmp_path):
    """Started from a source checkout, ranks must not import the (uncompiled) source tree."""
    import subprocess
    import sys

    from lcls_dl.distributed.launcher import lcls_dl_command

    decoy = tmp_path / "lcls_dl"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('imported the working directory')\n")
    (decoy / "__main__.py").write_text("")
    naive = subprocess.run([sys.executable, "-m", "lcls_dl", "--version"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert "imported the working directory" in naive.stderr  # the trap works
    proc = subprocess.run(lcls_dl_command() + ["--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "lcls-dl, version" in proc.stdout, proc.stderr


def test_nexus_compressed_external_links_end_to_end(tmp_path, cli):
    import hdf5plugin

    data = ring_frames(6).astype(np.uint16)
    for i, (a, b) in enumerate(((0, 4), (4, 6)), start=1):
        with h5py.File(tmp_path / f"e_data_{i:06d}.h5", "w") as f:
            f.create_dataset("entry/data/data", data=data[a:b], chunks=(1, SS, FS),
                             **hdf5plugin.Bitshuffle())
    with h5py.File(tmp_path / "e_master.h5", "w") as f:
        for i in (1, 2):
            f[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(f"e_data_{i:06d}.h5",
                                                               "/entry/data/data")
        d = f.create_group("entry/instrument/detector")
        for key, value, unit in (("x_pixel_size", 0.4, "mm"), ("y_pixel_size", 400, "um"),
                                 ("detector_distance", 0.012, "m")):
            d[key] = value
            d[key].attrs["units"] = unit
        f["entry/instrument/beam/incident_wavelength"] = 12398.419843320026 / 9370.0
    cli("ingest", tmp_path, "--out", tmp_path / "dn", *SMALL_FLAGS, check=True)
    plain = write_plain(tmp_path / "same.h5", data)
    pipeline.ingest([plain], str(tmp_path / "dp"), params=SMALL, **GEOM)
    a, b = Dataset(tmp_path / "dn"), Dataset(tmp_path / "dp")
    assert a.manifest["inputs"][0]["reader"] == "nexus" and len(a) == 6
    assert list(a.ids) == [f"e_master.h5:{i}" for i in range(6)]
    np.testing.assert_allclose(a.read(range(6))["profile"], b.read(range(6))["profile"],
                               rtol=1e-5)
