"""Label store: concurrent writers, crashes mid-write, CSV round trip, history."""
import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lcls_dl.active.label_store import LOG_NAME, LabelStore, read_label_csv
from lcls_dl.atomic import write_json
from lcls_dl.dataset import Dataset
from lcls_dl.errors import InputError
from lcls_dl.ingest.shard_writer import write_shard


def make_dataset(path, n=12, classes=("water", "ice"), seed=0):
    """A tiny dataset: n frames of 4x6 images, unlabeled, ids run1.cxi:<k>."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    ids = [f"run1.cxi:{k}" for k in range(n)]
    summary = write_shard(os.path.join(path, "shard-00000.h5"),
                          rng.random((n, 4, 6)), rng.random((n, 5)), rng.random((n, 2)),
                          ["a", "b"], np.full(n, -1), ids, ["run1.cxi"] * n, np.arange(n))
    write_json(os.path.join(path, "manifest.json"), {
        "schema_version": 1, "kind": "lcls-dl dataset", "classes": list(classes),
        "n_frames": n, "preprocessing": {"scalar_names": ["a", "b"]}, "shards": [summary]})
    return ids


def _plain_writer(path, who, n):
    store = LabelStore(path)
    for k in range(n):
        store._append((json.dumps({"id": f"x:{k}", "label": "ice", "who": who,
                                   "when": "t", "source": "human"}) + "\n").encode())


def test_set_current_and_history_keep_who_when_source(tmp_path):
    ids = make_dataset(tmp_path)
    store = LabelStore(tmp_path)
    assert store.set(ids[:2], ["ice", "water"], who="alice", when="2026-01-01T00:00:00Z") == 2
    store.set([ids[0]], ["water"], who="bob", source="oracle")
    cur = store.current()
    assert cur[ids[0]]["label"] == "water" and cur[ids[0]]["who"] == "bob"
    assert cur[ids[0]]["source"] == "oracle"
    hist = store.history(ids=[ids[0]])
    assert [(h["label"], h["who"]) for h in hist] == [("ice", "alice"), ("water", "bob")]
    assert hist[0]["when"] == "2026-01-01T00:00:00Z"
    assert hist[1]["when"].endswith("Z")
    # training reads the store: Dataset overlays it
    ds = Dataset(tmp_path)
    assert ds.labels[0] == ds.classes.index("water") and ds.labels[1] == ds.classes.index("water")
    assert (ds.labels[2:] == -1).all()


def test_default_who_is_recorded(tmp_path, monkeypatch):
    ids = make_dataset(tmp_path)
    monkeypatch.setenv("LCLS_DL_USER", "carol")
    LabelStore(tmp_path).set(ids[:1], "ice")
    assert LabelStore(tmp_path).current()[ids[0]]["who"] == "carol"


def test_validation_names_unknown_ids_and_classes(tmp_path):
    ids = make_dataset(tmp_path)
    store = LabelStore(tmp_path)
    with pytest.raises(InputError, match="nope.cxi:1"):
        store.set([ids[0], "nope.cxi:1"], ["ice", "ice"])
    with pytest.raises(InputError, match="'slush'"):
        store.set([ids[0]], ["slush"])
    assert store.history() == []  # nothing written by a rejected change
    store.set([ids[0]], ["slush"], allow_new_class=True)
    assert "slush" in Dataset(tmp_path).classes


def test_pseudo_labels_are_not_human_labels(tmp_path):
    ids = make_dataset(tmp_path)
    store = LabelStore(tmp_path)
    store.set(ids[:1], ["ice"], source="pseudo")
    assert store.labels() == {}
    assert (Dataset(tmp_path).labels == -1).all()
    assert store.current()[ids[0]]["source"] == "pseudo"


def test_import_export_round_trip(tmp_path):
    make_dataset(tmp_path / "d")
    src = tmp_path / "in.csv"
    src.write_text("file,event,label\nrun1.cxi,3,ice\nrun1.cxi,5,water\n")
    store = LabelStore(tmp_path / "d")
    assert store.import_csv(src, who="dan") == 2
    src2 = tmp_path / "in2.csv"
    src2.write_text("id,label\nrun1.cxi:7,ice\nrun1.cxi:3,\n")  # empty label removes
    store.import_csv(src2)
    out = tmp_path / "out.csv"
    assert store.export_csv(out) == 2
    rows = list(csv.DictReader(open(out)))
    assert {(r["id"], r["label"]) for r in rows} == {("run1.cxi:5", "water"), ("run1.cxi:7", "ice")}
    assert {r["source"] for r in rows} == {"import"}
    assert [r["who"] for r in rows if r["id"] == "run1.cxi:5"] == ["dan"]
    # exported file imports back to the same state in a fresh store
    make_dataset(tmp_path / "e")
    LabelStore(tmp_path / "e").import_csv(out)
    assert LabelStore(tmp_path / "e").labels() == store.labels()
    assert read_label_csv(out)[0] == [r["id"] for r in rows]
    hist = tmp_path / "hist.csv"
    assert store.export_csv(hist, with_history=True) == 4


def test_import_rejects_bad_csv_naming_line(tmp_path):
    make_dataset(tmp_path / "d")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,event,label\nrun1.cxi,x,ice\n")
    with pytest.raises(InputError, match=r"bad.csv:2"):
        LabelStore(tmp_path / "d").import_csv(bad)
    nohdr = tmp_path / "nohdr.csv"
    nohdr.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="header"):
        LabelStore(tmp_path / "d").import_csv(nohdr)


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_plain_writer, args=(str(tmp_path), f"w{k}", 200))
             for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    hist = LabelStore(tmp_path).history()
    assert len(hist) == 800
    for k in range(4):
        assert [h["id"] for h in hist if h["who"] == f"w{k}"] == [f"x:{j}" for j in range(200)]
    # every line is complete JSON
    lines = (tmp_path / LOG_NAME).read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    ids = make_dataset(tmp_path)
    store = LabelStore(tmp_path)
    store.set(ids[:2], ["ice", "water"])
    with open(store.path, "ab") as fh:  # a writer died mid-line
        fh.write(b'{"id": "run1.cxi:5", "label": "ic')
    assert set(store.current()) == set(ids[:2])
    store.set(ids[2:3], ["ice"])
    raw = open(store.path, "rb").read()
    assert raw.endswith(b"\n") and b'"ic\n' not in raw and b"run1.cxi:5" not in raw
    assert [json.loads(x)["id"] for x in raw.splitlines()] == ids[:3]


KILLED_WRITER = r"""
import json, os, sys, time
from lcls_dl.active.label_store import LabelStore
store = LabelStore(sys.argv[1])
big = "".join(json.dumps({"id": f"x:{k}", "label": "ice", "who": "k", "when": "t",
                          "source": "human"}) + "\n" for k in range(500)).encode()
print("ready", flush=True)
while True:
    store._append(big)
    time.sleep(0.002)
"""


def test_writer_killed_mid_write_leaves_store_consistent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    store = LabelStore(tmp_path)
    before = store.history()
    assert len(before) > 0
    _plain_writer(str(tmp_path), "after", 3)
    after = store.history()
    assert len(after) == len(before) + 3  # nothing complete lost, new changes all present
    assert [h["who"] for h in after[-3:]] == ["after"] * 3
    raw = open(store.path, "rb").read()
    assert all(json.loads(x) for x in raw.splitlines())


def test_dataset_without_classes_accepts_first_labels(tmp_path):
    ids = make_dataset(tmp_path, classes=())
    store = LabelStore(tmp_path)
    store.set(ids[:2], ["ice", "water"])
    ds = Dataset(tmp_path)
    assert set(ds.classes) == {"ice", "water"}
    with pytest.raises(InputError, match="'slush'"):
        store.set(ids[:1], ["slush"])  # now the dataset has classes
