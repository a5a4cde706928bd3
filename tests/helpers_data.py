"""Tiny synthetic ingested datasets for the model tests (no simulate/ingest needed).

Frames are built directly in the ingested representation (polar image (q, phi), radial
profile, scalars) with learnable classes: "water" has a smooth ring, "ice" adds bright
Bragg-like blobs (and a sharp profile peak, more peaks), "miss" is nearly empty.
"""
import os

import numpy as np

from lcls_dl.atomic import write_json
from lcls_dl.ingest.shard_writer import shard_name, write_shard

SCALAR_NAMES = ["n_peaks", "log10_total_photons", "log10_mean_photons", "log10_max_pixel"]
TRANSFORMS = {"asinh": np.arcsinh, "log1p": np.log1p, "linear": lambda x: x}


def make_preprocessing(shape=(32, 64), n_q=64, transform="asinh"):
    """A ``preprocessing`` block laid out like lcls_dl.ingest.preprocess writes it.

    ``shape`` (H, W) is a 1-channel image, (H, W, 2) adds the max-SNR channel.
    """
    q_edges = np.linspace(0.5, 3.5, n_q + 1).round(6).tolist()
    return {"image_shape": list(shape[:2]), "image_channels": 2 if len(shape) == 3 else 1,
            "n_q": n_q, "q_min": 0.5, "q_max": 3.5,
            "transform": transform, "transform_scale": 1.0, "norm_floor": 0.05,
            "scalar_names": list(SCALAR_NAMES), "q_edges": q_edges}


def synth_frames(labels, classes, shape=(32, 64), n_q=64, seed=0, transform="asinh"):
    """Arrays (image, profile, scalars) for integer ``labels`` into ``classes``.

    A 3-D ``shape`` (H, W, 2) adds a max-SNR-like channel: (counts - ring) / sqrt(ring).
    """
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    two = len(shape) == 3
    n = len(labels)
    qi = np.arange(h)[:, None]
    image = np.empty((n,) + tuple(shape), np.float32)
    profile = np.empty((n, n_q), np.float32)
    scalars = np.empty((n, len(SCALAR_NAMES)), np.float32)
    qp = np.arange(n_q)
    for k, lab in enumerate(labels):
        name = classes[lab] if lab >= 0 else classes[rng.integers(len(classes))]
        amp = rng.uniform(5, 20) if name != "miss" else rng.uniform(0.0, 0.5)
        ring = amp * np.exp(-0.5 * ((qi - 0.4 * h) / (0.08 * h)) ** 2) * np.ones((1, w))
        counts = ring + 0.3
        peaks = 0
        prof = amp * np.exp(-0.5 * ((qp - 0.4 * n_q) / (0.08 * n_q)) ** 2) + 0.3
        if name == "ice":
            peaks = int(rng.integers(4, 9))
            for _ in range(peaks):
                r, c = int(rng.integers(2, h - 2)), int(rng.integers(0, w))
                counts[r - 1:r + 2, [(c - 1) % w, c, (c + 1) % w]] += rng.uniform(30, 80)
            prof = prof + 3.0 * np.exp(-0.5 * ((qp - 0.55 * n_q) / 1.0) ** 2)
        background = ring + 0.3
        counts = rng.poisson(counts).astype(np.float32)
        mean = counts.mean()
        norm = max(mean, 0.05)
        f = TRANSFORMS[transform]
        if two:
            image[k, ..., 0] = f(counts / norm)
            image[k, ..., 1] = f((counts - background) / np.sqrt(background))
        else:
            image[k] = f(counts / norm)
        profile[k] = f(np.maximum(prof + rng.normal(0, 0.1, n_q), 0) / norm)
        scalars[k] = [peaks + rng.integers(0, 2), np.log10(1 + counts.sum()),
                      np.log10(mean + 1e-4), np.log10(1 + counts.max())]
    return image, profile, scalars


def make_dataset(path, n=100, classes=("water", "ice"), shape=(32, 64), n_q=64, seed=0,
                 labels=None, unlabeled=0, shard_size=40, prefix="run0001", transform="asinh"):
    """Write a dataset dir (shards + manifest.json) and return its path.

    ``labels``: explicit int labels (len n); default balanced cycling over ``classes``;
    the last ``unlabeled`` frames get -1 (their arrays are still of a random class).
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    classes = list(classes)
    if labels is None:
        labels = np.arange(n) % len(classes)
        if unlabeled:
            labels[n - unlabeled:] = -1
    labels = np.asarray(labels, np.int16)
    image, profile, scalars = synth_frames(labels, classes, shape, n_q, seed, transform)
    files = np.array([f"{prefix}_{'a' if i < n // 2 else 'b'}.cxi" for i in range(n)])
    events = np.arange(n, dtype=np.int64)
    ids = [f"{f}:{e}" for f, e in zip(files, events)]
    shards = []
    for s, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, start + shard_size)
        info = write_shard(os.path.join(path, shard_name(s)), image[sl], profile[sl],
                           scalars[sl], SCALAR_NAMES, labels[sl], ids[sl], files[sl],
                           events[sl])
        info["class_counts"] = {c: int((labels[sl] == i).sum()) for i, c in enumerate(classes)}
        shards.append(info)
    manifest = {"schema_version": 1, "kind": "lcls-dl dataset", "created": "2026-01-01T00:00:00Z",
                "software": {}, "command": "tests.helpers_data", "parameters": {"seed": seed},
                "inputs": [], "geometry": None,
                "preprocessing": make_preprocessing(shape, n_q, transform), "classes": classes,
                "n_frames": n,
                "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
                "shards": shards, "bad": []}
    write_json(os.path.join(path, "manifest.json"), manifest)
    return path
