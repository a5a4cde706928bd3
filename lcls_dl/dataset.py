"""Read an ingested dataset: ``manifest.json`` + ``shard-*.h5`` (+ the label store).

This is the one reader every later stage (train, evaluate, predict, suggest-labels)
uses. Small per-frame columns (ids, labels) are loaded at open; images, profiles
and scalars are read on demand, shard by shard, so a dataset larger than memory works.

Labels are the shards' labels (from ``ingest --labels``) overlaid by the dataset's
label store (``labels.jsonl``, see :mod:`lcls_dl.active.label_store`), so new human
labels take effect without re-ingesting.

Examples
--------
>>> ds = Dataset("data1")                          # doctest: +SKIP
>>> ds.classes, len(ds), (ds.labels >= 0).sum()    # doctest: +SKIP
(['water', 'ice', 'miss'], 4000, 2800)
>>> batch = ds.read([0, 5, 17])                    # doctest: +SKIP
>>> batch["image"].shape                           # doctest: +SKIP
(3, 128, 128, 2)
"""
import hashlib
import json
import os

import h5py
import numpy as np

from .errors import InputError
from .hdf5_filters import register_filters

MANIFEST = "manifest.json"
DATASET_SCHEMA_VERSION = 1
ARRAYS = ("image", "profile", "scalars")


def manifest_checksum(manifest_path):
    """SHA-256 of the manifest file: identifies a dataset's exact content."""
    with open(manifest_path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def load_manifest(path):
    """Load and check ``manifest.json`` of a dataset directory."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise InputError("dataset directory not found", path)
    if not os.path.isfile(mpath):
        raise InputError("not an lcls-dl dataset: no manifest.json (was ingest completed?)", path)
    try:
        with open(mpath, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable manifest: {exc}", mpath) from None
    version = manifest.get("schema_version")
    if version != DATASET_SCHEMA_VERSION:
        raise InputError(f"dataset schema version {version} is not supported "
                         f"(this lcls-dl reads {DATASET_SCHEMA_VERSION})", mpath)
    return manifest


class Dataset:
    """An ingested dataset, opened read-only.

    Attributes
    ----------
    path : str
    manifest : dict
    classes : list of str
    ids, files : ndarray of str, shape (N,)
    events : ndarray of int64
    labels : ndarray of int16, -1 for unlabeled (shard labels overlaid by the label store)
    shard_of, row_of : ndarray of int
        Shard number and row within it for every frame.
    checksum : str
        SHA-256 of manifest.json.
    """

    def __init__(self, path, use_label_store=True):
        register_filters()  # the shards' images are Blosc-compressed
        self.path = os.fspath(path)
        self.manifest = load_manifest(self.path)
        self.checksum = manifest_checksum(os.path.join(self.path, MANIFEST))
        self.classes = list(self.manifest.get("classes", []))
        self.preprocessing = self.manifest.get("preprocessing", {})
        ids, files, events, labels, shard_of, row_of = [], [], [], [], [], []
        self._shard_paths = []
        for k, shard in enumerate(self.manifest.get("shards", [])):
            spath = os.path.join(self.path, shard["name"])
            self._shard_paths.append(spath)
            try:
                with h5py.File(spath, "r") as f:
                    n = len(f["id"])
                    ids.append(f["id"].asstr()[...])
                    files.append(f["file"].asstr()[...])
                    events.append(f["event"][...])
                    labels.append(f["label"][...])
            except (OSError, KeyError) as exc:
                raise InputError(f"unreadable shard: {exc}", spath) from None
            if n != shard["frames"]:
                raise InputError(f"shard has {n} frames, manifest says {shard['frames']}", spath)
            shard_of.append(np.full(n, k, np.int32))
            row_of.append(np.arange(n, dtype=np.int64))
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        self.ids = cat(ids, object).astype(str)
        self.files = cat(files, object).astype(str)
        self.events = cat(events, np.int64)
        self.labels = cat(labels, np.int16).astype(np.int16)
        self.shard_of = cat(shard_of, np.int32)
        self.row_of = cat(row_of, np.int64)
        self._index = None
        self._open = {}
        if use_label_store:
            self._overlay_label_store()

    def __len__(self):
        return len(self.ids)

    def __repr__(self):
        return f"Dataset({self.path!r}, frames={len(self)}, classes={self.classes})"

    # -- labels -------------------------------------------------------------------------------
    def _overlay_label_store(self):
        from .active.label_store import LabelStore

        store = LabelStore(self.path)
        current = store.current(exclude_sources=("pseudo",))  # pseudo-labels are opt-in
        if not current:
            return
        for rec in current.values():  # classes first named in the label store, in log order
            if rec["label"] is not None and rec["label"] not in self.classes:
                self.classes.append(rec["label"])
        lookup = {c: i for i, c in enumerate(self.classes)}
        pos = self.index_of(list(current))
        for row, rec in zip(pos, current.values()):
            if row >= 0:
                self.labels[row] = -1 if rec["label"] is None else lookup[rec["label"]]

    def index_of(self, ids):
        """Row numbers of sample ids (``-1`` where an id is not in the dataset)."""
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.ids)}
        return np.array([self._index.get(s, -1) for s in ids], dtype=np.int64)

    @property
    def labeled(self):
        """Row numbers of labeled frames."""
        return np.flatnonzero(self.labels >= 0)

    @property
    def unlabeled(self):
        """Row numbers of unlabeled frames."""
        return np.flatnonzero(self.labels < 0)

    def class_counts(self, rows=None):
        """``{class name: count}`` over ``rows`` (default all), plus ``unlabeled``."""
        lab = self.labels if rows is None else self.labels[np.asarray(rows)]
        counts = {c: int((lab == i).sum()) for i, c in enumerate(self.classes)}
        counts["unlabeled"] = int((lab < 0).sum())
        return counts

    # -- arrays -------------------------------------------------------------------------------
    @property
    def scalar_names(self):
        return list(self.preprocessing.get("scalar_names", []))

    def shapes(self):
        """Per-frame shapes ``{"image": (H, W, C), "profile": (Q,), "scalars": (S,)}``.

        ``image`` is ``(H, W)`` for 1-channel datasets and ``(0, 0)`` for tables.
        """
        f = self._file(0)
        return {name: tuple(f[name].shape[1:]) for name in ARRAYS}

    def _file(self, k):
        f = self._open.get(k)
        if f is None:
            try:
                f = self._open[k] = h5py.File(self._shard_paths[k], "r")
            except OSError as exc:
                raise self._damaged(k, exc) from None
        return f

    def _damaged(self, k, exc):
        """The one-line error for a shard that cannot be read."""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return InputError(f"cannot read shard {os.path.basename(self._shard_paths[k])} "
                          f"({reason}); it is damaged or truncated: run lcls-dl ingest again "
                          f"with --force, or restore it", self._shard_paths[k])

    def read(self, rows, arrays=ARRAYS):
        """Read frames ``rows`` (any order) -> dict of stacked arrays, in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = {}
        shapes = self.shapes() if len(self._shard_paths) else {}
        for name in arrays:
            out[name] = np.empty((len(rows),) + shapes.get(name, ()), np.float32)
        shards = self.shard_of[rows]
        for k in np.unique(shards):
            sel = np.flatnonzero(shards == k)
            r = self.row_of[rows[sel]]
            order = np.argsort(r, kind="stable")
            uniq, inverse = np.unique(r[order], return_inverse=True)
            f = self._file(int(k))
            for name in arrays:
                try:
                    block = f[name][uniq]  # h5py needs increasing, unique indices
                except (OSError, KeyError) as exc:  # a failed filter, a missing dataset
                    raise self._damaged(int(k), exc) from None
                out[name][sel[order]] = block[inverse]
        return out

    def close(self):
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for worker processes: reopen files lazily
        state = self.__dict__.copy()
        state["_open"] = {}
        return state


# -- splits of the labeled frames ---------------------------------------------------------
def split_fraction(sample_id, seed):
    """Uniform number in [0, 1) from ``sha256("<seed>:<id>")``: the split key of a frame."""
    digest = hashlib.sha256(f"{int(seed)}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_rows(ids, labels, seed=0, val_fraction=0.15, test_fraction=0.0):
    """Deterministic train/val/test split of the labeled rows by hashed sample id.

    Parameters
    ----------
    ids : array of str
    labels : array of int (-1 = unlabeled, excluded)
    seed : int
    val_fraction, test_fraction : float
        Expected fractions of labeled frames in val and test.

    Returns
    -------
    dict
        ``{"train": rows, "val": rows, "test": rows}`` (int64 arrays, increasing).

    Examples
    --------
    >>> s = split_rows(["a:0", "a:1", "a:2", "a:3"], [0, 1, 0, -1], seed=0, val_fraction=0.5)
    >>> sorted(int(r) for r in np.concatenate([s["train"], s["val"], s["test"]]))
    [0, 1, 2]
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise InputError(f"val fraction {val_fraction} + test fraction {test_fraction} must be "
                         f"in [0, 1)")
    labels = np.asarray(labels)
    rows = np.flatnonzero(labels >= 0)
    u = np.array([split_fraction(ids[r], seed) for r in rows])
    test = u < test_fraction
    val = (u >= test_fraction) & (u < test_fraction + val_fraction)
    return {"train": rows[~test & ~val], "val": rows[val], "test": rows[test]}


def labeled_splits(dataset, seed=0, val_fraction=0.15, test_fraction=0.0, ranks=1):
    """The train/val/test rows of a dataset's labeled frames, checked for training.

    What every training run needs of its data, and all of it cheap (no TensorFlow): the
    launcher of ``lcls-dl train --np N`` runs it before it starts any rank.

    Parameters
    ----------
    dataset : Dataset
    seed, val_fraction, test_fraction
        See :func:`split_rows`.
    ranks : int
        MPI ranks that will share the training rows: each needs at least one.

    Returns
    -------
    dict
        ``{"train": rows, "val": rows, "test": rows}``.

    Raises
    ------
    InputError
        No labeled frames, a single class, or fewer training frames than ranks.
    """
    labeled = dataset.labeled
    where = dataset.path
    if len(labeled) == 0:
        raise InputError("no labeled frames (add labels with ingest --labels or lcls-dl label)",
                         where)
    present = sorted(set(dataset.labels[labeled].tolist()))
    if len(present) < 2:
        name = dataset.classes[present[0]] if present else "?"
        raise InputError(f"only one class among the labeled frames ({name!r}); a classifier "
                         f"needs at least two", where)
    splits = split_rows(dataset.ids, dataset.labels, seed, val_fraction, test_fraction)
    n_train = len(splits["train"])
    if n_train == 0:
        raise InputError("no labeled frames left for training after the validation/test split",
                         where)
    if n_train < int(ranks):
        raise InputError(f"only {n_train} training frames (of {len(labeled)} labeled, after the "
                         f"validation/test split) for {int(ranks)} ranks; every rank needs at "
                         f"least one (label more frames, lower --val-fraction/--test-fraction "
                         f"or use fewer ranks)", where)
    return splits
