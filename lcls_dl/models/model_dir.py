"""MODEL_DIR on disk, and the inference helpers every later stage uses.

A model directory holds::

    model.keras        the Keras model (inputs image/profile/scalars, output "probs")
    model.json         metadata (below)
    metrics.csv        per-epoch loss/accuracy; curves.png; logs/ (TensorBoard)
    checkpoints/       epoch-NNNN.npz (last K) and best.npz, for --resume

``model.json`` keys: ``schema_version``, ``kind`` ("lcls-dl model"), ``created``, ``software``
(versions), ``command``, ``model_kind``, ``classes``, ``inputs`` ({name: per-frame shape}),
``preprocessing`` (the dataset manifest's block, verbatim, including ``q_edges`` and
``scalar_names``), ``geometry``, ``dataset`` (``path``, ``manifest_checksum``, ``n_frames``),
``seed``, ``temperature``, ``calibration``, ``split`` (method, fractions, counts),
``training`` (options, config hash, epochs run, best epoch, timing), ``blueprint``,
``metrics`` (validation / test reports).

Public helpers (used by evaluate, predict and suggest-labels):

- :func:`load_model_dir` / :func:`save_model_dir`
- :func:`predict_proba` -- calibrated class probabilities, optionally Monte-Carlo dropout samples
- :func:`predict_logits`, :func:`embed` -- raw logits and the ``embedding`` layer's output
- :func:`dataset_logits` -- logits for rows of a :class:`lcls_dl.dataset.Dataset`, streamed
- :func:`check_preprocessing`, :func:`map_labels` -- refuse mismatched data

Examples
--------
>>> model, meta = load_model_dir("model1")                        # doctest: +SKIP
>>> arrays = Dataset("data1").read(range(100))                     # doctest: +SKIP
>>> p = predict_proba(model, meta, arrays)                         # (100, n_classes)
>>> samples = predict_proba(model, meta, arrays, mc_dropout_passes=20)   # (20, 100, K)
>>> e = embed(model, arrays)                                       # (100, embedding width)
"""
import json
import os

import numpy as np

from ..atomic import atomic_path, write_json
from ..errors import ConfigError, InputError

MODEL_FILE = "model.keras"
META_FILE = "model.json"
MODEL_SCHEMA_VERSION = 1


def save_model_dir(out_dir, model, metadata):
    """Write ``model.keras`` and ``model.json`` into ``out_dir`` (both atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, MODEL_FILE), suffix=".keras") as tmp:
        model.save(tmp)
    meta = dict(metadata)
    meta.setdefault("schema_version", MODEL_SCHEMA_VERSION)
    meta.setdefault("kind", "lcls-dl model")
    write_json(os.path.join(out_dir, META_FILE), meta)


def load_metadata(path):
    """Read ``model.json`` of a model directory (no TensorFlow import)."""
    mpath = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        raise InputError("model directory not found", path)
    if not os.path.isfile(mpath):
        raise InputError("not an lcls-dl model directory: no model.json (did training finish?)",
                         path)
    try:
        with open(mpath, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable model.json: {exc}", mpath) from None
    if meta.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise InputError(f"model schema version {meta.get('schema_version')} is not supported",
                         mpath)
    return meta


def load_model_dir(path):
    """Load a trained model -> ``(keras.Model, metadata dict)``.

    Raises
    ------
    InputError
        Missing directory, model.json or model.keras, or an unreadable model file.
    """
    path = os.fspath(path)
    meta = load_metadata(path)
    kpath = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(kpath):
        raise InputError("model directory has no model.keras", path)
    import keras

    try:
        model = keras.models.load_model(kpath, compile=False)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise InputError(f"unreadable model file: {msg}", kpath) from None
    return model, meta


def _inputs(model, arrays, sl=slice(None)):
    from .builders import select_inputs

    names = [t.name.split(":")[0] for t in model.inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"model needs input array(s) {', '.join(missing)}")
    return select_inputs(model, {n: np.asarray(arrays[n])[sl] for n in names})


def _n(model, arrays):
    name = model.inputs[0].name.split(":")[0]
    return len(arrays[name])


def _sub(model, layer):
    cache = model.__dict__.setdefault("_lcls_dl_sub", {})
    if layer not in cache:
        from .builders import sub_model

        cache[layer] = sub_model(model, layer)
    return cache[layer]


def predict_logits(model, arrays, batch_size=256, training=False):
    """Pre-softmax outputs (N, K) for ``arrays`` (dict with the model's input names)."""
    sub = _sub(model, "logits")
    n = _n(model, arrays)
    out = [np.asarray(sub(_inputs(model, arrays, slice(i, i + batch_size)), training=training))
           for i in range(0, n, batch_size)]
    k = sub.outputs[0].shape[-1]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, k))


def predict_proba(model, meta, arrays, mc_dropout_passes=0, batch_size=256, seed=0):
    """Calibrated class probabilities ``softmax(logits / T)``, T = ``meta["temperature"]``.

    Parameters
    ----------
    model, meta : from :func:`load_model_dir`
    arrays : dict
        ``{"image": (N, H, W), "profile": (N, Q), "scalars": (N, S)}`` as in a dataset
        (only the model's inputs are needed).
    mc_dropout_passes : int
        0: deterministic prediction, returns (N, K). P > 0: Monte-Carlo dropout, returns
        (P, N, K) samples with dropout active (the model has no batch normalization, so
        nothing else changes); reproducible for a given ``seed``.

    Returns
    -------
    ndarray of float64, (N, K) or (P, N, K); columns in ``meta["classes"]`` order.
    """
    from .calibration import softmax

    t = float(meta.get("temperature", 1.0) or 1.0)
    if not mc_dropout_passes:
        return softmax(predict_logits(model, arrays, batch_size), t)
    from .training import _reset_rng

    _reset_rng(model, seed, 10 ** 6)
    return np.stack([softmax(predict_logits(model, arrays, batch_size, training=True), t)
                     for _ in range(int(mc_dropout_passes))])


def embed(model, arrays, batch_size=256):
    """Output of the ``embedding`` layer (N, E): a learned feature vector per frame."""
    sub = _sub(model, "embedding")
    n = _n(model, arrays)
    out = [np.asarray(sub(_inputs(model, arrays, slice(i, i + batch_size)), training=False))
           for i in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, sub.outputs[0].shape[-1]), np.float32)


def dataset_logits(model, dataset, rows, batch_size=256, block=2048, logits_model=None):
    """Logits (N, K) of dataset ``rows``, read ``block`` frames at a time."""
    sub = logits_model or _sub(model, "logits")
    names = tuple(t.name.split(":")[0] for t in model.inputs)
    rows = np.asarray(rows, np.int64)
    out = []
    for start in range(0, len(rows), block):
        arrays = dataset.read(rows[start:start + block], names)
        for i in range(0, len(rows[start:start + block]), batch_size):
            out.append(np.asarray(sub({n: arrays[n][i:i + batch_size] for n in names},
                                      training=False)))
    k = sub.outputs[0].shape[-1]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, k))


def dataset_embeddings(model, dataset, rows, batch_size=256, block=2048):
    """Embeddings (N, E) of dataset ``rows``, streamed like :func:`dataset_logits`."""
    return dataset_logits(model, dataset, rows, batch_size, block,
                          logits_model=_sub(model, "embedding")).astype(np.float32)


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return False
        try:
            return np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, atol=1e-9)
        except (TypeError, ValueError):
            return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        try:
            return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0))
        except (TypeError, ValueError):
            return False
    return a == b


def check_preprocessing(model_pre, data_pre, where=None):
    """Raise ConfigError naming the first preprocessing key where model and dataset differ."""
    model_pre, data_pre = model_pre or {}, data_pre or {}
    for key in sorted(set(model_pre) | set(data_pre)):
        if key not in data_pre or key not in model_pre:
            side = "dataset" if key not in data_pre else "model"
            raise ConfigError(f"preprocessing differs from the model's: key {key!r} missing in "
                              f"the {side}", where)
        if not _same(model_pre[key], data_pre[key]):
            a, b = model_pre[key], data_pre[key]
            show = (lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 60 else repr(v))
            raise ConfigError(f"preprocessing differs from the model's: {key} is {show(b)} in "
                              f"the dataset, {show(a)} in the model", where)


def map_labels(model_classes, data_classes, labels, ids=None, where=None):
    """Translate dataset label indices into the model's class indices (-1 stays -1).

    Raises
    ------
    InputError
        A labeled frame has a class the model does not know (names the class and a frame).
    """
    lookup = {c: i for i, c in enumerate(model_classes)}
    labels = np.asarray(labels)
    out = np.full(len(labels), -1, np.int64)
    for j, name in enumerate(data_classes):
        sel = labels == j
        if not sel.any():
            continue
        if name not in lookup:
            first = int(np.flatnonzero(sel)[0])
            frame = f"{where}: frame {ids[first]}" if ids is not None else where
            raise InputError(f"label {name!r} is not a class of the model "
                             f"(model classes: {', '.join(model_classes)})", frame)
        out[sel] = lookup[name]
    return out
