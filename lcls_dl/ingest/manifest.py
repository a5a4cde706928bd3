"""Build and check a dataset's ``manifest.json`` (schema in docs/architecture.md).

The manifest is written last by ingest, so a directory with a manifest is a complete
dataset. :func:`build_manifest` assembles it from the run's pieces; :func:`validate_manifest`
checks its structure and, optionally, that every shard file exists with the recorded size
and checksum.

Examples
--------
>>> m = build_manifest(parameters={"shard_size": 2}, inputs=[], geometry=None,
...                    preprocessing={"scalar_names": []}, classes=["water", "ice"],
...                    shards=[{"name": "shard-00000.h5", "frames": 2, "sha256": "0" * 64,
...                             "bytes": 10, "class_counts": {"water": 1, "ice": 0,
...                                                           "unlabeled": 1}}])
>>> m["n_frames"], m["class_counts"]
(2, {'water': 1, 'ice': 0, 'unlabeled': 1})
>>> validate_manifest(m) is m
True
"""
import os

from ..dataset import DATASET_SCHEMA_VERSION
from ..errors import InputError
from ..provenance import software_versions, utc_now

KIND = "lcls-dl dataset"
REQUIRED = {"schema_version": int, "kind": str, "created": str, "software": dict,
            "command": (str, type(None)), "parameters": dict, "inputs": list,
            "geometry": (dict, type(None)), "preprocessing": dict, "classes": list,
            "n_frames": int, "class_counts": dict, "shards": list, "bad": list}
SHARD_KEYS = ("name", "frames", "sha256", "bytes", "class_counts")


def build_manifest(parameters, inputs, geometry, preprocessing, classes, shards, bad=(),
                   command=None, created=None, software=None):
    """Assemble a manifest dict; ``n_frames`` and ``class_counts`` are summed over ``shards``.

    Parameters
    ----------
    parameters : dict
        Ingest options (shard size, reader options, seed, spec hash...).
    inputs : list of dict
        ``{"path", "bytes", "frames", "reader"}`` per input file.
    geometry : dict or None
        ``DetectorGeometry.to_dict()`` (None for tabular inputs).
    preprocessing : dict
        ``PreprocessParams.to_dict()`` + ``scalar_names`` + ``q_edges``.
    classes : list of str
    shards : list of dict
        ``{"name", "frames", "sha256", "bytes", "class_counts"}`` in shard order.
    bad : list of dict
        ``{"where", "what"}`` of inputs skipped with ``--skip-bad``.
    """
    counts = {c: 0 for c in classes}
    counts["unlabeled"] = 0
    for s in shards:
        for c, n in s.get("class_counts", {}).items():
            counts[c] = counts.get(c, 0) + int(n)
    manifest = {
        "schema_version": DATASET_SCHEMA_VERSION,
        "kind": KIND,
        "created": created or utc_now(),
        "software": software or software_versions(),
        "command": command,
        "parameters": parameters,
        "inputs": list(inputs),
        "geometry": geometry,
        "preprocessing": preprocessing,
        "classes": list(classes),
        "n_frames": int(sum(int(s["frames"]) for s in shards)),
        "class_counts": counts,
        "shards": [{k: s[k] for k in SHARD_KEYS if k in s} for s in shards],
        "bad": [dict(b) for b in bad],
    }
    return manifest


def validate_manifest(manifest, dataset_dir=None, check_files=False):
    """Check a manifest's structure (and with ``check_files`` its shards on disk).

    Returns the manifest; raises InputError naming the first problem.
    """
    where = os.path.join(dataset_dir, "manifest.json") if dataset_dir else "manifest"
    if not isinstance(manifest, dict):
        raise InputError("manifest is not a JSON object", where)
    for key, typ in REQUIRED.items():
        if key not in manifest:
            raise InputError(f"manifest lacks {key!r}", where)
        if not isinstance(manifest[key], typ):
            raise InputError(f"manifest {key!r} has type {type(manifest[key]).__name__}", where)
    if manifest["schema_version"] != DATASET_SCHEMA_VERSION:
        raise InputError(f"schema version {manifest['schema_version']} is not supported", where)
    if manifest["kind"] != KIND:
        raise InputError(f"manifest kind {manifest['kind']!r} is not {KIND!r}", where)
    total = 0
    for s in manifest["shards"]:
        for key in SHARD_KEYS:
            if key not in s:
                raise InputError(f"shard entry lacks {key!r}", f"{where}: {s.get('name')}")
        total += int(s["frames"])
        if check_files:
            from .shard_writer import file_sha256

            path = os.path.join(dataset_dir, s["name"])
            if not os.path.isfile(path):
                raise InputError("shard missing", path)
            if os.path.getsize(path) != s["bytes"] or file_sha256(path) != s["sha256"]:
                raise InputError("shard differs from the manifest (size or checksum)", path)
    if total != manifest["n_frames"]:
        raise InputError(f"shards hold {total} frames, manifest says {manifest['n_frames']}",
                         where)
    for c in manifest["classes"]:
        if c not in manifest["class_counts"]:
            raise InputError(f"class_counts lacks class {c!r}", where)
    return manifest
