"""``lcls-dl predict``: classify frames of a dataset or of raw detector files."""
import os
import re

import click
import numpy as np

from .common import echo, progress

_RUN = re.compile(r"(?:^|[^a-z0-9])(r(?:un)?[-_]?\d+)", re.IGNORECASE)


def run_key(file_name):
    """Group key of a frame's file for per-run fractions: ``r0012``-like token or the stem.

    Examples
    --------
    >>> run_key("cxi25410/LCLS_2011_r0123_x.cxi"), run_key("shots_b.h5")
    ('r0123', 'shots_b')
    """
    base = os.path.basename(str(file_name))
    m = _RUN.search(base)
    if m:
        return re.sub(r"^run[-_]?", "r", m.group(1), flags=re.IGNORECASE).lower()
    return os.path.splitext(base)[0]


def iter_dataset_batches(dataset_dir, meta, block=1024):
    """Yield batch dicts (image, profile, scalars, ids, files, events) from a dataset."""
    from ..dataset import Dataset
    from ..models.model_dir import check_preprocessing

    ds = Dataset(dataset_dir)
    check_preprocessing(meta.get("preprocessing"), ds.preprocessing, where=dataset_dir)
    names = tuple(meta.get("inputs", {}) or ("image", "profile", "scalars"))
    for start in range(0, len(ds), block):
        rows = np.arange(start, min(start + block, len(ds)))
        batch = ds.read(rows, names)
        batch.update(ids=ds.ids[rows], files=ds.files[rows], events=ds.events[rows])
        batch["label_names"] = np.array([ds.classes[i] if i >= 0 else "" for i in ds.labels[rows]])
        yield batch
    ds.close()


def iter_raw_batches(paths, meta, reader_options):
    """Yield batch dicts from raw detector files, preprocessed with the model's parameters."""
    from ..errors import LclsError

    try:
        from ..ingest.pipeline import iter_preprocessed
    except ImportError as exc:
        raise LclsError(f"raw detector input needs the ingest pipeline ({exc}); ingest the "
                        f"files first and pass the dataset directory") from None
    for item in iter_preprocessed(list(paths), meta.get("preprocessing") or {},
                                  **reader_options):
        item = dict(item)
        if np.ndim(item["profile"]) == 1:  # a single frame (image (H, W) or (H, W, C))
            item = {k: (np.asarray(v)[None] if k in ("image", "profile", "scalars")
                        else np.asarray([v])) for k, v in item.items()}
        yield item


def predict_batches(model, meta, batches, mc_dropout_passes=0):
    """Run the model over batches -> dict of columns (ids, files, events, probs, ...)."""
    from ..models.model_dir import predict_proba

    cols = {"ids": [], "files": [], "events": [], "probs": [], "label_names": []}
    bar = progress(desc="predict", unit="frame")
    for batch in batches:
        p = predict_proba(model, meta, batch)
        cols["probs"].append(p)
        for key in ("ids", "files", "events"):
            cols[key].append(np.asarray(batch[key]))
        n = len(p)
        cols["label_names"].append(np.asarray(batch.get("label_names", [""] * n)))
        bar.update(n)
    bar.close()
    k = len(meta["classes"])
    out = {key: (np.concatenate(v) if v else np.zeros(0)) for key, v in cols.items()}
    if not cols["probs"]:
        out["probs"] = np.zeros((0, k))
    return out


def write_predictions(path, cols, classes):
    """CSV (``.csv``) or HDF5 (``.h5``/``.hdf5``) of per-frame probabilities, atomically."""
    from ..atomic import atomic_open, atomic_path
    from ..errors import InputError

    pred = cols["probs"].argmax(1) if len(cols["probs"]) else np.zeros(0, int)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        import csv

        with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "file", "event", "predicted", "label"] + [f"p_{c}" for c in classes])
            for i in range(len(pred)):
                w.writerow([cols["ids"][i], cols["files"][i], int(cols["events"][i]),
                            classes[pred[i]], cols["label_names"][i]]
                           + [f"{v:.6f}" for v in cols["probs"][i]])
    elif ext in (".h5", ".hdf5"):
        import h5py

        s = h5py.string_dtype("utf-8")
        with atomic_path(path, suffix=ext) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("probs", data=np.asarray(cols["probs"], np.float32))
                f.create_dataset("predicted", data=pred.astype(np.int16))
                for key in ("ids", "files", "label_names"):
                    f.create_dataset(key.rstrip("s") if key != "label_names" else "label",
                                     data=np.asarray(cols[key], dtype=object), dtype=s)
                f.create_dataset("event", data=np.asarray(cols["events"], np.int64))
                f.attrs["classes"] = np.array(classes, dtype=object).astype(s)
    else:
        raise InputError("predictions file must end in .csv, .h5 or .hdf5", path)
    return pred


def run_fractions(files, pred, classes):
    """``{run: {"frames": n, class: fraction, ...}}`` by :func:`run_key` of each frame's file."""
    keys = np.array([run_key(f) for f in files])
    out = {}
    for key in sorted(set(keys.tolist())):
        sel = keys == key
        counts = np.bincount(pred[sel], minlength=len(classes))
        out[key] = {"frames": int(sel.sum()),
                    **{c: float(counts[i] / sel.sum()) for i, c in enumerate(classes)}}
    return out


def parse_reader_options(items):
    """``KEY=VALUE`` strings -> reader options, typed as ``lcls-dl ingest``'s flags are.

    Examples
    --------
    >>> parse_reader_options(["distance_mm=120", "beam_center=10,20.5"])
    {'distance_mm': 120.0, 'beam_center': (10.0, 20.5)}
    """
    from ..errors import InputError
    from ..ingest.readers import READER_OPTIONS

    opts = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--reader-option must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k not in READER_OPTIONS:
            raise InputError(f"unknown reader option {k!r} (one of {', '.join(READER_OPTIONS)})",
                             "--reader-option")
        try:
            if k in ("pixel_size_um", "distance_mm", "energy_ev"):
                v = float(v)
            elif k == "beam_center":
                v = tuple(float(x) for x in v.split(","))
                if len(v) != 2:
                    raise ValueError(v)
            elif k == "classes":
                v = [c.strip() for c in v.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"bad value for reader option {k}: {item!r} (a number; "
                             "beam_center as SS,FS)", "--reader-option") from None
        opts[k] = v
    return opts


@click.command("predict")
@click.argument("model_dir", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Predictions file: .csv or .h5.")
@click.option("--reader-option", "reader_options", multiple=True, metavar="KEY=VALUE",
              help="Option for the raw-file reader (e.g. dataset=/entry/data/data).")
def predict(model_dir, inputs, out_path, reader_options):
    """Classify frames of an ingested dataset or of raw detector files.

    Raw files are preprocessed on the fly with the parameters recorded in the model, so the
    model sees exactly what it was trained on. Prints the class fractions per run.

    \b
    Example:
      lcls-dl predict model1 data2 --out pred.csv
      lcls-dl predict model1 run7/*.cxi --out run7-pred.h5
    """
    from ..errors import InputError
    from ..models.model_dir import load_model_dir

    opts = parse_reader_options(reader_options)
    for p in inputs:
        if not os.path.exists(p):
            raise InputError("input not found", p)
    model, meta = load_model_dir(model_dir)
    is_dataset = [os.path.isfile(os.path.join(p, "manifest.json")) for p in inputs]
    if any(is_dataset):
        if not all(is_dataset):
            raise InputError("mix of dataset directories and raw files; give one kind")
        batches = (b for p in inputs for b in iter_dataset_batches(p, meta))
    else:
        batches = iter_raw_batches(inputs, meta, opts)
    cols = predict_batches(model, meta, batches)
    classes = meta["classes"]
    pred = write_predictions(out_path, cols, classes)
    fr = run_fractions(cols["files"], pred, classes)
    w = max([3] + [len(k) for k in fr])
    click.echo(f"{'run':<{w}}  {'frames':>7}  " + "  ".join(f"{c:>8}" for c in classes))
    for key, row in fr.items():
        click.echo(f"{key:<{w}}  {row['frames']:7d}  "
                   + "  ".join(f"{row[c]:8.1%}" for c in classes))
    echo(f"wrote {len(pred)} predictions to {out_path}")
    return 0
